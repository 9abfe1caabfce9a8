"""The sans-I/O HTTP/2 server connection (extproc.serve.h2frames), driven by bytes."""

from __future__ import annotations

import struct

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.serve import h2frames as h2

REQ = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
    (":authority", "budget_router"),
    ("te", "trailers"),
    ("content-type", "application/grpc"),
]


def start() -> bytes:
    return h2.PREFACE + h2.settings_frame([])


def headers_frame(enc: hpack.Encoder, sid: int, headers=REQ, end_stream=False) -> bytes:
    flags = h2.FLAG_END_HEADERS | (h2.FLAG_END_STREAM if end_stream else 0)
    return h2.frame(h2.HEADERS, flags, sid, enc.encode(headers))


def data_frame(sid: int, data: bytes, end_stream=False, padded: int | None = None) -> bytes:
    flags = h2.FLAG_END_STREAM if end_stream else 0
    if padded is not None:
        return h2.frame(h2.DATA, flags | h2.FLAG_PADDED, sid, bytes([padded]) + data + b"\0" * padded)
    return h2.frame(h2.DATA, flags, sid, data)


def frames_out(data: bytes) -> list[tuple[int, int, int, bytes]]:
    return h2.FrameReader(h2.MAX_FRAME_SIZE_LIMIT, expect_preface=False).feed(data)


def summary(events):
    out = []
    for e in events:
        if isinstance(e, h2.RequestReceived):
            out.append(("req", e.stream_id, tuple(e.headers), e.end_stream))
        elif isinstance(e, h2.DataReceived):
            out.append(("data", e.stream_id, bytes(e.data), e.end_stream))
        elif isinstance(e, h2.StreamReset):
            out.append(("reset", e.stream_id, e.error_code, e.remote))
        elif isinstance(e, h2.ConnectionTerminated):
            out.append(("terminated", e.error_code))
        elif isinstance(e, h2.GoAwayReceived):
            out.append(("goaway", e.error_code, e.last_stream_id))
    return out


def merge_data(events):
    """Coalesce consecutive DataReceived of a stream (chunking splits nothing
    inside a frame, but keep the comparison independent of frame grouping)."""
    out = []
    for e in summary(events):
        if e[0] == "data" and out and out[-1][0] == "data" and out[-1][1] == e[1] and not out[-1][3]:
            out[-1] = ("data", e[1], out[-1][2] + e[2], e[3])
        else:
            out.append(e)
    return out


def conversation() -> bytes:
    enc = hpack.Encoder()
    parts = [start()]
    parts.append(headers_frame(enc, 1))
    parts.append(data_frame(1, b"\0\0\0\0\3abc"))
    parts.append(h2.ping_frame(b"12345678"))
    parts.append(headers_frame(enc, 3, REQ + [("x-extra", "v" * 100)]))
    # A header block split over HEADERS + 2 CONTINUATIONs.
    block = enc.encode(REQ + [("x-big", "b" * 300)])
    parts.append(h2.frame(h2.HEADERS, 0, 5, block[:50]))
    parts.append(h2.frame(h2.CONTINUATION, 0, 5, block[50:120]))
    parts.append(h2.frame(h2.CONTINUATION, h2.FLAG_END_HEADERS, 5, block[120:]))
    parts.append(data_frame(3, b"x" * 1000, padded=7))
    parts.append(h2.rst_stream_frame(5, h2.CANCEL))
    parts.append(data_frame(1, b"", end_stream=True))
    parts.append(h2.window_update_frame(0, 1000))
    parts.append(h2.frame(0xEE, 0, 0, b"unknown frame types are ignored"))
    parts.append(data_frame(3, b"tail", end_stream=True))
    return b"".join(parts)


def test_conversation_events():
    c = h2.H2ServerConnection()
    ev = summary(c.receive_data(conversation()))
    kinds = [e[0] for e in ev]
    assert kinds == ["req", "data", "req", "req", "data", "reset", "data", "data"]
    assert ev[0] == ("req", 1, tuple(REQ), False)
    assert ev[1] == ("data", 1, b"\0\0\0\0\3abc", False)
    assert ev[3][2][-1] == ("x-big", "b" * 300)
    assert ev[4] == ("data", 3, b"x" * 1000, False)  # padding stripped
    assert ev[5] == ("reset", 5, h2.CANCEL, True)
    assert ev[7] == ("data", 3, b"tail", True)
    out = frames_out(c.data_to_send())
    types = [(t, f) for t, f, _, _ in out]
    # SETTINGS, connection WINDOW_UPDATE, SETTINGS ACK, PING ACK.
    assert types[:4] == [(h2.SETTINGS, 0), (h2.WINDOW_UPDATE, 0), (h2.SETTINGS, h2.FLAG_ACK), (h2.PING, h2.FLAG_ACK)]
    assert out[3][3] == b"12345678"
    settings_sent = dict(struct.iter_unpack(">HL", out[0][3]))
    assert settings_sent[h2.SETTINGS_INITIAL_WINDOW_SIZE] == h2.LOCAL_INITIAL_WINDOW
    assert settings_sent[h2.SETTINGS_MAX_FRAME_SIZE] == h2.LOCAL_MAX_FRAME_SIZE
    assert struct.unpack(">L", out[1][3])[0] == h2.LOCAL_CONNECTION_WINDOW - h2.DEFAULT_WINDOW
    assert not c.closed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=400), max_size=60))
def test_any_chunking_gives_the_same_events(cuts):
    stream = conversation()
    whole = h2.H2ServerConnection()
    expected = merge_data(whole.receive_data(stream))
    c = h2.H2ServerConnection()
    events = []
    pos = 0
    for n in cuts:
        events += c.receive_data(stream[pos : pos + n])
        pos += n
    events += c.receive_data(stream[pos:])
    assert merge_data(events) == expected
    assert c.data_to_send() == whole.data_to_send()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=1, max_value=64), max_size=10))
def test_garbage_never_raises(garbage, cuts):
    """Arbitrary bytes after a valid start: events or a clean termination,
    never an exception; after termination nothing more is processed."""
    c = h2.H2ServerConnection()
    c.receive_data(start())
    pos = 0
    for n in cuts + [len(garbage)]:
        events = c.receive_data(garbage[pos : pos + n])
        pos += n
        for e in events:
            if isinstance(e, h2.ConnectionTerminated):
                assert c.closed
                out = frames_out(c.data_to_send())
                assert out[-1][0] == h2.GOAWAY
                assert struct.unpack(">L", out[-1][3][4:8])[0] == e.error_code
    if c.closed:
        assert c.receive_data(b"more") == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.tuples(st.sampled_from(["x-a", "x-b", "x-c", "grpc-timeout", "x-long"]),
                               st.text(alphabet="abcdef0123", max_size=40)), max_size=5),
            st.sampled_from([None, 0, 64, 256, 4096]),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_hpack_cache_follows_the_dynamic_table(blocks):
    """Header blocks from a stateful (indexing) encoder, with repeats and
    table-size updates, decode exactly as sent despite the block cache."""
    enc = hpack.Encoder()
    c = h2.H2ServerConnection()
    c.receive_data(start())
    sid = 1
    for extra, table_size in blocks:
        if table_size is not None:
            enc.header_table_size = table_size
        headers = REQ + extra
        for _ in range(2):  # send each twice: the second may hit the cache
            ev = c.receive_data(headers_frame(enc, sid, headers, end_stream=True))
            assert summary(ev) == [("req", sid, tuple(headers), True)]
            sid += 2


def test_bad_preface():
    c = h2.H2ServerConnection()
    ev = c.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    assert summary(ev) == [("terminated", h2.PROTOCOL_ERROR)]


def test_first_frame_must_be_settings():
    c = h2.H2ServerConnection()
    ev = c.receive_data(h2.PREFACE + h2.ping_frame(b"12345678"))
    assert summary(ev) == [("terminated", h2.PROTOCOL_ERROR)]


def test_frame_too_large():
    c = h2.H2ServerConnection()
    big = struct.pack(">BHBBL", (h2.LOCAL_MAX_FRAME_SIZE + 1) >> 16, (h2.LOCAL_MAX_FRAME_SIZE + 1) & 0xFFFF, 0, 0, 1)
    ev = c.receive_data(start() + big)
    assert summary(ev) == [("terminated", h2.FRAME_SIZE_ERROR)]


def test_continuation_interrupted_is_a_protocol_error():
    enc = hpack.Encoder()
    block = enc.encode(REQ)
    c = h2.H2ServerConnection()
    ev = c.receive_data(start() + h2.frame(h2.HEADERS, 0, 1, block[:10]) + h2.ping_frame(b"12345678"))
    assert summary(ev)[-1] == ("terminated", h2.PROTOCOL_ERROR)


def test_continuation_flood_is_bounded():
    c = h2.H2ServerConnection()
    data = start() + h2.frame(h2.HEADERS, 0, 1, b"\x88")
    filler = h2.frame(h2.CONTINUATION, 0, 1, b"\x88" * 16000)
    ev = c.receive_data(data + filler * 3)
    assert summary(ev)[-1] == ("terminated", h2.ENHANCE_YOUR_CALM)


def test_hpack_garbage_is_a_compression_error():
    c = h2.H2ServerConnection()
    ev = c.receive_data(start() + h2.frame(h2.HEADERS, h2.FLAG_END_HEADERS, 1, b"\xff\xff\xff\xff\xff\x7f"))
    assert summary(ev)[-1] == ("terminated", h2.COMPRESSION_ERROR)


def test_even_stream_id_and_invalid_headers():
    enc = hpack.Encoder()
    c = h2.H2ServerConnection()
    ev = c.receive_data(start() + headers_frame(enc, 1, [("x-first", "1")] + REQ))
    assert ev == []  # regular header before pseudo-headers: stream refused
    assert (h2.RST_STREAM, 0, 1, struct.pack(">L", h2.PROTOCOL_ERROR)) in frames_out(c.data_to_send())
    ev = c.receive_data(headers_frame(enc, 2))
    assert summary(ev)[-1] == ("terminated", h2.PROTOCOL_ERROR)


def test_data_on_idle_stream():
    c = h2.H2ServerConnection()
    ev = c.receive_data(start() + data_frame(7, b"x"))
    assert summary(ev)[-1] == ("terminated", h2.PROTOCOL_ERROR)


def test_settings_validation():
    for key, value, code in [
        (h2.SETTINGS_INITIAL_WINDOW_SIZE, 2**31, h2.FLOW_CONTROL_ERROR),
        (h2.SETTINGS_MAX_FRAME_SIZE, 100, h2.PROTOCOL_ERROR),
        (h2.SETTINGS_ENABLE_PUSH, 2, h2.PROTOCOL_ERROR),
    ]:
        c = h2.H2ServerConnection()
        ev = c.receive_data(start() + h2.settings_frame([(key, value)]))
        assert summary(ev)[-1] == ("terminated", code)
    c = h2.H2ServerConnection()
    ev = c.receive_data(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0, b"12345"))
    assert summary(ev)[-1] == ("terminated", h2.FRAME_SIZE_ERROR)


def _open(c: h2.H2ServerConnection, enc, sid=1, peer_settings=()):
    c.receive_data(h2.PREFACE + h2.settings_frame(peer_settings) + headers_frame(enc, sid))
    c.data_to_send()


def test_outbound_flow_control_queues_and_resumes():
    enc = hpack.Encoder()
    c = h2.H2ServerConnection()
    _open(c, enc, peer_settings=[(h2.SETTINGS_INITIAL_WINDOW_SIZE, 10)])
    c.send_headers(1, h2.encode_headers([(":status", "200")]))
    c.send_data(1, b"a" * 25)
    c.send_headers(1, h2.encode_headers([("grpc-status", "0")]), end_stream=True)
    out = frames_out(c.data_to_send())
    assert [(t, len(p)) for t, _, _, p in out] == [(h2.HEADERS, 1), (h2.DATA, 10)]
    c.receive_data(h2.window_update_frame(1, 10))
    out = frames_out(c.data_to_send())
    assert [(t, len(p)) for t, _, _, p in out] == [(h2.DATA, 10)]
    # Raising the initial window via SETTINGS opens the stream window too.
    c.receive_data(h2.settings_frame([(h2.SETTINGS_INITIAL_WINDOW_SIZE, 1000)]))
    out = frames_out(c.data_to_send())
    assert [(t, f, len(p)) for t, f, _, p in out] == [
        (h2.SETTINGS, h2.FLAG_ACK, 0),
        (h2.DATA, 0, 5),
        (h2.HEADERS, h2.FLAG_END_STREAM | h2.FLAG_END_HEADERS, len(h2.encode_headers([("grpc-status", "0")]))),
    ]


def test_outbound_connection_window_and_frame_size():
    enc = hpack.Encoder()
    c = h2.H2ServerConnection()
    _open(c, enc)
    c.send_data(1, b"z" * 100_000)  # connection window: 65535, frames <= 16384
    out = frames_out(c.data_to_send())
    sizes = [len(p) for t, _, _, p in out if t == h2.DATA]
    assert sum(sizes) == 65_535 and max(sizes) == 16_384
    c.receive_data(h2.window_update_frame(0, 50_000))
    c.receive_data(h2.window_update_frame(1, 50_000))
    out = frames_out(c.data_to_send())
    assert sum(len(p) for t, _, _, p in out if t == h2.DATA) == 100_000 - 65_535


def test_long_header_block_uses_continuation():
    enc = hpack.Encoder()
    c = h2.H2ServerConnection()
    _open(c, enc)
    block = h2.encode_headers([("x-long", "q" * 40_000)])
    c.send_headers(1, block)
    out = frames_out(c.data_to_send())
    assert [t for t, _, _, _ in out] == [h2.HEADERS, h2.CONTINUATION, h2.CONTINUATION]
    assert out[-1][1] & h2.FLAG_END_HEADERS and not out[0][1] & h2.FLAG_END_HEADERS
    assert hpack.Decoder().decode(b"".join(p for _, _, _, p in out)) == [("x-long", "q" * 40_000)]


def test_inbound_flow_control_8mib_body():
    """An 8 MiB body in 1 MiB frames arrives without waiting for updates, and
    the server replenishes the connection window as it goes."""
    enc = hpack.Encoder()
    c = h2.H2ServerConnection()
    _open(c, enc)
    chunk = b"y" * h2.LOCAL_MAX_FRAME_SIZE
    total = 0
    updates = 0
    for _ in range(8 * 5):  # 40 MiB on 5 streams
        for e in c.receive_data(data_frame(1, chunk)):
            total += len(e.data)
        updates += sum(1 for t, _, sid, _ in frames_out(c.data_to_send()) if t == h2.WINDOW_UPDATE)
    assert total == 40 * h2.LOCAL_MAX_FRAME_SIZE and updates >= 2
    assert not c.closed


def test_peer_overrunning_windows():
    enc = hpack.Encoder()
    c = h2.H2ServerConnection()
    _open(c, enc)
    c.streams[1].recv_window = 10  # as if the peer ignored our window
    assert summary(c.receive_data(data_frame(1, b"x" * 11))) == [("reset", 1, h2.FLOW_CONTROL_ERROR, False)]
    assert (h2.RST_STREAM, 0, 1, struct.pack(">L", h2.FLOW_CONTROL_ERROR)) in frames_out(c.data_to_send())
    c._recv_window = 10
    assert summary(c.receive_data(data_frame(1, b"x" * 11)))[-1] == ("terminated", h2.FLOW_CONTROL_ERROR)


def test_window_update_overflow():
    enc = hpack.Encoder()
    c = h2.H2ServerConnection()
    _open(c, enc)
    ev = c.receive_data(h2.window_update_frame(1, 2**31 - 1))
    assert summary(ev) == [("reset", 1, h2.FLOW_CONTROL_ERROR, False)]
    ev = c.receive_data(h2.window_update_frame(0, 2**31 - 1))
    assert summary(ev)[-1] == ("terminated", h2.FLOW_CONTROL_ERROR)


def test_graceful_drain_two_step_goaway():
    enc = hpack.Encoder()
    c = h2.H2ServerConnection()
    _open(c, enc)
    c.start_drain()
    out = frames_out(c.data_to_send())
    assert out[0][0] == h2.GOAWAY and struct.unpack(">LL", out[0][3][:8]) == (2**31 - 1, h2.NO_ERROR)
    assert out[1] == (h2.PING, 0, 0, h2.DRAIN_PING)
    # A stream opened before the peer saw the GOAWAY is still served.
    assert summary(c.receive_data(headers_frame(enc, 3))) == [("req", 3, tuple(REQ), False)]
    c.receive_data(h2.ping_frame(h2.DRAIN_PING, ack=True))
    out = frames_out(c.data_to_send())
    assert out[0][0] == h2.GOAWAY and struct.unpack(">LL", out[0][3][:8]) == (3, h2.NO_ERROR)
    # After the final GOAWAY new streams are refused, the old ones still work.
    assert c.receive_data(headers_frame(enc, 5)) == []
    assert frames_out(c.data_to_send()) == [(h2.RST_STREAM, 0, 5, struct.pack(">L", h2.REFUSED_STREAM))]
    assert summary(c.receive_data(data_frame(3, b"ok", end_stream=True))) == [("data", 3, b"ok", True)]
    c.send_headers(1, b"\x88", end_stream=True)
    c.reset_stream(1, h2.NO_ERROR)
    c.send_headers(3, b"\x88", end_stream=True)
    assert c.idle


def test_stream_lifecycle_and_closed_stream_frames():
    enc = hpack.Encoder()
    c = h2.H2ServerConnection()
    _open(c, enc)
    c.send_headers(1, b"\x88", end_stream=True)
    c.reset_stream(1, h2.NO_ERROR)
    assert c.idle
    # Late DATA and HEADERS on the reset stream are ignored, but still count
    # towards the connection window and keep the HPACK table in sync.
    assert c.receive_data(data_frame(1, b"late")) == []
    assert c.receive_data(headers_frame(enc, 1, [("x-trailer", "t")], end_stream=True)) == []
    assert summary(c.receive_data(headers_frame(enc, 3))) == [("req", 3, tuple(REQ), False)]
    # Trailers end a stream; a trailer block without END_STREAM is an error.
    assert summary(c.receive_data(headers_frame(enc, 3, [("x-t", "1")], end_stream=True))) == [("data", 3, b"", True)]
    c.receive_data(headers_frame(enc, 5))
    assert summary(c.receive_data(headers_frame(enc, 5, [("x-t", "1")]))) == [("reset", 5, h2.PROTOCOL_ERROR, False)]


def test_max_concurrent_streams():
    enc = hpack.Encoder()
    c = h2.H2ServerConnection(max_concurrent_streams=2)
    c.receive_data(start())
    c.data_to_send()
    for sid in (1, 3):
        assert len(c.receive_data(headers_frame(enc, sid))) == 1
    assert c.receive_data(headers_frame(enc, 5)) == []
    assert frames_out(c.data_to_send()) == [(h2.RST_STREAM, 0, 5, struct.pack(">L", h2.REFUSED_STREAM))]


@pytest.mark.parametrize(
    "headers",
    [
        [(":status", "200"), ("content-type", "application/grpc")],
        [("grpc-status", "13"), ("grpc-message", "x" * 200)],
        [(":status", "415"), ("content-type", "text/plain")],
    ],
)
def test_encode_headers_roundtrip(headers):
    assert hpack.Decoder().decode(h2.encode_headers(headers)) == headers


def _answer_slowly(c: h2.H2ServerConnection, sid: int, hb: bytes, data: bytes, tb: bytes) -> None:
    c.send_headers(sid, hb)
    c.send_data(sid, data)
    c.send_headers(sid, tb, end_stream=True)
    s = c.streams.get(sid)
    if s is not None and not s.remote_closed and not s.pending:
        c.reset_stream(sid, h2.NO_ERROR)


@pytest.mark.parametrize("half_closed", [False, True])
def test_send_response_writes_what_the_four_calls_write(half_closed):
    """The one-go answer (HEADERS, DATA, trailers, RST_STREAM(NO_ERROR) while
    the peer still sends) is byte for byte the general path's, with the same
    windows and stream bookkeeping after it."""
    hb, tb = h2.encode_headers([(":status", "200")]), h2.encode_headers([("grpc-status", "0")])
    conns = []
    for fast in (True, False):
        enc = hpack.Encoder()
        c = h2.H2ServerConnection()
        _open(c, enc)
        if half_closed:
            c.receive_data(data_frame(1, b"", end_stream=True))
        c.data_to_send()
        if fast:
            assert c.send_response(1, hb, b"m" * 300, tb) is True
        else:
            _answer_slowly(c, 1, hb, b"m" * 300, tb)
        conns.append((c, c.data_to_send()))
    (fast, out_fast), (slow, out_slow) = conns
    assert out_fast == out_slow
    assert [t for t, _, _, _ in frames_out(out_fast)] == [h2.HEADERS, h2.DATA, h2.HEADERS] + ([] if half_closed else [h2.RST_STREAM])
    assert (fast.send_window, fast.streams, list(fast._recent_resets)) == (slow.send_window, slow.streams, list(slow._recent_resets))
    # Envoy's RST_STREAM after the answer, and late trailers, are ignored alike.
    assert fast.receive_data(h2.rst_stream_frame(1, h2.CANCEL)) == []


def test_send_response_declines_what_it_cannot_send_whole():
    hb, tb = h2.encode_headers([(":status", "200")]), h2.encode_headers([("grpc-status", "0")])
    enc = hpack.Encoder()
    c = h2.H2ServerConnection()
    _open(c, enc, peer_settings=[(h2.SETTINGS_INITIAL_WINDOW_SIZE, 10)])
    assert c.send_response(1, hb, b"x" * 11, tb) is False  # over the stream window
    assert c.send_response(3, hb, b"x", tb) is False         # no such stream
    assert c.data_to_send() == b"" and 1 in c.streams       # nothing sent, nothing changed
    assert c.send_response(1, hb, b"x" * 10, tb) is True
    c.receive_data(headers_frame(enc, 3))
    c.send_headers(3, hb)
    assert c.send_response(3, hb, b"y", tb) is False         # already answering: the general path

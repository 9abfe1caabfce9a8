"""The fast transport's bounded tables and slices, driven in process: a real
``_GrpcConnection`` of a real ``FastServer`` with the router's real Worker
behind it, fed the bytes a peer sends (no socket: each test controls exactly
what arrives in which read, and reads the server's own state).

* the per-connection table of header lists already read
  (``H2_HEADERS_READ_ENTRIES``) stays bounded when a peer varies its header
  blocks, and every stream still gets its own trace context;
* a connection on probation has a large read parsed one
  ``H2_PROBATION_SLICE_BYTES`` slice at a time, and is closed in the first;
* a full memory budget resets held streams ``reclaim_batch`` at a time,
  oldest first.
"""

from __future__ import annotations

import asyncio
import tempfile

import hpack
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config import load
from extproc.serve import h2frames as h2
from extproc.serve.h2c import FastServer, _GrpcConnection
from extproc.serve.limits import H2_HEADERS_READ_ENTRIES, H2_PROBATION_SLICE_BYTES, ServerLimits
from extproc.serve.rpc import DEFAULT_HEALTH_SERVICES, PROCESS_METHOD
from extproc.serve.server import Worker, max_message_bytes

GRPC_REQ = [(":method", "POST"), (":scheme", "http"), (":path", PROCESS_METHOD), (":authority", "router"),
            ("te", "trailers"), ("content-type", "application/grpc")]
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"hello there " * 40 + b'"}]}'


class Sink:
    """Stands in for the socket: keeps what the connection writes."""

    def __init__(self, peer: str = "127.0.0.1"):
        self.out = bytearray()
        self.peer = peer
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def get_extra_info(self, name, default=None):
        return (self.peer, 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        """(type, flags, stream id, payload) of what was written, after the
        server's SETTINGS."""
        out, buf = [], bytes(self.out)
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            out.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9:9 + n]))
            buf = buf[9 + n:]
        return out


def body_message(body: bytes = BODY) -> bytes:
    b = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)).SerializeToString()
    return b"\x00" + len(b).to_bytes(4, "big") + b


class Harness:
    """A FastServer with the real Worker; ``connect`` opens a connection."""

    def __init__(self, limits: ServerLimits = ServerLimits()):
        cfg = load(env={}).replace(router={"state_file": tempfile.mkdtemp(prefix="h2c-inproc-") + "/state.json"})
        self.worker = Worker(cfg, telemetry=False)
        self.metas: list[dict] = []

        def new_stream(meta=None):
            self.metas.append(dict(meta or {}))
            return self.worker.new_stream(meta)

        self.server = FastServer(new_stream, max_message_bytes(cfg), DEFAULT_HEALTH_SERVICES, limits=limits)

    def connect(self, peer: str = "127.0.0.1") -> tuple[_GrpcConnection, Sink, hpack.Encoder]:
        conn = _GrpcConnection(self.server)
        sink = Sink(peer)
        conn.connection_made(sink)
        conn.data_received(h2.PREFACE + h2.settings_frame([]))
        return conn, sink, hpack.Encoder()


def headers_frame(enc: hpack.Encoder, sid: int, extra=()) -> bytes:
    return h2.frame(h2.HEADERS, h2.FLAG_END_HEADERS, sid, enc.encode(GRPC_REQ + list(extra)))


def goaway_codes(sink: Sink) -> list[int]:
    return [int.from_bytes(p[4:8], "big") for t, _f, _s, p in sink.frames() if t == h2.GOAWAY]


def run(coro_fn):
    async def main():
        return coro_fn()
    return asyncio.run(main())


# --- header lists read: bounded, and never another stream's ---------------------

def test_headers_read_table_is_bounded_and_each_stream_keeps_its_trace():
    def body():
        hx = Harness()
        conn, sink, enc = hx.connect()
        n = 3 * H2_HEADERS_READ_ENTRIES + 5
        sent = []
        for i in range(n):
            sid = 2 * i + 1
            # A distinct block per stream (its own traceparent), then the
            # first block again: cleared tables must not mix streams up.
            tp = f"00-{(i % (n - 3)) + 1:032x}-{i + 1:016x}-01"
            sent.append(tp)
            conn.data_received(headers_frame(enc, sid, [("traceparent", tp)])
                               + h2.frame(h2.DATA, 0, sid, body_message()))
            conn.data_received(h2.rst_stream_frame(sid, h2.CANCEL))
            assert len(conn._headers_read) <= H2_HEADERS_READ_ENTRIES
        assert [m.get("traceparent") for m in hx.metas] == sent
        assert not conn.calls
        # every stream was answered (HEADERS + DATA + trailers) with a route
        answered = {s for t, f, s, _p in sink.frames() if t == h2.HEADERS and f & h2.FLAG_END_STREAM}
        assert answered == {2 * i + 1 for i in range(n)}
        assert hx.worker.streams == n
    run(body)


# --- probation: a big read parsed a slice at a time --------------------------------

def test_probation_parses_one_slice_and_closes_at_the_first_reset():
    def body():
        hx = Harness(ServerLimits(peer_max_resets=10))
        first, sink1, enc1 = hx.connect()
        for i in range(11):  # unanswered resets over the address's limit
            sid = 2 * i + 1
            first.data_received(headers_frame(enc1, sid) + h2.rst_stream_frame(sid, h2.CANCEL))
        assert h2.ENHANCE_YOUR_CALM in goaway_codes(sink1)
        assert hx.server.counters["peer_resets_exceeded"] == 1

        conn, sink, enc = hx.connect()  # same address: on probation
        assert conn.probation
        parsed: list[int] = []
        receive = conn.conn.receive_data

        def counting(data, now):
            parsed.append(len(data))
            return receive(data, now)

        conn.conn.receive_data = counting
        pairs = b"".join(headers_frame(enc, 2 * i + 1) + h2.rst_stream_frame(2 * i + 1, h2.CANCEL)
                         for i in range(3000))
        assert len(pairs) > 16 * H2_PROBATION_SLICE_BYTES
        streams_before = len(hx.metas)
        conn.data_received(pairs)
        assert parsed == [H2_PROBATION_SLICE_BYTES]  # one slice, not the whole read
        assert len(hx.metas) - streams_before == 1  # the stream before the first reset
        assert h2.ENHANCE_YOUR_CALM in goaway_codes(sink)
        assert hx.server.counters["peer_probation_closed"] == 1
        assert conn.conn.closed

        # A well-behaved connection from the same address on probation is served.
        ok, ok_sink, ok_enc = hx.connect()
        assert ok.probation
        ok.data_received(headers_frame(ok_enc, 1) + h2.frame(h2.DATA, 0, 1, body_message()))
        assert any(t == h2.HEADERS and f & h2.FLAG_END_STREAM and s == 1 for t, f, s, _p in ok_sink.frames())
        assert not ok.conn.closed
    run(body)


# --- reclaim: reclaim_batch at a time, oldest first ---------------------------------

def test_full_budget_resets_held_streams_a_batch_at_a_time_oldest_first():
    def body():
        cost = ServerLimits().stream_cost_bytes
        held = 64
        hx = Harness(ServerLimits(memory_budget_bytes=held * cost, connection_budget_share=0.5,
                                  reclaim_min_age_s=0.0))
        srv = hx.server
        assert srv.reclaim_batch == held // 16
        # Two holders fill the budget, each its share: streams opened, their
        # request never sent (each costs the stream cost, nothing more).
        (a, a_sink, a_enc), (b, b_sink, b_enc) = hx.connect(), hx.connect()
        for i in range(held // 2):  # a's streams first: the oldest
            a.data_received(headers_frame(a_enc, 2 * i + 1))
        for i in range(held // 2):
            b.data_received(headers_frame(b_enc, 2 * i + 1))
        assert len(a.calls) == len(b.calls) == held // 2
        assert srv.mem_used == srv.memory_budget and srv.counters["streams_reclaimed"] == 0

        c, c_sink, c_enc = hx.connect()  # a client that routes requests

        def route(sid):
            c.data_received(headers_frame(c_enc, sid) + h2.frame(h2.DATA, 0, sid, body_message()))
            assert any(t == h2.HEADERS and f & h2.FLAG_END_STREAM and s == sid for t, f, s, _p in c_sink.frames())

        def reset(sink):
            return [s for t, _f, s, _p in sink.frames() if t == h2.RST_STREAM]

        route(1)  # the budget is full: one reclaim, of the batch's oldest (a's first four)
        assert srv.counters["streams_reclaimed"] == srv.reclaim_batch == 4
        assert sorted(reset(a_sink)) == [1, 3, 5, 7] and reset(b_sink) == []
        # The routed stream gave its memory back: the room the batch made
        # takes more requests without another scan ...
        for k in range(1, 8):
            route(2 * k + 1)
        assert srv.counters["streams_reclaimed"] == 4
        # ... until held streams take it again (a's share has room for four
        # more); then the next batch goes, again the oldest.
        for k in range(4):
            a.data_received(headers_frame(a_enc, held + 2 * k + 1))
        assert srv.mem_used == srv.memory_budget
        route(17)
        assert srv.counters["streams_reclaimed"] == 8
        assert sorted(reset(a_sink)) == [1, 3, 5, 7, 9, 11, 13, 15] and reset(b_sink) == []
        assert srv.mem_used <= srv.memory_budget
        assert srv.counters["memory_refused"] == 0
    run(body)

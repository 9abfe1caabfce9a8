"""A minimal, sans-I/O HTTP/2 server connection for gRPC (RFC 9113).

Bytes in (``receive_data``) -> events out; method calls (``send_headers``,
``send_data``, ``reset_stream``, ...) -> bytes out (``data_to_send``). No
sockets, no asyncio: ``extproc.serve.h2c`` is the I/O shell, and the tests
drive this class directly with arbitrary chunkings of a byte stream.

Scope is what a gRPC server behind Envoy needs, done correctly:

* HTTP/2 with prior knowledge (the 24-byte preface, then SETTINGS); no
  HTTP/1.1 Upgrade. This class sees plaintext frames either way: with TLS
  (``extproc.tls``, ALPN h2) the shell's transport decrypts, and the
  connection here is the same.
* SETTINGS and their ACK, PING, WINDOW_UPDATE with flow control both ways
  (large receive windows so a 9 MiB gRPC message streams without stalls,
  outbound DATA queued per stream until the peer opens its windows),
  HEADERS + CONTINUATION, PADDED / PRIORITY flags, RST_STREAM, GOAWAY
  (graceful two-step drain like grpc-go / nghttp2), stream-ID rules.
* Header blocks are decoded with ``hpack`` (the dynamic table must follow the
  peer's encoder). We encode with *literal without indexing* only, so our
  encoder is stateless and the common blocks are precomputed constants.
* Any connection error becomes GOAWAY(code) + a ``ConnectionTerminated``
  event; the caller closes the socket. Nothing here raises on peer input.
* Flood limits (``extproc.serve.limits``, with their reasons): SETTINGS
  entries and rate, CONTINUATION frames per block, empty DATA frames, client
  resets (Rapid Reset), control frames owed while the shell's write buffer
  has not drained (``output_drained``), reused stream IDs. Rates use the
  ``now`` the shell passes to ``receive_data``; this module reads no clock.

Not supported (not needed by gRPC): server push, priorities (parsed and
ignored, as RFC 9113 deprecates them), HTTP/1.1 Upgrade, CONNECT.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Iterable

import hpack
import hpack.hpack
import hpack.huffman_table as _hufftab
from hpack.exceptions import HPACKDecodingError, HPACKError, InvalidTableIndex
from hpack.table import HeaderTable

from .limits import (
    H2_MAX_CONSECUTIVE_EMPTY_FRAMES,
    H2_MAX_CONTINUATIONS,
    H2_MAX_PENDING_CONTROL_FRAMES,
    H2_MAX_SETTINGS_PER_FRAME,
    H2_RESET_BURST,
    H2_RESET_RATE_PER_S,
    H2_SETTINGS_BURST,
    H2_SETTINGS_RATE_PER_S,
    HEADER_CACHE_ENTRIES,
    LOCAL_CONNECTION_WINDOW,
    LOCAL_HEADER_TABLE_SIZE,
    LOCAL_INITIAL_WINDOW,
    LOCAL_MAX_CONCURRENT_STREAMS,
    LOCAL_MAX_FRAME_SIZE,
    LOCAL_MAX_HEADER_LIST_SIZE,
    MAX_HEADER_BLOCK_BYTES,
    RECENT_RESETS,
    WINDOW_UPDATE_RATIO,
)

# --- Protocol constants (RFC 9113 section 6 / 7 / 11) --------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

#: RFC 9113 6.5.2 / 6.9: the defaults every peer starts from.
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME_SIZE = 16_384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_SIZE_LIMIT = 2**24 - 1

#: Opaque data of the PING that follows the first (drain-announcing) GOAWAY;
#: its ACK tells us every stream the peer opened before seeing it has arrived.
DRAIN_PING = b"drain\x00\x00\x00"

_HDR = struct.Struct(">BHBBL")  # 24-bit length as (byte, short), type, flags, stream id
_pack_hdr = _HDR.pack
_unpack_hdr = _HDR.unpack_from
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")


class TokenBucket:
    """``burst`` events at once, refilled at ``rate`` per second of the
    injected clock (the caller passes ``now``; sans-I/O code reads no clock)."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.last: float | None = None

    def take(self, now: float) -> bool:
        """Spend one token; False when none is left (the limit is exceeded)."""
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class ProtocolError(Exception):
    """A connection error (RFC 9113 5.4.1): the connection must end."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


# --- Events -------------------------------------------------------------------


class Event:
    __slots__ = ()


class RequestReceived(Event):
    """A new stream: its decoded request headers (str pairs, in order)."""

    __slots__ = ("stream_id", "headers", "end_stream")

    def __init__(self, stream_id: int, headers: list[tuple[str, str]], end_stream: bool):
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream = end_stream

    def __repr__(self) -> str:
        return f"RequestReceived({self.stream_id}, {self.headers!r}, end_stream={self.end_stream})"


class DataReceived(Event):
    """Body bytes of a stream; ``end_stream`` set on the last one (request
    trailers are reported as empty data with end_stream=True)."""

    __slots__ = ("stream_id", "data", "end_stream")

    def __init__(self, stream_id: int, data: bytes, end_stream: bool):
        self.stream_id = stream_id
        self.data = data
        self.end_stream = end_stream

    def __repr__(self) -> str:
        return f"DataReceived({self.stream_id}, <{len(self.data)} bytes>, end_stream={self.end_stream})"


class StreamReset(Event):
    """The stream ended abnormally: the peer reset it, or we did on a stream
    error (``remote`` False). The stream is gone."""

    __slots__ = ("stream_id", "error_code", "remote")

    def __init__(self, stream_id: int, error_code: int, remote: bool = True):
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote = remote

    def __repr__(self) -> str:
        return f"StreamReset({self.stream_id}, {self.error_code}, remote={self.remote})"


class GoAwayReceived(Event):
    """The peer will open no more streams (ours above last_stream_id are dead)."""

    __slots__ = ("error_code", "last_stream_id")

    def __init__(self, error_code: int, last_stream_id: int):
        self.error_code = error_code
        self.last_stream_id = last_stream_id


class ConnectionTerminated(Event):
    """A connection error: GOAWAY has been queued; flush and close the socket."""

    __slots__ = ("error_code", "reason")

    def __init__(self, error_code: int, reason: str):
        self.error_code = error_code
        self.reason = reason

    def __repr__(self) -> str:
        return f"ConnectionTerminated({self.error_code}, {self.reason!r})"


# --- Frame reading ------------------------------------------------------------


class FrameReader:
    """Splits a byte stream into (type, flags, stream_id, payload) frames.

    Checks the client preface first. Raises ProtocolError on a bad preface or
    a frame larger than ``max_frame_size`` (before buffering its payload).
    """

    __slots__ = ("_buf", "_preface", "max_frame_size")

    def __init__(self, max_frame_size: int = LOCAL_MAX_FRAME_SIZE, expect_preface: bool = True):
        self._buf = bytearray()
        self._preface = expect_preface
        self.max_frame_size = max_frame_size

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        buf = self._buf
        if not buf and not self._preface and type(data) is bytes:
            # Nothing left over from the last read (the usual case): frames
            # are sliced from the read itself (one copy of each payload, not
            # three), and only an incomplete tail is kept.
            frames, pos = self._split(data, 0)
            if pos < len(data):
                buf += data[pos:] if pos else data
            return frames
        buf += data
        pos = 0
        n = len(buf)
        if self._preface:
            if n < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    raise ProtocolError(PROTOCOL_ERROR, "invalid connection preface")
                return []
            if buf[: len(PREFACE)] != PREFACE:
                raise ProtocolError(PROTOCOL_ERROR, "invalid connection preface")
            self._preface = False
            pos = len(PREFACE)
        frames, pos = self._split(buf, pos)
        if pos:
            del buf[:pos]
        return frames

    def _split(self, data: bytes | bytearray, pos: int) -> tuple[list[tuple[int, int, int, bytes]], int]:
        """The whole frames in ``data`` from ``pos``, and where the rest begins."""
        frames: list[tuple[int, int, int, bytes]] = []
        n = len(data)
        max_size = self.max_frame_size
        while n - pos >= 9:
            hi, lo, ftype, flags, sid = _unpack_hdr(data, pos)
            length = (hi << 16) | lo
            if length > max_size:
                raise ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE {max_size}")
            end = pos + 9 + length
            if end > n:
                break
            payload = data[pos + 9 : end]
            frames.append((ftype, flags, sid & 0x7FFFFFFF, payload if type(payload) is bytes else bytes(payload)))
            pos = end
        return frames, pos

    @property
    def buffered(self) -> int:
        return len(self._buf)


# --- Frame writing --------------------------------------------------------------


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _pack_hdr(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


def settings_frame(settings: Iterable[tuple[int, int]]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings))


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream_frame(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway_frame(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">LL", last_stream_id, code) + debug)


def ping_frame(opaque: bytes, ack: bool = False) -> bytes:
    return frame(PING, FLAG_ACK if ack else 0, 0, opaque)


# --- Stateless HPACK encoding (literal without indexing, no Huffman) -------------


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: RFC 7541 Appendix A static-table indexes of the names we send.
_STATIC_NAME_INDEX = {":status": 8, "content-type": 31}


def encode_headers(headers: Iterable[tuple[str, str]]) -> bytes:
    """HPACK block using only 'literal without indexing' (and the static
    ':status: 200'), so it never touches the dynamic table: the encoder is
    stateless and a block can be computed once and reused on any connection."""
    out = bytearray()
    for name, value in headers:
        if name == ":status" and value == "200":
            out.append(0x88)
            continue
        v = value.encode("latin-1") if isinstance(value, str) else value
        idx = _STATIC_NAME_INDEX.get(name)
        if idx is not None:
            out += _hpack_int(idx, 4)
        else:
            n = name.encode("ascii") if isinstance(name, str) else name
            out.append(0)
            out += _hpack_int(len(n), 7)
            out += n
        out += _hpack_int(len(v), 7)
        out += v
    return bytes(out)


# --- Byte-at-a-time Huffman decoding ---------------------------------------------
#
# hpack's decoder walks its Huffman state machine a nibble at a time, two table
# lookups and a bytearray append per input byte: ~0.5 us per byte, 7.5 ms of
# CPU for one 12 KB header block of random values (the "16k streams x 15 KB
# headers" flood cost 62.7 s). Composing two nibble steps gives one lookup
# per byte into a 256-states x 256-bytes table of (next state, emitted bytes),
# built once from hpack's own table (so the two cannot disagree), ~5x faster.

_HUFF_FAIL_STATE = 256  # absorbing state after an invalid code (EOS in the data)


def _build_byte_table() -> tuple[list[tuple[int, bytes]], list[bool]]:
    nib = _hufftab.HUFFMAN_TABLE
    emit_flag, fail_flag, complete = _hufftab.HUFFMAN_EMIT_SYMBOL, _hufftab.HUFFMAN_FAIL, _hufftab.HUFFMAN_COMPLETE
    # Whether a string may end in a state is a property of the state (the
    # bits since the last symbol are a prefix of EOS, at most 7 of them).
    accept = [False] * 257
    accept[0] = True
    for s, flags, _ in nib:
        if flags & complete and not flags & fail_flag:
            accept[s] = True
    table: list[tuple[int, bytes]] = []
    for state in range(257):
        for byte in range(256):
            s, out, ok = state, bytearray(), state != _HUFF_FAIL_STATE
            for nibble in (byte >> 4, byte & 0xF):
                if not ok:
                    break
                s, flags, sym = nib[s * 16 + nibble]
                if flags & fail_flag:
                    ok = False
                elif flags & emit_flag:
                    out.append(sym)
            table.append(((s << 8) if ok else (_HUFF_FAIL_STATE << 8), bytes(out)))
    return table, accept


_HUFF_TABLE, _HUFF_ACCEPT = _build_byte_table()


def decode_huffman(data: bytes | bytearray | memoryview | None) -> bytes:
    """RFC 7541 5.2 Huffman decoding, equal to ``hpack``'s (same errors)."""
    if not data:
        return b""
    table = _HUFF_TABLE
    base = 0
    parts = []
    append = parts.append
    for byte in bytes(data):
        base, out = table[base | byte]
        append(out)
    state = base >> 8
    if state == _HUFF_FAIL_STATE:
        raise HPACKDecodingError("Invalid Huffman string")
    if not _HUFF_ACCEPT[state]:
        raise HPACKDecodingError("Incomplete Huffman string")
    return b"".join(parts)


# hpack's Decoder looks the function up in its module at every literal.
hpack.hpack.decode_huffman = decode_huffman


class _CountingHeaderTable(HeaderTable):
    """hpack's dynamic table, counting every modification (insertion, size
    update) so the decoded-block cache knows when an entry may be stale."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.generation += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


# --- Connection state -----------------------------------------------------------


class _Stream:
    __slots__ = ("sid", "send_window", "recv_unacked", "recv_window", "remote_closed", "local_closed", "pending", "headers_done",
                 "answered")

    def __init__(self, sid: int, send_window: int):
        self.sid = sid
        self.send_window = send_window
        self.recv_window = LOCAL_INITIAL_WINDOW
        self.recv_unacked = 0
        self.remote_closed = False
        self.local_closed = False
        self.pending: list | None = None  # queued (is_data, bytes, end_stream) awaiting window
        self.headers_done = False  # request headers received (next HEADERS = trailers)
        self.answered = False  # we sent response headers (a reset after that is not Rapid Reset)


class H2ServerConnection:
    """Server side of one HTTP/2 connection, sans-I/O."""

    def __init__(
        self,
        *,
        max_concurrent_streams: int = LOCAL_MAX_CONCURRENT_STREAMS,
        max_header_list_size: int = LOCAL_MAX_HEADER_LIST_SIZE,
    ):
        self._reader = FrameReader(LOCAL_MAX_FRAME_SIZE)
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._decoder.max_allowed_table_size = LOCAL_HEADER_TABLE_SIZE
        self._table = self._decoder.header_table = _CountingHeaderTable()
        self._hcache: dict[bytes, tuple[int, list[tuple[str, str]], bool]] = {}
        self._out = bytearray()
        self.streams: dict[int, _Stream] = {}
        self._max_concurrent = max_concurrent_streams
        self.highest_stream_id = 0
        # Outbound (what the peer lets us send).
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.peer_initial_window = DEFAULT_WINDOW
        self.send_window = DEFAULT_WINDOW
        self._blocked: dict[int, _Stream] = {}  # streams with queued output, insertion-ordered
        # Inbound.
        self._recv_window = DEFAULT_WINDOW + (LOCAL_CONNECTION_WINDOW - DEFAULT_WINDOW)
        self._recv_unacked = 0
        self._cont: tuple[int, int, bytearray] | None = None  # (sid, flags of HEADERS, fragment)
        self._continuations = 0  # CONTINUATION frames of the header block in _cont
        self._got_settings = False
        # Flood limits (extproc.serve.limits H2_*); ``now`` comes from receive_data.
        self._now = 0.0
        self._settings_bucket = TokenBucket(H2_SETTINGS_RATE_PER_S, H2_SETTINGS_BURST)
        self._reset_bucket = TokenBucket(H2_RESET_RATE_PER_S, H2_RESET_BURST)
        self._empty_frames = 0  # consecutive empty DATA frames without END_STREAM
        self.pending_control = 0  # control frames queued since the output last drained
        self._recent_resets: OrderedDict[int, None] = OrderedDict()  # reset by us, peer still sending
        # Lifecycle.
        self.closed = False  # connection error or final GOAWAY with nothing left
        self.peer_goaway = False
        self.draining = False  # first GOAWAY sent
        self.last_stream_id: int | None = None  # final GOAWAY sent: streams above are refused
        self._out += settings_frame(
            (
                (SETTINGS_MAX_CONCURRENT_STREAMS, max_concurrent_streams),
                (SETTINGS_INITIAL_WINDOW_SIZE, LOCAL_INITIAL_WINDOW),
                (SETTINGS_MAX_FRAME_SIZE, LOCAL_MAX_FRAME_SIZE),
                (SETTINGS_MAX_HEADER_LIST_SIZE, max_header_list_size),
                (SETTINGS_ENABLE_PUSH, 0),
            )
        )
        self._out += window_update_frame(0, LOCAL_CONNECTION_WINDOW - DEFAULT_WINDOW)

    # -- output -------------------------------------------------------------

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- input --------------------------------------------------------------

    def output_drained(self) -> None:
        """The I/O shell says everything we sent so far has left its write
        buffer: the control frames we owed the peer are delivered."""
        self.pending_control = 0

    def _queue_control(self, data: bytes) -> None:
        """Queue a control frame the peer's input made us owe it (PING or
        SETTINGS ACK, RST_STREAM); a peer that keeps asking while not reading
        the replies is cut off (Envoy's max_outbound_control_frames)."""
        self._out += data
        self.pending_control += 1
        if self.pending_control > H2_MAX_PENDING_CONTROL_FRAMES:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"more than {H2_MAX_PENDING_CONTROL_FRAMES} control frames pending")

    def receive_data(self, data: bytes, now: float = 0.0) -> list[Event]:
        """Feed bytes from the socket; returns the events they produced.
        ``now`` (seconds, any monotonic origin) feeds the rate limits."""
        events: list[Event] = []
        if self.closed:
            return events
        self._now = now
        try:
            frames = self._reader.feed(data)
            for ftype, flags, sid, payload in frames:
                self._handle_frame(ftype, flags, sid, payload, events)
                if self.closed:
                    break
        except ProtocolError as e:
            self._connection_error(e.code, e.reason, events)
        except Exception as e:  # never let a malformed frame crash the process
            self._connection_error(INTERNAL_ERROR, f"internal error: {e!r}", events)
        return events

    def _connection_error(self, code: int, reason: str, events: list[Event]) -> None:
        if self.closed:
            return
        self._out += goaway_frame(self.highest_stream_id, code, reason.encode("utf-8", "replace")[:256])
        self.closed = True
        for sid in list(self.streams):
            events.append(StreamReset(sid, code, remote=False))
        self.streams.clear()
        self._blocked.clear()
        events.append(ConnectionTerminated(code, reason))

    def _handle_frame(self, ftype: int, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if self._cont is not None and ftype != CONTINUATION:
            raise ProtocolError(PROTOCOL_ERROR, "expected CONTINUATION")
        if not self._got_settings:
            if ftype != SETTINGS or flags & FLAG_ACK:
                raise ProtocolError(PROTOCOL_ERROR, "first frame must be SETTINGS")
            self._got_settings = True
        if ftype == DATA:
            self._on_data(flags, sid, payload, events)
        elif ftype == HEADERS:
            self._on_headers(flags, sid, payload, events)
        elif ftype == CONTINUATION:
            self._on_continuation(flags, sid, payload, events)
        elif ftype == RST_STREAM:
            self._on_rst_stream(sid, payload, events)
        elif ftype == SETTINGS:
            self._on_settings(flags, sid, payload)
        elif ftype == PING:
            if sid != 0:
                raise ProtocolError(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise ProtocolError(FRAME_SIZE_ERROR, "PING payload is not 8 bytes")
            if not flags & FLAG_ACK:
                self._queue_control(ping_frame(payload, ack=True))
            elif payload == DRAIN_PING and self.draining and self.last_stream_id is None:
                self.finish_drain()
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(sid, payload, events)
        elif ftype == GOAWAY:
            if sid != 0:
                raise ProtocolError(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise ProtocolError(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
            last, code = struct.unpack_from(">LL", payload)
            self.peer_goaway = True
            events.append(GoAwayReceived(code, last & 0x7FFFFFFF))
        elif ftype == PRIORITY:
            if sid == 0:
                raise ProtocolError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._stream_error(sid, FRAME_SIZE_ERROR, events)
        elif ftype == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # Unknown frame types are ignored (RFC 9113 4.1 / 5.5).

    def _strip_padding(self, flags: int, payload: bytes) -> bytes:
        if flags & FLAG_PADDED:
            if not payload:
                raise ProtocolError(FRAME_SIZE_ERROR, "PADDED frame without pad length")
            pad = payload[0]
            if pad >= len(payload):
                raise ProtocolError(PROTOCOL_ERROR, "padding exceeds the frame payload")
            return payload[1 : len(payload) - pad]
        return payload

    def _on_data(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        n = len(payload)
        if n or flags & FLAG_END_STREAM:
            self._empty_frames = 0
        else:
            self._empty_frames += 1
            if self._empty_frames > H2_MAX_CONSECUTIVE_EMPTY_FRAMES:
                raise ProtocolError(ENHANCE_YOUR_CALM, "too many consecutive empty DATA frames")
        # Connection flow control counts every DATA byte (padding included),
        # even on streams we have closed (RFC 9113 6.9).
        self._recv_window -= n
        if self._recv_window < 0:
            raise ProtocolError(FLOW_CONTROL_ERROR, "peer overran the connection window")
        self._recv_unacked += n
        if self._recv_unacked >= LOCAL_CONNECTION_WINDOW * WINDOW_UPDATE_RATIO:
            self._out += window_update_frame(0, self._recv_unacked)
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0
        data = self._strip_padding(flags, payload)
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.highest_stream_id:
                raise ProtocolError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a stream we already closed or reset: ignore (RFC 9113 5.1)
        if stream.remote_closed:
            self._stream_error(sid, STREAM_CLOSED, events)
            return
        stream.recv_window -= n
        if stream.recv_window < 0:
            self._stream_error(sid, FLOW_CONTROL_ERROR, events)
            return
        end = bool(flags & FLAG_END_STREAM)
        if end:
            stream.remote_closed = True
        else:
            stream.recv_unacked += n
            if stream.recv_unacked >= LOCAL_INITIAL_WINDOW * WINDOW_UPDATE_RATIO:
                self._out += window_update_frame(sid, stream.recv_unacked)
                stream.recv_window += stream.recv_unacked
                stream.recv_unacked = 0
        events.append(DataReceived(sid, data, end))
        if end and stream.local_closed:
            self._forget(sid)

    def _on_headers(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._strip_padding(flags, payload)
        if flags & FLAG_PRIORITY:
            if len(block) < 5:
                raise ProtocolError(FRAME_SIZE_ERROR, "HEADERS priority fields truncated")
            if (_U32.unpack_from(block)[0] & 0x7FFFFFFF) == sid:
                raise ProtocolError(PROTOCOL_ERROR, "stream depends on itself")
            block = block[5:]
        if flags & FLAG_END_HEADERS:
            self._on_header_block(flags, sid, block, events)
        else:
            if len(block) > MAX_HEADER_BLOCK_BYTES:
                raise ProtocolError(ENHANCE_YOUR_CALM, "header block too large")
            self._cont = (sid, flags, bytearray(block))
            self._continuations = 0

    def _on_continuation(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if self._cont is None or self._cont[0] != sid:
            raise ProtocolError(PROTOCOL_ERROR, "unexpected CONTINUATION")
        _, hflags, buf = self._cont
        self._continuations += 1
        if self._continuations > H2_MAX_CONTINUATIONS:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"more than {H2_MAX_CONTINUATIONS} CONTINUATION frames in a header block")
        buf += payload
        if len(buf) > MAX_HEADER_BLOCK_BYTES:
            raise ProtocolError(ENHANCE_YOUR_CALM, "header block too large")
        if flags & FLAG_END_HEADERS:
            self._cont = None
            self._on_header_block(hflags, sid, bytes(buf), events)

    def _decode(self, block: bytes) -> tuple[list[tuple[str, str]], bool]:
        """HPACK-decode with a cache: a block that did not modify the dynamic
        table decodes to the same list as long as the table has not changed
        since (the table counts its modifications), so a repeated block costs
        a dict lookup. Returned lists are shared: callers must not mutate them.
        Also returns whether the list is valid request headers (cached too)."""
        table = self._table
        hit = self._hcache.get(block)
        if hit is not None and hit[0] == table.generation:
            return hit[1], hit[2]
        before = table.generation
        try:
            headers = self._decoder.decode(block)
        except (HPACKError, InvalidTableIndex, UnicodeDecodeError, IndexError, ValueError) as e:
            raise ProtocolError(COMPRESSION_ERROR, f"HPACK decoding failed: {e}") from None
        valid = _valid_request_headers(headers)
        if table.generation == before:
            if len(self._hcache) >= HEADER_CACHE_ENTRIES:
                self._hcache.clear()
            self._hcache[block] = (before, headers, valid)
        return headers, valid

    def _on_header_block(self, flags: int, sid: int, block: bytes, events: list[Event]) -> None:
        # Always decode, even for streams we will ignore: the HPACK dynamic
        # table must follow the peer's encoder.
        headers, valid = self._decode(block)
        end = bool(flags & FLAG_END_STREAM)
        stream = self.streams.get(sid)
        if stream is not None:  # trailers
            if stream.remote_closed:
                self._stream_error(sid, STREAM_CLOSED, events)
                return
            if not end:
                self._stream_error(sid, PROTOCOL_ERROR, events)
                return
            stream.remote_closed = True
            events.append(DataReceived(sid, b"", True))
            if stream.local_closed:
                self._forget(sid)
            return
        if sid % 2 == 0:
            raise ProtocolError(PROTOCOL_ERROR, f"client opened even stream {sid}")
        if sid <= self.highest_stream_id:
            # Late trailers of a stream we reset are ignored (RFC 9113 5.1);
            # any other HEADERS on an old stream ID reuses it (5.1.1).
            if end and sid in self._recent_resets:
                return
            raise ProtocolError(PROTOCOL_ERROR, f"HEADERS on closed stream {sid} (stream IDs must increase)")
        self.highest_stream_id = sid
        if self.last_stream_id is not None or self.peer_goaway or self.closed:
            self._refuse(sid, REFUSED_STREAM, end)
            return
        if len(self.streams) >= self._max_concurrent:
            self._refuse(sid, REFUSED_STREAM, end)
            return
        if not valid:
            self._refuse(sid, PROTOCOL_ERROR, end)
            return
        stream = _Stream(sid, self.peer_initial_window)
        stream.headers_done = True
        stream.remote_closed = end
        self.streams[sid] = stream
        events.append(RequestReceived(sid, headers, end))

    def _refuse(self, sid: int, code: int, end: bool) -> None:
        self._queue_control(rst_stream_frame(sid, code))
        if not end:
            self._remember_reset(sid)

    def _remember_reset(self, sid: int) -> None:
        recent = self._recent_resets
        recent[sid] = None
        if len(recent) > RECENT_RESETS:
            recent.popitem(last=False)

    def _on_rst_stream(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise ProtocolError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "RST_STREAM payload is not 4 bytes")
        if sid > self.highest_stream_id:
            raise ProtocolError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        stream = self.streams.get(sid)
        if stream is not None:
            # Reset before we answered: the Rapid Reset pattern when frequent.
            # (Envoy resets answered streams too, when its client goes away.)
            if not stream.answered and not self._reset_bucket.take(self._now):
                raise ProtocolError(ENHANCE_YOUR_CALM, "too many streams reset by the client (rapid reset)")
            self._forget(sid)
            events.append(StreamReset(sid, _U32.unpack(payload)[0], remote=True))

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if payload:
                raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
        if len(payload) > 6 * H2_MAX_SETTINGS_PER_FRAME:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"more than {H2_MAX_SETTINGS_PER_FRAME} entries in a SETTINGS frame")
        if not self._settings_bucket.take(self._now):
            raise ProtocolError(ENHANCE_YOUR_CALM, "too many SETTINGS frames")
        window = None
        for off in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, off)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                window = value  # applied once below: the last value is what counts
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
                    raise ProtocolError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame_size = value
            elif key == SETTINGS_ENABLE_PUSH:
                if value > 1:
                    raise ProtocolError(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
            # HEADER_TABLE_SIZE: our encoder never indexes, nothing to do.
            # MAX_CONCURRENT_STREAMS / MAX_HEADER_LIST_SIZE: we never push;
            # our response headers are tiny. Unknown settings are ignored.
        if window is not None and window != self.peer_initial_window:
            # One pass over the open streams per frame, whatever the entries.
            delta = window - self.peer_initial_window
            self.peer_initial_window = window
            for s in self.streams.values():
                s.send_window += delta
                if s.send_window > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "stream window overflow")
        self._queue_control(frame(SETTINGS, FLAG_ACK, 0))
        self._flush_blocked()

    def _on_window_update(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
        inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window overflow")
            self._flush_blocked()
            return
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.highest_stream_id:
                raise ProtocolError(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return
        if inc == 0:
            self._stream_error(sid, PROTOCOL_ERROR, events)
            return
        stream.send_window += inc
        if stream.send_window > MAX_WINDOW:
            self._stream_error(sid, FLOW_CONTROL_ERROR, events)
            return
        if stream.pending:
            self._flush_stream(stream)

    def _stream_error(self, sid: int, code: int, events: list[Event]) -> None:
        self._queue_control(rst_stream_frame(sid, code))
        stream = self.streams.get(sid)
        if stream is not None and not stream.remote_closed:
            self._remember_reset(sid)
        if stream is not None:
            self._forget(sid)
            events.append(StreamReset(sid, code, remote=False))

    def _forget(self, sid: int) -> None:
        self.streams.pop(sid, None)
        self._blocked.pop(sid, None)

    # -- sending ------------------------------------------------------------

    def send_headers(self, sid: int, block: bytes, end_stream: bool = False) -> None:
        """Send a pre-encoded HPACK block (see ``encode_headers``). Trailers
        wait behind queued DATA of the same stream."""
        stream = self.streams.get(sid)
        if stream is None or stream.local_closed:
            return
        stream.answered = True
        if end_stream:
            stream.local_closed = True
        if stream.pending:
            stream.pending.append((False, block, end_stream))
        else:
            self._write_headers(sid, block, end_stream)
        if end_stream and stream.remote_closed and not stream.pending:
            self._forget(sid)

    def _write_headers(self, sid: int, block: bytes, end_stream: bool) -> None:
        max_size = self.peer_max_frame_size
        flags = FLAG_END_STREAM if end_stream else 0
        if len(block) <= max_size:
            self._out += frame(HEADERS, flags | FLAG_END_HEADERS, sid, block)
            return
        self._out += frame(HEADERS, flags, sid, block[:max_size])
        pos = max_size
        while pos < len(block):
            chunk = block[pos : pos + max_size]
            pos += max_size
            self._out += frame(CONTINUATION, FLAG_END_HEADERS if pos >= len(block) else 0, sid, chunk)

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        """Send DATA within the peer's windows; the rest is queued and sent
        when WINDOW_UPDATE / SETTINGS open them."""
        stream = self.streams.get(sid)
        if stream is None or stream.local_closed:
            return
        if end_stream:
            stream.local_closed = True
        if stream.pending is None:
            stream.pending = []
        stream.pending.append((True, data, end_stream))
        self._flush_stream(stream)

    def send_response(self, sid: int, headers: bytes, data: bytes, trailers: bytes) -> bool:
        """Answer a stream not answered yet, whole, and close our side:
        HEADERS, one DATA, trailers (END_STREAM), and RST_STREAM(NO_ERROR) if
        the peer is still sending (RFC 9113 8.1), written in one go. The hot
        path of a gRPC call that ends with its first answer (most ext_proc
        streams): the same frames as send_headers + send_data +
        send_headers(end_stream) + reset_stream. False, with nothing sent,
        when it does not apply (the stream is gone, answered or has output
        queued; a window or the frame size is too small for the data; a
        block needs CONTINUATION): the caller then makes those calls."""
        stream = self.streams.get(sid)
        n = len(data)
        max_size = self.peer_max_frame_size
        if (stream is None or stream.answered or stream.local_closed or stream.pending or n > max_size
                or n > stream.send_window or n > self.send_window
                or len(headers) > max_size or len(trailers) > max_size):
            return False
        stream.answered = True
        stream.local_closed = True
        stream.send_window -= n
        self.send_window -= n
        nh, nt = len(headers), len(trailers)
        out = (_pack_hdr(nh >> 16, nh & 0xFFFF, HEADERS, FLAG_END_HEADERS, sid) + headers
               + _pack_hdr(n >> 16, n & 0xFFFF, DATA, 0, sid) + data
               + _pack_hdr(nt >> 16, nt & 0xFFFF, HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, sid) + trailers)
        if not stream.remote_closed:
            out += rst_stream_frame(sid, NO_ERROR)
            self._remember_reset(sid)
        self._out += out
        self._forget(sid)
        return True

    def _flush_stream(self, stream: _Stream) -> None:
        pending = stream.pending
        sid = stream.sid
        while pending:
            is_data, payload, end = pending[0]
            if not is_data:
                self._write_headers(sid, payload, end)
                pending.pop(0)
                continue
            max_size = self.peer_max_frame_size
            while True:
                allowed = min(stream.send_window, self.send_window, max_size)
                if len(payload) <= allowed or not payload:  # empty DATA costs no window
                    self._out += frame(DATA, FLAG_END_STREAM if end else 0, sid, payload)
                    stream.send_window -= len(payload)
                    self.send_window -= len(payload)
                    pending.pop(0)
                    break
                if allowed <= 0:
                    pending[0] = (True, payload, end)
                    self._blocked[sid] = stream
                    return
                self._out += frame(DATA, 0, sid, payload[:allowed])
                stream.send_window -= allowed
                self.send_window -= allowed
                payload = payload[allowed:]
        self._blocked.pop(sid, None)
        if stream.local_closed and stream.remote_closed:
            self._forget(sid)

    def _flush_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self.send_window <= 0:
                return
            self._flush_stream(stream)

    def reset_stream(self, sid: int, code: int = CANCEL) -> None:
        """RST_STREAM a stream (e.g. after our trailers with the request still
        open: NO_ERROR tells the peer to stop sending, RFC 9113 8.1)."""
        stream = self.streams.get(sid)
        if stream is not None or (0 < sid <= self.highest_stream_id):
            self._out += rst_stream_frame(sid, code)
            if stream is None or not stream.remote_closed:
                self._remember_reset(sid)
        self._forget(sid)

    def pending_output(self, sid: int) -> bool:
        s = self.streams.get(sid)
        return bool(s and s.pending)

    # -- shutdown -----------------------------------------------------------

    def start_drain(self) -> None:
        """Graceful shutdown, step 1: GOAWAY(2^31-1, NO_ERROR) tells the peer to
        stop opening streams; the PING's ACK proves it saw it. Streams it opened
        meanwhile are still served (like grpc-go and nghttp2's two-step GOAWAY)."""
        if self.draining or self.closed:
            return
        self.draining = True
        self._out += goaway_frame(MAX_WINDOW, NO_ERROR)
        self._out += ping_frame(DRAIN_PING)

    def finish_drain(self) -> None:
        """Step 2: the final GOAWAY naming the last stream we will process."""
        if self.last_stream_id is not None or self.closed:
            return
        self.draining = True
        self.last_stream_id = self.highest_stream_id
        self._out += goaway_frame(self.last_stream_id, NO_ERROR)

    def close(self, code: int = NO_ERROR, reason: str = "") -> None:
        """Immediate close: GOAWAY(code); the caller closes the socket."""
        if self.closed:
            return
        self._out += goaway_frame(self.highest_stream_id, code, reason.encode()[:256])
        self.closed = True
        self.streams.clear()
        self._blocked.clear()

    @property
    def idle(self) -> bool:
        return not self.streams

    @property
    def preface_received(self) -> bool:
        """The client's preface and first SETTINGS have arrived."""
        return self._got_settings


def _valid_request_headers(headers: list[tuple[str, str]]) -> bool:
    """RFC 9113 8.3: pseudo-headers first, known, not repeated; :method and
    :path present; no uppercase or connection-specific fields."""
    seen_regular = False
    pseudo: set[str] = set()
    for name, value in headers:
        if name.startswith(":"):
            if seen_regular or name in pseudo or name not in (":method", ":path", ":scheme", ":authority"):
                return False
            pseudo.add(name)
        else:
            seen_regular = True
            if name != name.lower() or name in ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"):
                return False
            if name == "te" and value != "trailers":
                return False
    return ":method" in pseudo and ":path" in pseudo

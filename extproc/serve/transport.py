"""gRPC transports for the ext_proc service.

Two interchangeable servers with one signature:

* ``serve_fast``: a purpose-built gRPC-over-h2c server on asyncio
  (``asyncio.Protocol`` + the sans-I/O ``extproc.serve.h2frames``). It costs a
  fraction of grpc.aio's CPU per stream (docs/bench.md), which is what the
  router's throughput is made of: every routed request is one short stream.
* ``serve_grpcio``: the same service on grpc.aio, the reference baseline and
  fallback.

Both call the router's per-stream state machine (``StreamHandler``): one
handler per ext_proc stream; ``receive`` returns the responses to send and
whether to close the stream with OK right after them.

What ``serve_fast`` implements of gRPC (PROTOCOL-HTTP2.md): 5-byte message
framing, uncompressed messages only (a compressed one gets UNIMPLEMENTED, an
unknown grpc-encoding the same, as the spec asks), trailers with grpc-status
and percent-encoded grpc-message, trailers-only error responses, a max
message size (RESOURCE_EXHAUSTED), unknown method -> UNIMPLEMENTED, non-gRPC
content-type -> HTTP 415, grpc-timeout deadlines (DEADLINE_EXCEEDED), client
cancellation (RST_STREAM -> ``handler.abort()``), and the unary
``grpc.health.v1.Health/Check`` that Envoy's gRPC health checker calls.

Limits of ``serve_fast`` (extproc.defaults, "HTTP/2 transport limits"): the
flood limits of h2frames, fed this shell's clock; reading paused while the
write buffer is above its high-water mark; connections per worker (the
longest-idle one evicted first); preface and idle timeouts; and a per-process
memory budget for open streams and the bodies they hold, past which new
streams get RESOURCE_EXHAUSTED. ``FastServer.counters`` counts what they did.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable, Iterable, Mapping, Protocol
from urllib.parse import quote

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2

from ..defaults import (
    H2_FD_RESERVE,
    H2_IDLE_TIMEOUT_S,
    H2_MAX_CONNECTIONS,
    H2_MEMORY_BUDGET_BYTES,
    H2_PREFACE_TIMEOUT_S,
    H2_STREAM_COST_BYTES,
    H2_WRITE_BUFFER_HIGH_WATER,
)
from ..tls import TlsFiles, grpc_server_credentials, server_context
from . import h2frames as h2

log = logging.getLogger("extproc.transport")

PROCESS_METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
HEALTH_WATCH_METHOD = "/grpc.health.v1.Health/Watch"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

#: Health services answered SERVING by default: "" (the whole server, what
#: Envoy's grpc_health_check asks when no service_name is set) and ext_proc.
DEFAULT_HEALTH_SERVICES = ("", EXT_PROC_SERVICE)

# gRPC status codes (grpc/doc/statuscodes.md).
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14

#: Until the stop() grace period starts counting, how long we wait for the
#: ACK of the drain PING before sending the final GOAWAY anyway. 1 s is far
#: above a loopback/pod RTT; grpc-go waits for the ACK with no timer but
#: bounds the whole drain, as stop() does here.
DRAIN_PING_TIMEOUT_S = 1.0

#: Connection-level warnings (refused connections, GOAWAYs for floods) are
#: logged at most once per this many seconds per kind, with a count of those
#: left out, so an attack costs a log line per second, not a log flood
#: (Envoy's ENVOY_LOG_PERIODIC has the same 1 s period).
LOG_PERIOD_S = 1.0

#: Shortest re-arm of the idle-connection timer: it never spins on a clock
#: that has not moved.
MIN_TIMER_S = 0.05

#: Largest grpc-timeout we honour as a deadline (the header allows 8 digits
#: of hours). Anything longer is treated as no deadline; 1 day is beyond any
#: ext_proc stream, whose lifetime is one HTTP request.
MAX_DEADLINE_S = 86_400.0


class StreamHandler(Protocol):
    def receive(self, req: pb.ProcessingRequest) -> tuple[list[pb.ProcessingResponse], bool]: ...
    def abort(self) -> None: ...
    def finish(self) -> None: ...


#: ``new_stream(metadata)``: ``metadata`` holds the call's trace-context
#: headers (traceparent, tracestate) when the client sent them: Envoy puts
#: the context of its ext_proc span there, so the router's span can be its child.
NewStream = Callable[..., StreamHandler]

#: Extra methods served beside Process and Health/Check (the admin API and
#: reflection). A unary method maps its request bytes to (grpc status code,
#: message, response bytes); a streaming one maps each request message to one
#: response message and ends with OK when the client half-closes.
UnaryMethod = Callable[[bytes], tuple[int, str, bytes]]
StreamingMethod = Callable[[bytes], bytes]

#: gRPC call headers passed to new_stream (W3C trace context).
TRACE_METADATA = ("traceparent", "tracestate")

# --- precomputed header blocks (stateless HPACK, see h2frames.encode_headers) ---

_RESPONSE_HEADERS = h2.encode_headers(
    [(":status", "200"), ("content-type", "application/grpc"), ("grpc-accept-encoding", "identity")]
)
_TRAILERS_OK = h2.encode_headers([("grpc-status", "0")])
_HTTP_415 = h2.encode_headers([(":status", "415"), ("content-type", "text/plain")])
_HEALTH_RESPONSES = {
    status: (lambda b: len(b).to_bytes(5, "big") + b)(health_pb2.HealthCheckResponse(status=status).SerializeToString())
    for status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
}


def _status_block(code: int, message: str, *, trailers_only: bool) -> bytes:
    fields = []
    if trailers_only:
        fields += [(":status", "200"), ("content-type", "application/grpc")]
    fields.append(("grpc-status", str(code)))
    if message:
        # grpc-message is percent-encoded UTF-8 (PROTOCOL-HTTP2.md).
        fields.append(("grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")))
    return h2.encode_headers(fields)


def _parse_timeout(value: str) -> float | None:
    """grpc-timeout: up to 8 digits + unit (H M S m u n)."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    scale = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}.get(value[-1])
    if scale is None:
        return None
    seconds = int(value[:-1]) * scale
    return seconds if seconds <= MAX_DEADLINE_S else None


# --- per-stream state -------------------------------------------------------------

_KIND_PROCESS = 0
_KIND_HEALTH = 1
_KIND_UNARY = 2
_KIND_STREAMING = 3


class _Call:
    __slots__ = ("sid", "kind", "handler", "buf", "headers_sent", "done", "timer", "messages", "encoding", "method",
                 "reserved", "held", "charged")

    def __init__(self, sid: int, kind: int):
        self.sid = sid
        self.kind = kind
        self.handler: StreamHandler | None = None
        self.buf = bytearray()
        self.headers_sent = False
        self.done = False
        self.timer: asyncio.TimerHandle | None = None
        self.messages: list[bytes] | None = None  # unary: the request message
        self.encoding: str | None = None  # grpc-encoding of the request
        self.method: Callable | None = None  # unary / streaming extra method
        self.reserved = 0  # memory budget taken by the message being reassembled
        self.held = 0  # memory budget taken by what the handler keeps (its held_bytes)
        self.charged = 0  # memory budget taken by the open stream itself (H2_STREAM_COST_BYTES)


class _GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection (Envoy keeps one per worker thread)."""

    def __init__(self, server: "FastServer"):
        self.server = server
        self.conn = h2.H2ServerConnection()
        self.calls: dict[int, _Call] = {}
        self.transport: asyncio.Transport | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None  # preface, then idle timeout
        self._loop = asyncio.get_running_loop()
        self.last_activity = self._loop.time()
        self._reading_paused = False

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if len(server._connections) >= server.max_connections and not server.evict_idle():
            # Over the cap, none idle to make room: GOAWAY and close, never an fd exhausted.
            server.count("connections_refused")
            server.warn("connections_refused", "refusing HTTP/2 connection: %d open (limit %d)",
                        len(server._connections), server.max_connections)
            self.conn.close(h2.ENHANCE_YOUR_CALM, "too many connections")
            transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]
            transport.close()
            return
        server._connections.add(self)
        transport.set_write_buffer_limits(high=server.write_buffer_high_water)  # type: ignore[attr-defined]
        transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]
        self._timer = self._loop.call_later(server.preface_timeout_s, self._on_timer)
        if server._draining:
            self.start_drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        if self._drain_timer:
            self._drain_timer.cancel()
        if self._timer:
            self._timer.cancel()
        for call in list(self.calls.values()):
            self._abort_call(call)
        self.calls.clear()
        self.server._connection_closed()

    def pause_writing(self) -> None:
        # Our write buffer is above the high-water mark: the peer is not
        # reading. Stop reading its requests (and control frames) until it does.
        if not self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = True
            self.server.count("reading_paused")
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    def _on_timer(self) -> None:
        """Preface timeout first; once the client's SETTINGS arrived, the idle
        timeout (no stream and no frame for idle_timeout_s)."""
        self._timer = None
        conn, server = self.conn, self.server
        if self.transport is None or self.transport.is_closing() or conn.closed:
            return
        if not conn.preface_received:
            server.count("preface_timeouts")
            server.warn("preface_timeouts", "closing HTTP/2 connection: no client preface within %.1f s",
                        server.preface_timeout_s)
            self._close(h2.PROTOCOL_ERROR, "no client preface")
            return
        now = self._loop.time()
        remaining = self.last_activity + server.idle_timeout_s - now
        if remaining <= 0 and not self.calls and conn.idle:
            server.count("idle_closed")
            log.debug("closing HTTP/2 connection idle for %.1f s", now - self.last_activity)
            self._close(h2.NO_ERROR, "idle timeout")
            return
        self._timer = self._loop.call_later(max(remaining, server.idle_timeout_s if remaining <= 0 else MIN_TIMER_S),
                                            self._on_timer)

    def evict(self) -> None:
        """Make room for a new connection (this one is idle: no stream)."""
        self.server._connections.discard(self)
        self.server.count("connections_evicted")
        self._close(h2.NO_ERROR, "idle connection evicted for a new one")

    def _close(self, code: int, reason: str) -> None:
        for call in list(self.calls.values()):
            self._fail(call, UNAVAILABLE, reason)
        self.calls.clear()
        self.conn.close(code, reason)
        self._flush()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        now = self.last_activity = self._loop.time()
        for ev in conn.receive_data(data, now):
            t = type(ev)
            if t is h2.DataReceived:
                call = self.calls.get(ev.stream_id)
                if call is not None:
                    self._on_data(call, ev.data, ev.end_stream)
            elif t is h2.RequestReceived:
                self._on_request(ev)
            elif t is h2.StreamReset:
                call = self.calls.pop(ev.stream_id, None)
                if call is not None:
                    self._abort_call(call)
            elif t is h2.ConnectionTerminated:
                key = f"goaway_{ev.error_code}"
                self.server.count(key)
                self.server.warn(key, "closing HTTP/2 connection: %s (code %d)", ev.reason, ev.error_code)
            # GoAwayReceived: in-flight streams continue; we close when idle.
        self._flush()

    # -- helpers -------------------------------------------------------------

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        transport = self.transport
        if transport is None:
            return
        conn = self.conn
        if out:
            transport.write(out)
            if conn.pending_control and not transport.get_write_buffer_size():
                conn.output_drained()
        if conn.closed or ((conn.last_stream_id is not None or conn.peer_goaway) and conn.idle):
            transport.close()

    def _release(self, call: _Call) -> None:
        """Give the call's share of the memory budget back."""
        if call.reserved or call.held or call.charged:
            self.server.mem_used -= call.reserved + call.held + call.charged
            call.reserved = call.held = call.charged = 0

    def _abort_call(self, call: _Call) -> None:
        call.done = True
        self._release(call)
        if call.timer:
            call.timer.cancel()
        if call.handler is not None:
            try:
                call.handler.abort()
            except Exception:
                log.exception("handler.abort() failed")

    def _end_call(self, call: _Call, code: int, message: str = "") -> None:
        """Send the status (trailers, or trailers-only) and end the stream; if
        the client is still sending, RST_STREAM(NO_ERROR) tells it to stop."""
        if call.done:
            return
        call.done = True
        self._release(call)
        if call.timer:
            call.timer.cancel()
        self.calls.pop(call.sid, None)
        conn = self.conn
        if code == OK and call.headers_sent:
            block = _TRAILERS_OK
        else:
            block = _status_block(code, message, trailers_only=not call.headers_sent)
        conn.send_headers(call.sid, block, end_stream=True)
        stream = conn.streams.get(call.sid)
        if stream is not None and not stream.remote_closed and not stream.pending:
            conn.reset_stream(call.sid, h2.NO_ERROR)

    def _fail(self, call: _Call, code: int, message: str) -> None:
        handler = call.handler
        call.handler = None
        self._end_call(call, code, message)
        if handler is not None:
            try:
                handler.abort()
            except Exception:
                log.exception("handler.abort() failed")

    # -- streams ---------------------------------------------------------------

    def _on_request(self, ev: h2.RequestReceived) -> None:
        sid = ev.stream_id
        path = method = ctype = encoding = timeout = None
        meta: dict[str, str] = {}
        for name, value in ev.headers:
            if name in TRACE_METADATA:
                meta[name] = value
            elif name == ":path":
                path = value
            elif name == ":method":
                method = value
            elif name == "content-type":
                ctype = value
            elif name == "grpc-encoding":
                encoding = value
            elif name == "grpc-timeout":
                timeout = value
        conn = self.conn
        if method != "POST" or ctype is None or not (ctype == "application/grpc" or ctype.startswith(("application/grpc+", "application/grpc;"))):
            conn.send_headers(sid, _HTTP_415, end_stream=True)
            if not ev.end_stream:
                conn.reset_stream(sid, h2.NO_ERROR)
            return
        if path == PROCESS_METHOD:
            call = _Call(sid, _KIND_PROCESS)
        elif path == HEALTH_CHECK_METHOD:
            call = _Call(sid, _KIND_HEALTH)
            call.messages = []
        elif path in self.server.unary:
            call = _Call(sid, _KIND_UNARY)
            call.messages = []
            call.method = self.server.unary[path]
        elif path in self.server.streaming:
            call = _Call(sid, _KIND_STREAMING)
            call.method = self.server.streaming[path]
        else:
            call = _Call(sid, _KIND_PROCESS)
            self.calls[sid] = call
            self._end_call(call, UNIMPLEMENTED, f"unknown method {path}")
            return
        self.calls[sid] = call
        server = self.server
        # Health and the unary (admin) methods still answer, so that operators
        # see why; their message still needs the budget if it arrives in parts.
        if call.kind in (_KIND_PROCESS, _KIND_STREAMING):
            if server.mem_used >= server.memory_budget:
                self._refuse_memory(call)
                return
            call.charged = H2_STREAM_COST_BYTES
            server.mem_used += H2_STREAM_COST_BYTES
        call.encoding = encoding  # only a message actually compressed is refused (see _on_data)
        if timeout is not None:
            seconds = _parse_timeout(timeout)
            if seconds is not None:
                call.timer = asyncio.get_running_loop().call_later(seconds, self._deadline, call)
        if call.kind == _KIND_PROCESS:
            try:
                call.handler = self.server.new_stream(meta)
            except Exception:
                log.exception("new_stream() failed")
                self._end_call(call, INTERNAL, "could not start the stream handler")
                return
        if ev.end_stream:
            self._on_data(call, b"", True)

    def _refuse_memory(self, call: _Call) -> None:
        server = self.server
        server.count("memory_refused")
        server.warn("memory_refused", "refusing gRPC stream: %d of %d bytes of the memory budget in use",
                    server.mem_used, server.memory_budget)
        self._fail(call, RESOURCE_EXHAUSTED, "router memory budget exhausted; try again later")

    def _deadline(self, call: _Call) -> None:
        if call.done:
            return
        call.timer = None
        self._fail(call, DEADLINE_EXCEEDED, "deadline exceeded")
        self.conn.reset_stream(call.sid, h2.CANCEL)
        self._flush()

    def _on_data(self, call: _Call, data: bytes, end_stream: bool) -> None:
        if call.done:
            return
        buf = call.buf
        if data:
            buf += data
        max_bytes = self.server.max_message_bytes
        while len(buf) >= 5:
            if buf[0] != 0:
                if buf[0] == 1 and call.encoding not in (None, "identity"):
                    # PROTOCOL-HTTP2.md: an encoding the server does not support -> UNIMPLEMENTED.
                    self._fail(call, UNIMPLEMENTED, f"grpc-encoding {call.encoding} is not supported; send uncompressed messages")
                elif buf[0] == 1:
                    self._fail(call, INTERNAL, "compressed flag set without a grpc-encoding")
                else:
                    self._fail(call, INTERNAL, f"invalid message flags {buf[0]:#x}")
                return
            length = int.from_bytes(buf[1:5], "big")
            if length > max_bytes:
                self._fail(call, RESOURCE_EXHAUSTED, f"message of {length} bytes exceeds the limit of {max_bytes}")
                return
            if len(buf) < 5 + length:
                if not call.reserved:
                    # The rest of this message will sit in memory: take it
                    # from the budget now, or refuse the stream.
                    server = self.server
                    if server.mem_used + length > server.memory_budget:
                        self._refuse_memory(call)
                        return
                    server.mem_used += length
                    call.reserved = length
                break
            if call.reserved:
                self.server.mem_used -= call.reserved
                call.reserved = 0
            if len(buf) == 5 + length:
                msg = bytes(buf[5:]) if length else b""
                buf.clear()
            else:
                msg = bytes(buf[5 : 5 + length])
                del buf[: 5 + length]
            if call.kind == _KIND_PROCESS:
                self._on_process_message(call, msg)
            elif call.kind == _KIND_STREAMING:
                self._on_streaming_message(call, msg)
            else:
                call.messages.append(msg)  # type: ignore[union-attr]
            if call.done:
                return
        if end_stream:
            if buf:
                self._fail(call, INTERNAL, "stream ended inside a message")
            elif call.kind == _KIND_PROCESS:
                handler = call.handler
                try:
                    if handler is not None:
                        handler.finish()
                except Exception:
                    log.exception("handler.finish() failed")
                    self._end_call(call, INTERNAL, "stream handler failed")
                    return
                self._end_call(call, OK)
            elif call.kind == _KIND_STREAMING:
                self._end_call(call, OK)
            elif call.kind == _KIND_UNARY:
                self._on_unary(call)
            else:
                self._on_health(call)

    def _on_process_message(self, call: _Call, msg: bytes) -> None:
        if not msg:
            self._fail(call, INVALID_ARGUMENT, "empty ProcessingRequest: no request phase set")
            return
        try:
            req = pb.ProcessingRequest.FromString(msg)
        except Exception:
            self._fail(call, INTERNAL, "could not parse ProcessingRequest")
            return
        handler = call.handler
        try:
            responses, close = handler.receive(req)  # type: ignore[union-attr]
        except Exception:
            log.exception("stream handler failed")
            self._fail(call, INTERNAL, "stream handler failed")
            return
        if not close:
            held = getattr(handler, "held_bytes", 0)
            if held != call.held:
                server = self.server
                server.mem_used += held - call.held
                grew = held > call.held
                call.held = held
                if grew and server.mem_used > server.memory_budget:
                    self._refuse_memory(call)
                    return
        if responses:
            parts = []
            for r in responses:
                b = r.SerializeToString()
                parts.append(len(b).to_bytes(5, "big"))
                parts.append(b)
            conn = self.conn
            if not call.headers_sent:
                call.headers_sent = True
                conn.send_headers(call.sid, _RESPONSE_HEADERS)
            conn.send_data(call.sid, b"".join(parts))
        if close:
            call.handler = None
            self._end_call(call, OK)

    def _send_message(self, call: _Call, body: bytes) -> None:
        if not call.headers_sent:
            call.headers_sent = True
            self.conn.send_headers(call.sid, _RESPONSE_HEADERS)
        self.conn.send_data(call.sid, len(body).to_bytes(5, "big") + body)

    def _on_unary(self, call: _Call) -> None:
        msgs = call.messages or []
        if len(msgs) != 1:
            self._end_call(call, INTERNAL if not msgs else UNIMPLEMENTED, "a unary method takes exactly one request message")
            return
        try:
            code, message, body = call.method(msgs[0])  # type: ignore[misc]
        except Exception:
            log.exception("unary method failed")
            self._end_call(call, INTERNAL, "method failed")
            return
        if code == OK:
            self._send_message(call, body)
        self._end_call(call, code, message)

    def _on_streaming_message(self, call: _Call, msg: bytes) -> None:
        try:
            body = call.method(msg)  # type: ignore[misc]
        except Exception:
            log.exception("streaming method failed")
            self._fail(call, INTERNAL, "method failed")
            return
        self._send_message(call, body)

    def _on_health(self, call: _Call) -> None:
        msgs = call.messages or []
        if len(msgs) != 1:
            self._end_call(call, INTERNAL if not msgs else UNIMPLEMENTED, "Check takes exactly one request message")
            return
        try:
            req = health_pb2.HealthCheckRequest.FromString(msgs[0])
        except Exception:
            self._end_call(call, INTERNAL, "could not parse HealthCheckRequest")
            return
        if req.service not in self.server.health_services:
            self._end_call(call, NOT_FOUND, f"unknown service {req.service!r}")
            return
        status = (
            health_pb2.HealthCheckResponse.NOT_SERVING if self.server._draining or not self.server.serving
            else health_pb2.HealthCheckResponse.SERVING
        )
        call.headers_sent = True
        self.conn.send_headers(call.sid, _RESPONSE_HEADERS)
        self.conn.send_data(call.sid, _HEALTH_RESPONSES[status])
        self._end_call(call, OK)

    # -- shutdown -------------------------------------------------------------

    def start_drain(self) -> None:
        self.conn.start_drain()
        self._flush()
        self._drain_timer = asyncio.get_running_loop().call_later(DRAIN_PING_TIMEOUT_S, self.finish_drain)

    def finish_drain(self) -> None:
        self.conn.finish_drain()
        self._flush()

    def cancel_all(self) -> None:
        """Grace period over: abort what is left and close."""
        self._close(h2.NO_ERROR, "server shutting down")
        if self.transport is not None:
            self.transport.close()


class FastServer:
    """Handle returned by ``serve_fast``."""

    def __init__(self, new_stream: NewStream, max_message_bytes: int, health_services: Iterable[str],
                 unary: Mapping[str, UnaryMethod] | None = None,
                 streaming: Mapping[str, StreamingMethod] | None = None,
                 *,
                 max_connections: int | None = None,
                 preface_timeout_s: float = H2_PREFACE_TIMEOUT_S,
                 idle_timeout_s: float = H2_IDLE_TIMEOUT_S,
                 memory_budget_bytes: int = H2_MEMORY_BUDGET_BYTES,
                 write_buffer_high_water: int = H2_WRITE_BUFFER_HIGH_WATER):
        self.new_stream = new_stream
        self.max_connections = max_connections if max_connections is not None else connection_limit()
        self.preface_timeout_s = preface_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.memory_budget = memory_budget_bytes
        self.write_buffer_high_water = write_buffer_high_water
        self.mem_used = 0  # bytes of the memory budget in use, all connections
        #: What the limits did (refused connections, GOAWAYs by code, ...).
        self.counters: collections.Counter[str] = collections.Counter()
        self._warned: dict[str, tuple[float, int]] = {}  # kind -> (last logged, left out since)
        self.unary = dict(unary or {})
        self.streaming = dict(streaming or {})
        self.max_message_bytes = max_message_bytes
        self.health_services = frozenset(health_services)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_GrpcConnection] = set()
        self._draining = False
        #: Health says NOT_SERVING while False; streams are still served (the
        #: drain delay before stop: serve.server.Worker.drain).
        self.serving = True
        self._idle = asyncio.Event()
        self.port = 0

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving

    def _connection_closed(self) -> None:
        if not self._connections:
            self._idle.set()

    def evict_idle(self) -> bool:
        """At the connection cap: close the connection idle the longest (no
        open stream) to make room, so that sockets held open and silent cannot
        lock Envoy out until the idle timeout. False if none is idle."""
        idle = [c for c in self._connections if not c.calls and c.conn.idle]
        if not idle:
            return False
        min(idle, key=lambda c: c.last_activity).evict()
        return True

    def count(self, key: str) -> None:
        self.counters[key] += 1

    def warn(self, kind: str, msg: str, *args) -> None:
        """A warning logged at most once per LOG_PERIOD_S per kind."""
        now = time.monotonic()
        last, left_out = self._warned.get(kind, (-LOG_PERIOD_S, 0))
        if now - last < LOG_PERIOD_S:
            self._warned[kind] = (last, left_out + 1)
            return
        self._warned[kind] = (now, 0)
        if left_out:
            msg += " (%d more like it not logged)"
            args += (left_out,)
        log.warning(msg, *args)

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Refuse new connections and streams, let in-flight streams finish for
        up to ``grace_seconds``, then cancel the rest and close."""
        self._draining = True
        if self._server is not None:
            self._server.close()
        conns = list(self._connections)
        for c in conns:
            c.start_drain()
        if self._connections:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=grace_seconds or 0.0)
            except asyncio.TimeoutError:
                pass
        for c in list(self._connections):
            c.cancel_all()
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def active_streams(self) -> int:
        return sum(len(c.calls) for c in self._connections)


def connection_limit() -> int:
    """H2_MAX_CONNECTIONS, or fewer when the open-file limit would run out
    first (keeping H2_FD_RESERVE descriptors for the rest of the process)."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return H2_MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY:
        return H2_MAX_CONNECTIONS
    return max(1, min(H2_MAX_CONNECTIONS, soft - H2_FD_RESERVE))


async def serve_fast(
    new_stream: NewStream,
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    health_services: Iterable[str] = DEFAULT_HEALTH_SERVICES,
    unary: Mapping[str, UnaryMethod] | None = None,
    streaming: Mapping[str, StreamingMethod] | None = None,
    tls: TlsFiles | None = None,
    **limits,
) -> FastServer:
    """Start the purpose-built h2c gRPC server; ``port=0`` picks a free port
    (read it back from ``server.port``). ``unary`` / ``streaming`` map method
    paths ("/pkg.Service/Method") to extra handlers (admin API, reflection).
    ``limits`` override FastServer's (max_connections, preface_timeout_s,
    idle_timeout_s, memory_budget_bytes, write_buffer_high_water).

    With ``tls`` the port speaks TLS (``extproc.tls.server_context``: ALPN h2,
    TLS 1.2+, a client certificate required when a client CA is set); the
    HTTP/2 layer above is the same, asyncio's SSL transport passes
    pause/resume_reading and the write-buffer marks through. A handshake gets
    the preface timeout; a failed one (plain h2c, no or a foreign client
    certificate) closes the socket, logged only in asyncio debug mode (an
    ``ssl.SSLError`` is an ``OSError``), so it cannot flood the log. Without
    ``tls`` nothing on the path of a request changes."""
    server = FastServer(new_stream, max_message_bytes, health_services, unary, streaming, **limits)
    loop = asyncio.get_running_loop()
    ssl_kw = {} if tls is None else {"ssl": server_context(tls), "ssl_handshake_timeout": server.preface_timeout_s}
    server._server = await loop.create_server(lambda: _GrpcConnection(server), host, port, reuse_address=True,
                                              **ssl_kw)
    server.port = server._server.sockets[0].getsockname()[1]
    return server


# --- grpc.aio baseline -------------------------------------------------------------


class GrpcioServer:
    def __init__(self, server, health_servicer, port: int, health_services: Iterable[str] = ()):
        self._server = server
        self._health = health_servicer
        self._health_services = tuple(health_services)
        self.port = port

    async def set_serving(self, serving: bool) -> None:
        from grpc_health.v1 import health_pb2
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._health_services:
            await self._health.set(name, status)

    async def stop(self, grace_seconds: float | None = None) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_seconds)


async def serve_grpcio(
    new_stream: NewStream,
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    health_services: Iterable[str] = DEFAULT_HEALTH_SERVICES,
    unary: Mapping[str, UnaryMethod] | None = None,
    streaming: Mapping[str, StreamingMethod] | None = None,
    tls: TlsFiles | None = None,
) -> GrpcioServer:
    """The same service on grpc.aio (baseline / fallback); with ``tls``,
    grpc's own TLS (``require_client_auth`` when a client CA is set)."""
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    async def process(request_iterator, context):
        meta = {k: v for k, v in context.invocation_metadata() or () if k in TRACE_METADATA}
        handler = new_stream(meta)
        state = [0]  # 0: open, 1: closed by us or failed, 2: client half-closed

        def done(ctx) -> None:
            # Known limitation: grpc.aio reports a client cancel that arrives
            # while the handler waits for a request as end-of-requests, and
            # ctx.cancelled() is still False here, so such a stream gets
            # finish() instead of abort() (the fast transport tells them apart).
            if state[0] == 0 or (state[0] == 2 and ctx.cancelled()):
                handler.abort()
            elif state[0] == 2:
                handler.finish()

        context.add_done_callback(done)
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                state[0] = 2
                return
            if req.WhichOneof("request") is None:  # empty: answer, never wait silently
                state[0] = 1
                handler.abort()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty ProcessingRequest: no request phase set")
            try:
                responses, close = handler.receive(req)
            except Exception:
                state[0] = 1
                log.exception("stream handler failed")
                handler.abort()
                await context.abort(grpc.StatusCode.INTERNAL, "stream handler failed")
            for r in responses:
                await context.write(r)
            if close:
                state[0] = 1
                return

    rpc = grpc.stream_stream_rpc_method_handler(
        process,
        request_deserializer=pb.ProcessingRequest.FromString,
        response_serializer=pb.ProcessingResponse.SerializeToString,
    )
    handlers = [grpc.method_handlers_generic_handler(EXT_PROC_SERVICE, {"Process": rpc})]
    by_service: dict[str, dict] = {}
    codes = {c.value[0]: c for c in grpc.StatusCode}

    def unary_handler(fn: UnaryMethod):
        async def call(request: bytes, context):
            code, message, body = fn(request)
            if code != OK:
                await context.abort(codes.get(code, grpc.StatusCode.UNKNOWN), message)
            return body
        return grpc.unary_unary_rpc_method_handler(call)  # bytes in, bytes out

    def streaming_handler(fn: StreamingMethod):
        async def call(request_iterator, context):
            async for request in request_iterator:
                yield fn(request)
        return grpc.stream_stream_rpc_method_handler(call)

    for path, fn in (unary or {}).items():
        service, name = path.lstrip("/").rsplit("/", 1)
        by_service.setdefault(service, {})[name] = unary_handler(fn)
    for path, fn in (streaming or {}).items():
        service, name = path.lstrip("/").rsplit("/", 1)
        by_service.setdefault(service, {})[name] = streaming_handler(fn)
    handlers += [grpc.method_handlers_generic_handler(svc, methods) for svc, methods in by_service.items()]
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers(tuple(handlers))
    health_servicer = health.aio.HealthServicer()
    for name in health_services:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    creds = grpc_server_credentials(tls)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    await server.start()
    return GrpcioServer(server, health_servicer, bound, health_services)


async def serve(transport: str, new_stream: NewStream, host: str, port: int, **kw):
    """Pick a transport by name: "fast" or "grpcio" (config: [router] transport)."""
    if transport == "fast":
        return await serve_fast(new_stream, host, port, **kw)
    if transport == "grpcio":
        return await serve_grpcio(new_stream, host, port, **kw)
    raise ValueError(f"unknown transport {transport!r}; expected 'fast' or 'grpcio'")

"""The fast gRPC server: gRPC over HTTP/2 on asyncio, built for ext_proc.

An ``asyncio.Protocol`` shell around the sans-I/O ``extproc.serve.h2frames``
connection. It costs a fraction of grpc.aio's CPU per stream (docs/bench.md),
which is what the router's throughput is made of: every routed request is one
short stream. ``extproc.serve.grpc_aio`` serves the same contract
(``extproc.serve.rpc``) on grpc.aio.

What it implements of gRPC (PROTOCOL-HTTP2.md): 5-byte message framing,
uncompressed messages only (a compressed one gets UNIMPLEMENTED, an unknown
grpc-encoding the same, as the spec asks), trailers with grpc-status and
percent-encoded grpc-message, trailers-only error responses, a max message
size (RESOURCE_EXHAUSTED), unknown method -> UNIMPLEMENTED, non-gRPC
content-type -> HTTP 415, grpc-timeout deadlines (DEADLINE_EXCEEDED), client
cancellation (RST_STREAM -> ``handler.abort()``), and the unary
``grpc.health.v1.Health/Check`` that Envoy's gRPC health checker calls.

Limits (``extproc.serve.limits``, ``ServerLimits`` per server): the flood
limits of h2frames, fed this shell's clock; reading paused while the write
buffer is above its high-water mark; connections per worker (the longest-idle
one evicted first); preface and idle timeouts; and a per-process memory
budget for open streams, the bodies they hold and TLS connections, with a
share per connection; when it is full the oldest streams whose request is
still incomplete are ended to make room (``FastServer.reclaim``), and only
if none is old enough do new streams get RESOURCE_EXHAUSTED and health
NOT_SERVING. Resets of unanswered streams are counted per peer address
across connections (an address over its limit has its new connections on
probation). ``FastServer.counters`` counts what they did.

Layout: ``_Call`` is one stream's state, ``_GrpcConnection`` one HTTP/2
connection (asyncio callbacks in, h2frames events dispatched to the
``_on_*`` methods), ``FastServer`` what the connections of one listening
socket share (limits, memory budget, counters, drain).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import logging
import ssl
from typing import Callable, Iterable, Mapping
from urllib.parse import quote

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2

from ..tls import TlsFiles, server_context
from . import h2frames as h2
from ..core.machine import State
from .limits import (DRAIN_PING_TIMEOUT_S, H2_ACCEPT_BACKLOG, H2_HEADERS_READ_ENTRIES, H2_PROBATION_SLICE_BYTES, H2_RECLAIM_FRACTION, MAX_DEADLINE_S, MIN_TIMER_S,
                     REQUEST_SWEEP_FRACTION, PeerResets, PeriodicWarnings, ServerLimits)
from .rpc import (
    DEADLINE_EXCEEDED,
    DEFAULT_HEALTH_SERVICES,
    HEALTH_CHECK_METHOD,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    OK,
    PROCESS_METHOD,
    RESOURCE_EXHAUSTED,
    TRACE_METADATA,
    UNAVAILABLE,
    UNIMPLEMENTED,
    NewStream,
    StreamHandler,
    StreamingMethod,
    UnaryMethod,
)

log = logging.getLogger("extproc.serve.h2c")

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
                 "reserved", "held", "charged", "opened")

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
        self.charged = 0  # memory budget taken by the open stream itself (ServerLimits.stream_cost_bytes)
        self.opened = 0.0  # loop time the stream opened (request timeout)


def _request_pending(call: _Call) -> bool:
    """A Process stream whose request phase is not over: its handler (the
    StreamMachine, bare or inside telemetry's ObservedStream) still waits for
    the request headers or the body's end. A handler without a state is
    never judged pending."""
    handler = call.handler
    state = getattr(getattr(handler, "machine", handler), "state", None)
    return state is not None and state < State.RESP_HEADERS


class _GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection (Envoy keeps one per worker thread)."""

    def __init__(self, server: "FastServer"):
        self.server = server
        self.conn = h2.H2ServerConnection()
        self.calls: dict[int, _Call] = {}
        self.transport: asyncio.Transport | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None  # preface, then idle timeout
        self._sweep: asyncio.TimerHandle | None = None  # request timeout of held streams
        self.mem_used = 0  # bytes of the memory budget this connection holds (its share)
        self.peer = ""  # the peer's address (resets are counted per peer)
        self.probation = False  # the address was over its resets when we accepted: closed at its first
        self._loop = asyncio.get_running_loop()
        self.last_activity = self._loop.time()
        self._reading_paused = False
        #: id(header list) -> (the list, what _on_request reads of it).
        self._headers_read: dict[int, tuple[list, tuple]] = {}
        # TLS only: the handshake task, the TCP transport under it and the
        # bytes the SSL layer handed us before the task resumed (see _handshake_task).
        self._handshake: asyncio.Task | None = None
        self._raw: asyncio.Transport | None = None
        self._raw_early: bytearray | None = None  # ClientHello bytes read before start_tls (uvloop)
        self._early: bytearray | None = None
        self._tls_charge = 0  # memory budget taken by the established TLS connection (tls_connection_cost_bytes)

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The TCP accept: the connection counts against the cap from here,
        a TLS one while its handshake is pending as well (issue 17)."""
        server = self.server
        peername = transport.get_extra_info("peername")
        self.peer = peername[0] if isinstance(peername, tuple) else str(peername)
        tls = server.ssl_context is not None
        if server.peers.banned(self.peer, self._loop.time()):
            # On probation, not refused: the address may be Envoy's too (a
            # rogue sidecar in its pod), whose health checks and reconnects
            # must go on; the connection is closed at its first reset of an
            # unanswered stream instead of after the whole budget.
            self.probation = True
            server.count("peer_probation")
            server.warn("peer_probation", "HTTP/2 connection from %s on probation: too many stream resets from "
                        "this address; closed at its first", self.peer)
        if len(server._connections) >= server.max_connections and not server.evict_idle():
            # Over the cap, none idle to make room: GOAWAY and close, never an fd exhausted.
            server.count("connections_refused")
            server.warn("connections_refused", "refusing HTTP/2 connection: %d open (limit %d)",
                        len(server._connections), server.max_connections)
            self._refuse(transport, tls, "too many connections")
            return
        server._connections.add(self)
        if tls:
            self._begin_handshake(transport)  # type: ignore[arg-type]
        else:
            self._start(transport)  # type: ignore[arg-type]

    def _reset_limit(self) -> None:
        """The peer address went over peer_max_resets (or this connection,
        on probation, reset an unanswered stream): GOAWAY(ENHANCE_YOUR_CALM)."""
        server = self.server
        if self.probation:
            server.count("peer_probation_closed")
        else:
            server.count("peer_resets_exceeded")
            server.warn("peer_resets_exceeded", "closing HTTP/2 connection from %s: more than %d stream resets in "
                        "%.0f s from this address; its connections are on probation for %.0f s", self.peer,
                        server.limits.peer_max_resets, server.limits.peer_reset_window_s, server.limits.peer_ban_s)
        self._close(h2.ENHANCE_YOUR_CALM, "too many stream resets from this address")

    def _refuse(self, transport: asyncio.BaseTransport, tls: bool, reason: str) -> None:
        if not tls:  # (a GOAWAY in clear text means nothing to a TLS client)
            self.conn.close(h2.ENHANCE_YOUR_CALM, reason)
            transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]
        transport.close()

    def _start(self, transport: asyncio.Transport) -> None:
        """HTTP/2 begins: our SETTINGS, the preface and request-sweep timers."""
        server = self.server
        self.transport = transport
        transport.set_write_buffer_limits(high=server.limits.write_buffer_high_water)
        transport.write(self.conn.data_to_send())
        self._timer = self._loop.call_later(server.limits.preface_timeout_s, self._on_timer)
        self._sweep = self._loop.call_later(server.request_sweep_s, self._on_sweep)
        if server._draining:
            self.start_drain()

    # -- TLS handshake (issue 17: half ClientHellos) ------------------------------
    # A pending handshake holds a socket and ~300 KB (asyncio's SSLProtocol
    # buffer and OpenSSL's state): it is in server._connections (the cap) and
    # server._handshakes (at most max_pending_handshakes, the oldest closed to
    # make room), charged tls_handshake_cost_bytes of the memory budget, and
    # bounded by tls_handshake_timeout_s; every way out goes through
    # _end_handshake, which returns the charge once.

    def _begin_handshake(self, raw: asyncio.Transport) -> None:
        server = self.server
        if len(server._handshakes) >= server.limits.max_pending_handshakes:
            oldest = next(iter(server._handshakes))  # insertion order: the oldest accept
            server.count("tls_handshakes_evicted")
            server.warn("tls_handshakes_evicted", "closing the oldest pending TLS handshake (from %s): %d pending",
                        oldest.peer, len(server._handshakes))
            oldest.evict()
        self._raw = raw
        server._handshakes[self] = None
        self._charge(server.limits.tls_handshake_cost_bytes)
        raw.pause_reading()  # start_tls resumes it once its SSL layer is in place
        self._handshake = self._loop.create_task(self._handshake_task(raw))

    async def _handshake_task(self, raw: asyncio.Transport) -> None:
        server = self.server
        start = self._loop.start_tls(raw, self, server.ssl_context, server_side=True,
                                     ssl_handshake_timeout=server.limits.tls_handshake_timeout_s)
        try:
            if self._raw_early is None:
                transport = await start  # takes the socket over in this step: no byte can come between
            else:
                transport = await self._start_tls_replaying(raw, start)
        except asyncio.CancelledError:  # evicted, or the server stops
            transport = None
        except ConnectionAbortedError:  # asyncio's handshake timeout
            server.count("tls_handshake_timeouts")
            server.warn("tls_handshake_timeouts", "closing TLS connection from %s: no handshake within %.1f s",
                        self.peer, server.limits.tls_handshake_timeout_s)
            transport = None
        except (OSError, ValueError, RuntimeError):
            # A failed handshake (plain h2c, no or a foreign client
            # certificate, garbage): ssl.SSLError is an OSError. Counted, not
            # logged, so that it cannot flood the log.
            server.count("tls_handshakes_failed")
            transport = None
        self._end_handshake()
        if transport is None or transport.is_closing():
            raw.abort()
            self._gone()
            return
        if not self._charge_tls():
            transport.abort()
            return
        self._start(transport)
        early, self._early = self._early, None
        if early:
            self.data_received(bytes(early))

    async def _start_tls_replaying(self, raw: asyncio.Transport, start) -> asyncio.Transport:
        """start_tls, handing the SSL layer the ClientHello bytes that reached
        us before it took the socket over. uvloop starts reading right after
        connection_made returns, whatever pause_reading() said in it
        (uvloop's _call_connection_made), so a ClientHello already on the
        socket can arrive at this protocol as raw bytes (data_received keeps
        them in _raw_early and pauses); lost, the handshake stalls until its
        timeout (1 to 3 of every 5 TLS connections on uvloop did, Envoy's
        included). start_tls swaps the socket's protocol in its first step
        and schedules the SSL protocol's connection_made and resume_reading:
        run as a task of its own, one loop iteration later (after that step)
        and one more (after those two, before any new read: the loop reads
        only between iterations) the bytes are fed to it, in their order.
        Only connections that lost that race come here."""
        tls = self._loop.create_task(start)
        try:
            await asyncio.sleep(0)  # start_tls's first step (scheduled before this one)
            await asyncio.sleep(0)  # the SSL protocol's connection_made and resume_reading
            early, self._raw_early = self._raw_early, None
            ssl_protocol = raw.get_protocol()
            if early and ssl_protocol is not self and not raw.is_closing():
                data = memoryview(bytes(early))
                if hasattr(ssl_protocol, "buffer_updated"):  # asyncio's and uvloop's SSLProtocol
                    while data:
                        buf = ssl_protocol.get_buffer(len(data))
                        n = min(len(buf), len(data))
                        buf[:n] = data[:n]
                        data = data[n:]
                        ssl_protocol.buffer_updated(n)
                else:
                    ssl_protocol.data_received(bytes(data))
            return await tls
        except asyncio.CancelledError:
            tls.cancel()
            raise

    def _charge_tls(self) -> bool:
        """The handshake completed: charge the TLS connection's buffers
        (tls_connection_cost_bytes) until it closes. Past the TLS connections'
        share of the budget the longest-idle connection is closed to make
        room; False (nothing charged) when none is idle."""
        server = self.server
        cost = server.limits.tls_connection_cost_bytes
        if server.tls_mem + cost > server.tls_budget and not server.evict_idle(but=self, handshakes=False):
            server.count("tls_connections_refused")
            server.warn("tls_connections_refused", "closing TLS connection from %s: %d bytes of the memory budget "
                        "held by TLS connections (limit %d), none idle", self.peer, server.tls_mem, server.tls_budget)
            return False
        self._tls_charge = cost
        server.tls_mem += cost
        self._charge(cost)
        return True

    def _release_tls(self) -> None:
        cost, self._tls_charge = self._tls_charge, 0
        if cost:
            self.server.tls_mem -= cost
            self._charge(-cost)

    def _end_handshake(self) -> None:
        """The handshake is over (done, failed, timed out, evicted): its
        budget charge is returned, once."""
        if self._raw is None:
            return
        self._raw = None
        server = self.server
        server._handshakes.pop(self, None)
        self._charge(-server.limits.tls_handshake_cost_bytes)

    def _abort_handshake(self) -> None:
        raw = self._raw
        self._end_handshake()
        if self._handshake is not None:
            self._handshake.cancel()
        if raw is not None:
            raw.abort()
        self._gone()

    def _gone(self) -> None:
        server = self.server
        if self in server._connections:
            server._connections.discard(self)
            server._connection_closed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        self._end_handshake()  # (TLS: asyncio reports some failed handshakes here too)
        self._release_tls()
        if self._drain_timer:
            self._drain_timer.cancel()
        if self._timer:
            self._timer.cancel()
        if self._sweep:
            self._sweep.cancel()
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
                        server.limits.preface_timeout_s)
            self._close(h2.PROTOCOL_ERROR, "no client preface")
            return
        now = self._loop.time()
        idle_timeout_s = server.limits.idle_timeout_s
        remaining = self.last_activity + idle_timeout_s - now
        if remaining <= 0 and not self.calls and conn.idle:
            server.count("idle_closed")
            log.debug("closing HTTP/2 connection idle for %.1f s", now - self.last_activity)
            self._close(h2.NO_ERROR, "idle timeout")
            return
        self._timer = self._loop.call_later(max(remaining, idle_timeout_s if remaining <= 0 else MIN_TIMER_S),
                                            self._on_timer)

    def _held_calls(self, cutoff: float):
        """The Process streams opened at or before ``cutoff`` whose request
        is still incomplete: what the sweep resets and reclaim may end."""
        return (c for c in self.calls.values()
                if c.kind == _KIND_PROCESS and c.opened <= cutoff and not c.done and _request_pending(c))

    def _on_sweep(self) -> None:
        """Reset the Process streams whose request has not completed within
        request_timeout_s of opening (issue 17: held streams); O(open streams)
        once per sweep period, nothing per request."""
        self._sweep = None
        if self.transport is None or self.transport.is_closing() or self.conn.closed:
            return
        server = self.server
        cutoff = self._loop.time() - server.limits.request_timeout_s
        late = list(self._held_calls(cutoff))
        if late:
            server.counters["request_timeouts"] += len(late)
            server.warn("request_timeouts", "resetting %d gRPC stream(s): request not complete within %.1f s",
                        len(late), server.limits.request_timeout_s)
            for call in late:
                self._fail(call, DEADLINE_EXCEEDED, "request not complete in time")
                self.conn.reset_stream(call.sid, h2.CANCEL)
            self._flush()
        self._sweep = self._loop.call_later(server.request_sweep_s, self._on_sweep)

    def evict(self) -> None:
        """Make room for a new connection (this one is idle: no stream, or
        its TLS handshake is still pending)."""
        self.server._connections.discard(self)
        self.server.count("connections_evicted")
        self._release_tls()  # at once: the close completes an iteration later
        if self.transport is None:
            self._abort_handshake()
            return
        self._close(h2.NO_ERROR, "idle connection evicted for a new one")

    def _close(self, code: int, reason: str) -> None:
        for call in list(self.calls.values()):
            self._fail(call, UNAVAILABLE, reason)
        self.calls.clear()
        self.conn.close(code, reason)
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            raw = self._raw
            if raw is not None and raw.get_protocol() is self:
                # TLS, before start_tls took the socket over (uvloop): raw
                # ClientHello bytes, replayed by _start_tls_replaying; stop reading
                # until the SSL layer is in place (start_tls resumes).
                if self._raw_early is None:
                    self._raw_early = bytearray()
                self._raw_early += data
                raw.pause_reading()
                return
            # TLS: asyncio's SSL layer passes the first decrypted bytes on as
            # the handshake completes, before _handshake_task resumes (one
            # read, at most its 256 KiB buffer); they are replayed from there.
            if self._early is None:
                self._early = bytearray()
            self._early += data
            return
        if self.probation and len(data) > H2_PROBATION_SLICE_BYTES:
            # Parsed a slice at a time: closed at its first reset, it costs
            # the parse of one slice, not of its whole read.
            for i in range(0, len(data), H2_PROBATION_SLICE_BYTES):
                self.data_received(data[i:i + H2_PROBATION_SLICE_BYTES])
                if self.conn.closed:
                    return
            return
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
                    if ev.remote and not call.headers_sent and (self.server.peers.note(self.peer, now)
                                                                or self.probation):
                        self._reset_limit()
                        break
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

    # -- memory budget: every charge and refund goes through _charge ---------

    def _charge(self, delta: int) -> None:
        """Add ``delta`` bytes (negative: a refund) to this connection's and
        the server's memory use: the two always move together."""
        self.mem_used += delta
        self.server.mem_used += delta
    # Each charge counts against the process's budget and against this
    # connection's share of it (ServerLimits.connection_budget_share).

    def _admit(self, call: _Call) -> bool:
        """Charge a new stream's fixed cost; False (nothing charged) when the
        budget, or this connection's share of it, is already spent."""
        server = self.server
        if self.mem_used >= server.connection_budget:
            return False
        if server.mem_used >= server.memory_budget and not server.reclaim():
            return False
        cost = call.charged = server.stream_cost
        self._charge(cost)
        return True

    def _reserve(self, call: _Call, length: int) -> bool:
        """Charge a message that will sit in memory until its last byte
        arrives (0 refunds it); False (nothing charged) if it does not fit."""
        server = self.server
        if length and (server.mem_used + length > server.memory_budget
                       or self.mem_used + length > server.connection_budget):
            return False
        delta = length - call.reserved
        self._charge(delta)
        call.reserved = length
        return True

    def _hold(self, call: _Call, held: int) -> bool:
        """Charge what the handler keeps between messages (its held_bytes);
        False when it grew past the budget or the connection's share (still
        charged: _release refunds)."""
        server = self.server
        delta = held - call.held
        self._charge(delta)
        call.held = held
        return not (delta > 0 and (server.mem_used > server.memory_budget
                                   or self.mem_used > server.connection_budget))

    def _release(self, call: _Call) -> None:
        """Give the call's share of the memory budget back."""
        if call.reserved or call.held or call.charged:
            total = call.reserved + call.held + call.charged
            self._charge(-total)
            call.reserved = call.held = call.charged = 0

    def _abort_call(self, call: _Call) -> None:
        self._retire(call)
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
        self._retire(call)
        conn = self.conn
        if code == OK and call.headers_sent:
            block = _TRAILERS_OK
        else:
            block = _status_block(code, message, trailers_only=not call.headers_sent)
        conn.send_headers(call.sid, block, end_stream=True)
        stream = conn.streams.get(call.sid)
        if stream is not None and not stream.remote_closed and not stream.pending:
            conn.reset_stream(call.sid, h2.NO_ERROR)

    def _retire(self, call: _Call) -> None:
        """The call is over on our side: its memory back, its timer off, out
        of the table (what every way of ending a call does first)."""
        call.done = True
        self._release(call)
        if call.timer:
            call.timer.cancel()
        self.calls.pop(call.sid, None)

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
        headers = ev.headers
        # h2frames hands out one list per distinct header block (its decoded
        # block cache), and Envoy sends the same block on every stream: what
        # this loop reads of it is kept with the list itself, and a hit is
        # that very list (``is``), never just an equal id.
        hit = self._headers_read.get(id(headers))
        if hit is not None and hit[0] is headers:
            path, method, ctype, encoding, timeout, trace = hit[1]
        else:
            path = method = ctype = encoding = timeout = None
            trace: tuple[tuple[str, str], ...] = ()
            for name, value in headers:
                if name in TRACE_METADATA:
                    trace += ((name, value),)
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
            if len(self._headers_read) >= H2_HEADERS_READ_ENTRIES:
                self._headers_read.clear()
            self._headers_read[id(headers)] = (headers, (path, method, ctype, encoding, timeout, trace))
        meta = dict(trace)
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
        # Health and the unary (admin) methods still answer, so that operators
        # see why; their message still needs the budget if it arrives in parts.
        if call.kind in (_KIND_PROCESS, _KIND_STREAMING) and not self._admit(call):
            self._refuse_memory(call)
            return
        call.encoding = encoding  # only a message actually compressed is refused (see _on_data)
        if timeout is not None:
            seconds = _parse_timeout(timeout)
            if seconds is not None:
                call.timer = asyncio.get_running_loop().call_later(seconds, self._deadline, call)
        if call.kind == _KIND_PROCESS:
            call.opened = self.last_activity
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
        max_bytes = self.server.max_message_bytes
        n = len(data)
        if not buf and n > 5 and data[0] == 0 and int.from_bytes(data[1:5], "big") == n - 5 and n - 5 <= max_bytes:
            # One whole uncompressed message in this DATA frame, nothing
            # buffered before it (the common case): no copy into the buffer.
            self._on_message(call, data[5:])
            if call.done:
                return
        elif data:
            buf += data
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
                # The rest of this message will sit in memory: take it
                # from the budget now, or refuse the stream.
                if not call.reserved and not self._reserve(call, length):
                    self._refuse_memory(call)
                    return
                break
            if call.reserved:
                self._reserve(call, 0)
            if len(buf) == 5 + length:
                msg = bytes(buf[5:]) if length else b""
                buf.clear()
            else:
                msg = bytes(buf[5 : 5 + length])
                del buf[: 5 + length]
            self._on_message(call, msg)
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

    def _on_message(self, call: _Call, msg: bytes) -> None:
        if call.kind == _KIND_PROCESS:
            self._on_process_message(call, msg)
        elif call.kind == _KIND_STREAMING:
            self._on_streaming_message(call, msg)
        else:
            call.messages.append(msg)  # type: ignore[union-attr]

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
            if held != call.held and not self._hold(call, held):
                self._refuse_memory(call)
                return
        if responses:
            if len(responses) == 1:
                b = responses[0].SerializeToString()
                body = len(b).to_bytes(5, "big") + b
            else:
                parts = []
                for r in responses:
                    b = r.SerializeToString()
                    parts.append(len(b).to_bytes(5, "big"))
                    parts.append(b)
                body = b"".join(parts)
            conn = self.conn
            if close and not call.headers_sent and conn.send_response(call.sid, _RESPONSE_HEADERS, body, _TRAILERS_OK):
                # The whole answer in one go (the common case).
                call.headers_sent = True
                call.handler = None
                self._retire(call)
                return
            if not call.headers_sent:
                call.headers_sent = True
                conn.send_headers(call.sid, _RESPONSE_HEADERS)
            conn.send_data(call.sid, body)
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
            health_pb2.HealthCheckResponse.NOT_SERVING
            if self.server._draining or not self.server.serving or self.server.exhausted()
            else health_pb2.HealthCheckResponse.SERVING
        )
        call.headers_sent = True
        self.conn.send_headers(call.sid, _RESPONSE_HEADERS)
        self.conn.send_data(call.sid, _HEALTH_RESPONSES[status])
        self._end_call(call, OK)

    # -- shutdown -------------------------------------------------------------

    def start_drain(self) -> None:
        if self.transport is None:  # TLS handshake still pending: no HTTP/2 yet
            self._abort_handshake()
            return
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
                 limits: ServerLimits = ServerLimits()):
        self.new_stream = new_stream
        self.limits = limits
        # Read on every stream, kept as plain attributes (one lookup less).
        self.max_connections = limits.connections()
        self.memory_budget = limits.memory_budget_bytes
        self.stream_cost = limits.stream_cost_bytes
        self.connection_budget = int(limits.memory_budget_bytes * limits.connection_budget_share)
        self.request_sweep_s = limits.request_timeout_s * REQUEST_SWEEP_FRACTION
        self.mem_used = 0  # bytes of the memory budget in use, all connections
        self.tls_mem = 0  # of which established TLS connections hold (tls_connection_cost_bytes each)
        self.tls_budget = int(limits.memory_budget_bytes * limits.tls_connections_budget_share)
        self.reclaim_batch = max(1, int(limits.memory_budget_bytes * H2_RECLAIM_FRACTION) // limits.stream_cost_bytes)
        self._reclaim_after = 0.0  # loop time before which a reclaim scan would find nothing new
        #: What the limits did (refused connections, GOAWAYs by code, ...).
        self.counters: collections.Counter[str] = collections.Counter()
        self._warnings = PeriodicWarnings(log)
        self.peers = PeerResets(limits)  # resets per peer address, probation (loop time)
        self.unary = dict(unary or {})
        self.streaming = dict(streaming or {})
        self.max_message_bytes = max_message_bytes
        self.health_services = frozenset(health_services)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_GrpcConnection] = set()
        #: Connections whose TLS handshake is pending, oldest first (a dict as an ordered set).
        self._handshakes: dict[_GrpcConnection, None] = {}
        #: The port's TLS context; None for h2c (extproc.tls.server_context).
        self.ssl_context: ssl.SSLContext | None = None
        self._draining = False
        #: Health says NOT_SERVING while False; streams are still served (the
        #: drain delay before stop: serve.server.Worker.drain).
        self.serving = True
        self._idle = asyncio.Event()
        self.port = 0

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving

    def exhausted(self) -> bool:
        """The memory budget cannot take one more stream, even after
        resetting held streams (``reclaim``): health says NOT_SERVING
        (Envoy's health checker takes the router out, so its ext_proc fails
        open at once instead of after a RESOURCE_EXHAUSTED per request) until
        streams end or time out and return memory; read at each check, so it
        recovers by itself."""
        return self.mem_used + self.stream_cost > self.memory_budget and not self.reclaim()

    def reclaim(self) -> bool:
        """The budget is full: reset up to ``reclaim_batch`` Process streams
        whose request is still incomplete and that opened at least
        reclaim_min_age_s ago, the oldest first, across all connections
        (issue 17: held streams must not switch routing off). True if it
        freed any. O(open streams), at most once per reclaim_batch new
        streams, or per reclaim_min_age_s when it finds nothing."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now < self._reclaim_after:
            return False
        cutoff = now - self.limits.reclaim_min_age_s
        oldest = heapq.nsmallest(self.reclaim_batch, (
            (call.opened, call.sid, id(conn), conn, call)
            for conn in self._connections for call in conn._held_calls(cutoff)),
            key=lambda t: t[:3])
        if not oldest:
            self._reclaim_after = now + self.limits.reclaim_min_age_s
            return False
        self.counters["streams_reclaimed"] += len(oldest)
        self.warn("streams_reclaimed", "memory budget full: resetting the %d oldest gRPC stream(s) whose request "
                  "is not complete (opened %.1f s ago or more) to make room", len(oldest), self.limits.reclaim_min_age_s)
        conns = {}
        for _opened, _sid, _, conn, call in oldest:
            # (trailers, then RST_STREAM(NO_ERROR) while the peer may still send: _end_call)
            conn._fail(call, RESOURCE_EXHAUSTED, "router memory budget full: oldest incomplete stream reset")
            conns[id(conn)] = conn
        for conn in conns.values():
            conn._flush()
        return True

    def _connection_closed(self) -> None:
        if not self._connections:
            self._idle.set()

    def evict_idle(self, but: "_GrpcConnection | None" = None, handshakes: bool = True) -> bool:
        """At the connection cap: close the connection idle the longest (no
        open stream, or a TLS handshake still pending; ``but`` excepted) to
        make room, so that sockets held open and silent cannot lock Envoy out
        until the idle timeout. A pending handshake goes before any
        established connection: it has never carried a request, while an
        established one between two requests is only idle for a moment (a
        client routing one request after another lost its connection to a
        flood of half ClientHellos newer than its last request).
        ``handshakes=False``: established connections only. False if none is
        idle."""
        idle = [c for c in self._connections
                if not c.calls and c.conn.idle and c is not but and (handshakes or c.transport is not None)]
        if not idle:
            return False
        min(idle, key=lambda c: (c.transport is not None, c.last_activity)).evict()
        return True

    def count(self, key: str) -> None:
        self.counters[key] += 1

    def warn(self, kind: str, msg: str, *args) -> None:
        """A warning logged at most once per LOG_PERIOD_S per kind."""
        self._warnings.warn(kind, msg, *args)

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
    limits: ServerLimits | None = None,
    **overrides,
) -> FastServer:
    """Start the purpose-built h2c gRPC server; ``port=0`` picks a free port
    (read it back from ``server.port``). ``unary`` / ``streaming`` map method
    paths ("/pkg.Service/Method") to extra handlers (admin API, reflection).
    ``limits`` (default ``ServerLimits()``) are the server's limits;
    ``overrides`` replace some of its fields by name (max_connections,
    preface_timeout_s, idle_timeout_s, memory_budget_bytes,
    write_buffer_high_water, stream_cost_bytes, connection_budget_share,
    request_timeout_s, peer_reset_window_s, peer_max_resets, peer_ban_s,
    tls_handshake_timeout_s, max_pending_handshakes, tls_handshake_cost_bytes,
    tls_connection_cost_bytes, tls_connections_budget_share,
    reclaim_min_age_s; peer_max_calls is read by the grpcio transport only).

    With ``tls`` the port speaks TLS (``extproc.tls.server_context``: ALPN h2,
    TLS 1.2+, a client certificate required when a client CA is set); the
    HTTP/2 layer above is the same, asyncio's SSL transport passes
    pause/resume_reading and the write-buffer marks through. The handshake
    runs on the accepted TCP connection (``loop.start_tls``), so a pending one
    counts against the connection cap and the memory budget from the accept,
    is bounded in number (the oldest closed to make room) and in time
    (``tls_handshake_timeout_s``), and returns its charge however it ends; a
    failed one (plain h2c, no or a foreign client certificate) is counted in
    ``counters``, not logged, so it cannot flood the log. Without ``tls``
    nothing on the path of a request changes."""
    limits = dataclasses.replace(limits or ServerLimits(), **overrides)
    server = FastServer(new_stream, max_message_bytes, health_services, unary, streaming, limits=limits)
    loop = asyncio.get_running_loop()
    if tls is not None:
        server.ssl_context = server_context(tls)
    server._server = await loop.create_server(lambda: _GrpcConnection(server), host, port, reuse_address=True,
                                              backlog=H2_ACCEPT_BACKLOG)
    server.port = server._server.sockets[0].getsockname()[1]
    return server

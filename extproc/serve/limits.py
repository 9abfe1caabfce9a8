"""Every limit of the router's gRPC servers, in one place.

Limits for everything a peer on the ext_proc port can make us hold: bytes,
frames, streams, connections and time. Each is a named constant whose comment
gives the reason and the precedent (issue 11). Envoy, the only legitimate
client, stays far below each of them; an attacker hits them and gets
GOAWAY(ENHANCE_YOUR_CALM), a refused stream or a closed socket instead of the
router's CPU or memory. Precedents: nghttp2 (the C library in curl, Apache and
Envoy's old codec), grpc-go, grpc C-core, and Envoy's own
http2_protocol_options / overload manager.

Who reads what:

* ``extproc.serve.h2frames`` (the sans-I/O HTTP/2 connection): the flood
  limits and the settings we advertise; no clock of its own, rates use the
  ``now`` its shell passes in.
* ``extproc.serve.h2c`` (the asyncio shell): the shell limits, gathered per
  server in :class:`ServerLimits` (overridable per server, e.g. by tests and
  ``serve_fast(**limits)``); ``connection_limit`` fits the connection cap to
  the process's open-file limit.
* ``extproc.serve.grpc_aio`` leaves its HTTP/2 limits to grpc.aio, except
  the message size, which the caller passes (extproc.defaults
  GRPC_MAX_MESSAGE_BYTES), LOCAL_MAX_CONCURRENT_STREAMS, and the per-peer
  accounting it can do above grpc (PeerResets, GRPCIO_PEER_MAX_CALLS).

A new limit (a per-stream timeout, a per-peer share of the memory budget)
goes here as a constant, and as a :class:`ServerLimits` field if a server
may override it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

# --- Flood limits (enforced by h2frames) ---------------------------------------

#: Entries accepted in one SETTINGS frame. RFC 9113 defines 6 settings, a
#: frame repeating them is legal but a 1 MiB frame holds 174,762 entries:
#: nghttp2 caps it at 32 (NGHTTP2_DEFAULT_MAX_SETTINGS, CVE-2020-11080) and so
#: do we. Above it: GOAWAY(ENHANCE_YOUR_CALM).
H2_MAX_SETTINGS_PER_FRAME = 32

#: SETTINGS frames (each costs an ACK and, with INITIAL_WINDOW_SIZE, a pass
#: over the open streams): a token bucket of this burst refilled at this rate
#: per second. Envoy sends one at connect; gRPC clients a few (BDP window
#: updates). Same shape and order as nghttp2's stream-reset bucket below.
H2_SETTINGS_BURST = 100
H2_SETTINGS_RATE_PER_S = 10.0

#: CONTINUATION frames after one HEADERS. nghttp2 1.61 caps them at 8
#: (CVE-2024-27316 "CONTINUATION flood", where empty frames were accepted
#: forever); a header list within H2_MAX_HEADER_LIST_SIZE never needs more
#: with Envoy's 16 KiB frames. Above it: GOAWAY(ENHANCE_YOUR_CALM).
H2_MAX_CONTINUATIONS = 8

#: Largest decoded header list (SETTINGS_MAX_HEADER_LIST_SIZE, RFC 7541
#: accounting: name + value + 32 per field). 8 KiB is grpc C-core's default
#: metadata limit (grpc.max_metadata_size) and half of h11's 16 KiB header
#: buffer; Envoy's ext_proc call metadata is under 1 KiB. Decoding is the
#: dominant per-byte cost of a header block, so this also bounds CPU per stream.
H2_MAX_HEADER_LIST_SIZE = 8 << 10

#: Consecutive DATA frames with an empty payload and no END_STREAM we
#: tolerate (each costs an event and a pass through the stream): Envoy's
#: max_consecutive_inbound_frames_with_empty_payload default of 1.
H2_MAX_CONSECUTIVE_EMPTY_FRAMES = 1

#: "Rapid Reset" (CVE-2023-44487): streams the client resets before we sent
#: them any response headers, as a token bucket: burst 1000, refill 33/s,
#: nghttp2 1.57's default (nghttp2_option_set_stream_reset_rate_limit). Envoy
#: resets an ext_proc stream before our first answer only when its downstream
#: request dies within a millisecond; resets of answered streams (a client
#: leaving a sampled response early) are not counted. Above it:
#: GOAWAY(ENHANCE_YOUR_CALM) and close.
H2_RESET_BURST = 1000
H2_RESET_RATE_PER_S = 33.0

#: Control frames (PING/SETTINGS ACKs, RST_STREAMs) we owe the peer while our
#: write buffer has not drained: Envoy's max_outbound_control_frames default
#: of 1000. A peer that floods PINGs and never reads the replies is closed
#: with GOAWAY(ENHANCE_YOUR_CALM) instead of growing our memory.
H2_MAX_PENDING_CONTROL_FRAMES = 1000


# --- Settings we advertise, and per-connection memory (h2frames) ---------------

#: Largest frame payload we accept (advertised in SETTINGS_MAX_FRAME_SIZE).
#: 1 MiB lets a peer send an 8 MiB request body in 8 frames instead of 512
#: (fewer Python iterations), while still bounding one frame's buffer.
#: grpc-go advertises 16 KiB, nghttp2 up to 16 MiB; Envoy honours the setting.
LOCAL_MAX_FRAME_SIZE = 1 << 20

#: Per-stream receive window (SETTINGS_INITIAL_WINDOW_SIZE). 16 MiB is larger
#: than the biggest gRPC message we accept (9 MiB, extproc.defaults
#: GRPC_MAX_MESSAGE_BYTES), so a whole body arrives without a WINDOW_UPDATE
#: round trip. Envoy's own default stream window is 256 MiB; grpc-go's BDP
#: estimator grows to 16 MiB.
LOCAL_INITIAL_WINDOW = 16 << 20

#: Connection receive window, opened by a WINDOW_UPDATE right after our
#: SETTINGS (the connection window cannot be set by SETTINGS). 64 MiB lets
#: several large bodies stream concurrently on Envoy's single connection;
#: Envoy's default connection window is 256 MiB.
LOCAL_CONNECTION_WINDOW = 64 << 20

#: Concurrent streams we allow (SETTINGS_MAX_CONCURRENT_STREAMS): one ext_proc
#: stream per in-flight HTTP request on Envoy's one connection per worker.
#: 4096 is above any plausible in-flight count per router worker, and bounds
#: per-connection memory (grpc C-core has no default cap; h2o uses 100).
LOCAL_MAX_CONCURRENT_STREAMS = 4096

#: Largest decoded header list we advertise (SETTINGS_MAX_HEADER_LIST_SIZE)
#: and enforce: H2_MAX_HEADER_LIST_SIZE above, under the name h2frames uses
#: for the values it advertises.
LOCAL_MAX_HEADER_LIST_SIZE = H2_MAX_HEADER_LIST_SIZE

#: Largest *encoded* header block we buffer across CONTINUATION frames.
#: Twice the decoded limit covers any sane encoding; past it the peer is
#: flooding CONTINUATIONs (CVE-2024-27316 class) and we drop the connection.
MAX_HEADER_BLOCK_BYTES = 2 * LOCAL_MAX_HEADER_LIST_SIZE

#: HPACK dynamic table we let the peer use: the RFC 7541 default of 4096.
LOCAL_HEADER_TABLE_SIZE = 4096

#: Decoded header blocks remembered per connection (see ``_decode``). Envoy's
#: ext_proc client sends the same block for every stream (its :path is a
#: Huffman literal *without* indexing, ~30 us to decode in pure Python), so
#: a handful of entries suffices; the cache is cleared when full.
HEADER_CACHE_ENTRIES = 64

#: We send a WINDOW_UPDATE once this fraction of a receive window has been
#: consumed: half, like nghttp2 and grpc-go, so updates are rare but the
#: sender never stalls.
WINDOW_UPDATE_RATIO = 0.5

#: Stream IDs we reset while the peer could still send on them, remembered so
#: that its late trailers (HEADERS + END_STREAM already in flight, RFC 9113
#: 5.1 "closed") are ignored while any other HEADERS on an old stream ID is
#: the PROTOCOL_ERROR RFC 9113 5.1.1 asks for. The oldest is forgotten first;
#: 1024 covers far more resets than fit in one round trip.
RECENT_RESETS = 1024


# --- Shell limits (the asyncio h2c server, extproc.serve.h2c) ------------------

#: Write-buffer high-water mark per connection: above it we stop reading
#: (asyncio pause_reading) until the peer has read our replies down to a
#: quarter of it (asyncio's default low mark). asyncio's own default is
#: 64 KiB; 1 MiB keeps Envoy's large body mutations flowing without a pause.
H2_WRITE_BUFFER_HIGH_WATER = 1 << 20

#: Concurrent HTTP/2 connections per worker process. Envoy opens one per
#: worker thread (even 16 Envoys x 32 threads is 512); a flood of idle
#: sockets is refused with a log line instead of exhausting file descriptors
#: (nginx worker_connections defaults to 512, Envoy's listener
#: max_connections is unset but its overload manager caps it). Also kept
#: H2_FD_RESERVE below the process's open-file limit.
H2_MAX_CONNECTIONS = 1024

#: listen() backlog of the ext_proc port, which asyncio also uses as the
#: number of sockets it accepts in one loop iteration before any of their
#: connection_made callbacks (where the cap above is enforced) runs; a
#: refused or evicted socket is closed one iteration later. So descriptors
#: stay within H2_MAX_CONNECTIONS + 2 x this under a connection flood. 100 is
#: asyncio's default (and nginx's listen backlog is 511); Envoy connects a
#: few sockets at a time.
H2_ACCEPT_BACKLOG = 100

#: File descriptors left to the rest of the process (state file, telemetry
#: sockets, the listening socket) when the open-file limit is below
#: H2_MAX_CONNECTIONS.
H2_FD_RESERVE = 64

#: The client preface and its SETTINGS must arrive within this time after
#: the TCP accept. Envoy sends them at once; grpc-go bounds its handshake
#: with ConnectionTimeout (120 s), nginx reading a request header with
#: client_header_timeout (60 s); a router on loopback / a pod network needs
#: far less.
H2_PREFACE_TIMEOUT_S = 10.0

#: A TLS handshake (ext_proc port with ``tls_cert_file``) must complete
#: within this time after the TCP accept, or the socket is closed and what it
#: held returned (issue 17: 6,000 half ClientHellos were held with no bound).
#: Envoy completes a loopback / pod-network handshake in milliseconds.
#: Precedents: nginx ssl_handshake_timeout and asyncio's default
#: ssl_handshake_timeout are 60 s, Go's http.Server bounds it with
#: ReadHeaderTimeout/ReadTimeout; 10 s is our H2_PREFACE_TIMEOUT_S, the bound
#: on the step right after it, and still 1000x a real handshake.
H2_TLS_HANDSHAKE_TIMEOUT_S = 10.0

#: TLS handshakes in progress at once per worker. Each counts against the
#: connection cap from its TCP accept; past this many the oldest one pending
#: is closed to make room (like the idle-connection eviction at the cap), so
#: a flood of half ClientHellos can never lock Envoy out: Envoy's handshakes
#: finish in milliseconds and are never the oldest. Envoy opens one
#: connection per worker thread, so it has at most a few dozen handshakes in
#: flight after a restart; 128 is several times that. (HAProxy bounds the
#: same thing with tune.maxsslconn / maxsslrate; nginx only by
#: worker_connections.)
H2_MAX_PENDING_HANDSHAKES = 128

#: What one pending TLS handshake costs the memory budget until it completes
#: or fails: asyncio's SSLProtocol allocates a 256 KiB read buffer per
#: connection (sslproto.SSLProtocol.max_size) and OpenSSL its SSL object and
#: BIOs (tens of KB); issue 17 measured ~250-350 KB of RSS per pending
#: handshake. 128 of them charge 40 MiB, under the connection share of
#: H2_CONNECTION_BUDGET_SHARE (64 MiB), so half handshakes alone never
#: exhaust the budget that streams need.
H2_TLS_HANDSHAKE_COST_BYTES = 320 << 10

#: What one established TLS connection costs the memory budget until it
#: closes: asyncio's SSLProtocol keeps a 256 KiB read buffer per connection
#: (sslproto.SSLProtocol.max_size; uvloop's is the same size,
#: SSL_READ_MAX_SIZE, touched once a peer sends a full one) and OpenSSL its
#: SSL object, session and BIOs. Measured on this machine: 293 KiB of RSS per
#: idle TLS connection on the standard loop, 42 KiB on uvloop while nothing
#: large was read (docs/attack.md); 288 KiB is the
#: buffer plus 32 KiB of OpenSSL state, the worst case either loop reaches.
#: Charged when the handshake completes (H2_TLS_HANDSHAKE_COST_BYTES is
#: returned then), returned when the connection closes.
H2_TLS_CONNECTION_COST_BYTES = 288 << 10

#: Share of the memory budget established TLS connections may hold together:
#: half (128 MiB, 455 connections at H2_TLS_CONNECTION_COST_BYTES), so that
#: idle TLS connections alone never leave streams less than the other half.
#: A handshake that completes past it makes room by closing the longest-idle
#: connection (as at H2_MAX_CONNECTIONS), or is closed if none is idle.
#: Envoy keeps one connection per worker thread: even 16 Envoys x 28 threads
#: fit.
H2_TLS_CONNECTIONS_BUDGET_SHARE = 0.5

#: A connection with no open stream and no frame for this long is closed with
#: GOAWAY(NO_ERROR); Envoy reconnects on its next request (one loopback
#: handshake). nginx's keepalive_timeout is 75 s, Envoy's upstream
#: idle_timeout 1 h; 5 minutes frees an attacker's sockets while Envoy's
#: connection between bursts of traffic survives.
H2_IDLE_TIMEOUT_S = 300.0

#: Bytes the router may hold for unfinished gRPC messages (a request body
#: arriving in many DATA frames) and for response bodies it scans for usage,
#: across all streams and connections of one worker process. Beyond it a new
#: stream, or a message that would not fit, gets RESOURCE_EXHAUSTED (gRPC
#: status 8): Envoy's ext_proc fails open and the request goes on. 256 MiB
#: is 32 bodies of the 8 MiB maximum at once (a typical chat body is 2-50
#: KB), in the spirit of Envoy's overload manager heap thresholds.
H2_MEMORY_BUDGET_BYTES = 256 << 20

#: What one open stream costs the memory budget before any body: its handler,
#: state machine and protobufs (1.7 KB of RSS per open Process stream measured
#: without telemetry; 4 KiB leaves room for the telemetry span). Without it,
#: 4096 header-only streams x H2_MAX_CONNECTIONS would be gigabytes; with it
#: the budget admits 65,536 open streams per worker.
H2_STREAM_COST_BYTES = 4 << 10

#: Share of the memory budget one connection may hold (its open streams,
#: their bodies and scanned responses): one peer filling a connection with
#: held streams leaves 3/4 of the budget to the others (issue 17: 20
#: connections x 4,000 held streams took all of it). A quarter is still 64
#: MiB, 16,384 open streams at H2_STREAM_COST_BYTES -- four times the
#: LOCAL_MAX_CONCURRENT_STREAMS Envoy's one connection per worker may open --
#: or eight 8 MiB bodies at once. Same idea as Envoy's per-connection
#: buffer limits (per_connection_buffer_limit_bytes) under a global overload
#: manager, and nginx's per-key limit_conn under worker_connections.
H2_CONNECTION_BUDGET_SHARE = 0.25

#: An ext_proc stream whose request phase (request headers and the body's
#: end, i.e. routed) has not completed this long after it opened is reset
#: (RST_STREAM CANCEL after gRPC status DEADLINE_EXCEEDED) and its memory
#: returned: a stream held open without ever finishing its request only
#: holds the budget. Envoy sends the body in BUFFERED mode once the
#: downstream client sent it all, so the time includes a slow client's
#: upload: nginx bounds that with client_header_timeout / client_body_timeout
#: 60 s, Envoy's HCM with stream_idle_timeout 300 s; Envoy's own per-message
#: ext_proc message_timeout is 200 ms, so a real request waits on us for
#: milliseconds, on its client for up to this. 60 s: nginx's bound; an
#: upload slower than that would fail at nginx too. Checked every
#: REQUEST_SWEEP_FRACTION of it per connection (not per stream: no timer on
#: the routing path), so a stream is reset within 1.25x of it.
H2_REQUEST_TIMEOUT_S = 60.0
REQUEST_SWEEP_FRACTION = 0.25

#: When the memory budget cannot take one more stream, the streams whose
#: request is still incomplete and that opened at least this long ago are
#: ended (gRPC status RESOURCE_EXHAUSTED, then RST_STREAM NO_ERROR), the oldest
#: first, to make room, instead of refusing the new stream (issue 17: 20
#: connections x 4,000 held streams filled the budget; the router then refused
#: every new stream, health went NOT_SERVING and Envoy sent 313 of 313
#: requests out unrouted). Envoy opens a stream when its request arrives and
#: sends the request phase within milliseconds (its body once the client sent
#: it all, BUFFERED mode), so the oldest incomplete streams are held ones, or
#: the slowest uploads, whose request then goes on unrouted (failure_mode_allow)
#: as it would at H2_REQUEST_TIMEOUT_S. A stream younger than this is never
#: reset (Envoy may still be sending its request phase; if all incomplete
#: streams are that young the new stream is refused as before): 100 ms is
#: 5-50x the routed latency through Envoy on this machine (p50 5-10 ms, p99
#: 20-80 ms under load, docs/attack.md) and a tenth of our Envoy message
#: timeout (extproc.defaults MESSAGE_TIMEOUT_MS, 1 s), short enough that a
#: flood filling the budget in a burst refuses new streams for at most that
#: long. The same idea as the eviction of the longest-idle connection at
#: H2_MAX_CONNECTIONS, and as Envoy's overload manager resetting streams
#: (envoy.overload_actions.reset_high_memory_stream), oldest-bucket first.
H2_RECLAIM_MIN_AGE_S = 0.1

#: Streams reset per reclaim, as a fraction of what the budget holds in
#: streams (1/16: 4,096 at the defaults): one O(open streams) scan makes room
#: for that many new ones, so under a held-stream flood the scan costs a few
#: microseconds per stream, not one scan per stream. A scan that finds nothing
#: old enough is not repeated for H2_RECLAIM_MIN_AGE_S (nothing can be older
#: before then, except streams already looked at).
H2_RECLAIM_FRACTION = 1 / 16

#: "Rapid reset by reconnecting" (issue 17): the per-connection reset bucket
#: above (H2_RESET_BURST) is fresh on every connection, so an attacker
#: sending 990 HEADERS+RST pairs per connection and reconnecting never meets
#: it. Resets of unanswered streams are therefore also counted per peer
#: address, across its connections, in fixed windows of this many seconds;
#: past H2_PEER_MAX_RESETS in one window the connection that crossed it gets
#: GOAWAY(ENHANCE_YOUR_CALM) and, for H2_PEER_BAN_S, new connections from the
#: address are on probation (fast transport): accepted, but closed with
#: GOAWAY(ENHANCE_YOUR_CALM) at their first reset of an unanswered stream, so
#: the attacker gets one pair per connection while Envoy sharing its address
#: (health checks, reconnects; bench/attack.py --attacker-source 127.0.0.1
#: saw 0 of 15 new-connection health checks pass when such connections were
#: refused) is served. The grpcio transport refuses the address's calls
#: instead (it cannot close a connection). 2,000 per 10 s is twice nghttp2's burst for one
#: connection and about what its refill allows one connection in the window
#: (1000 + 33/s x 10 s); Envoy, resetting an unanswered ext_proc stream only
#: when its downstream request dies within milliseconds, stays far below it
#: on all its connections together. The ban is the window again (nginx's
#: limit_req / fail2ban shape, minutes there; seconds here, since Envoy
#: shares the address of a rogue sidecar in the same pod).
H2_PEER_RESET_WINDOW_S = 10.0
H2_PEER_MAX_RESETS = 2000
H2_PEER_BAN_S = 10.0

#: Decoded request-header lists whose fields the fast transport keeps read,
#: per connection (``_GrpcConnection._on_request``; issue 19: reading the
#: same fields out of the same list on every stream cost ~2 us each). Envoy
#: sends one header block for all its ext_proc streams of a connection, one
#: for health checks and one per traced request when tracing is on, and
#: h2frames hands out one list per distinct block (its own cache), so a
#: handful of entries hit nearly always. A peer that varies its blocks gets
#: the table cleared when full: at most 16 entries of ~1 KB each per
#: connection, the size of nghttp2's default HPACK table (4 KiB) several times
#: over, never more.
H2_HEADERS_READ_ENTRIES = 16

#: A connection on probation (above) has what it sends parsed this many bytes
#: at a time, so that closing it at its first reset costs the parse of one
#: slice (~50 HEADERS+RST pairs), not of its whole read (up to 256 KiB, ~3,000
#: pairs): bench/attack.py's reconnecting attacker cost the router 1.9 s of CPU
#: and the client a p99 of 265 ms before, with whole reads parsed. 4 KiB is
#: one page and a quarter of a default HTTP/2 frame; Envoy on probation pays
#: one more parse call per 4 KiB (about 1 ms per MiB of body) for at most
#: H2_PEER_BAN_S.
H2_PROBATION_SLICE_BYTES = 4 << 10

#: Concurrent calls one peer address may hold on the grpcio transport (issue
#: 17: grpc.aio has no per-connection memory share, so the per-peer count is
#: what it can bound): Envoy's ext_proc connections of one host together
#: stay under LOCAL_MAX_CONCURRENT_STREAMS x its worker threads; 16,384 is
#: the per-connection share of the fast transport's budget in streams
#: (H2_CONNECTION_BUDGET_SHARE x H2_MEMORY_BUDGET_BYTES / H2_STREAM_COST_BYTES).
#: Past it a new call gets RESOURCE_EXHAUSTED.
GRPCIO_PEER_MAX_CALLS = 16_384

#: Peer addresses whose resets we track at once; past it, the entries whose
#: window has ended are dropped (and all of them if none has), so that a
#: spread of source addresses cannot grow memory.
H2_MAX_TRACKED_PEERS = 4096

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
#: that has not moved (50 ms, the order of asyncio's slow-callback warning
#: of 100 ms; the idle timeout it serves is minutes).
MIN_TIMER_S = 0.05

#: Largest grpc-timeout we honour as a deadline (the header allows 8 digits
#: of hours). Anything longer is treated as no deadline; 1 day is beyond any
#: ext_proc stream, whose lifetime is one HTTP request.
MAX_DEADLINE_S = 86_400.0


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """The limits one h2c server applies, each defaulting to its constant
    above. ``max_connections=None`` means ``connection_limit()``."""

    max_connections: int | None = None
    preface_timeout_s: float = H2_PREFACE_TIMEOUT_S
    idle_timeout_s: float = H2_IDLE_TIMEOUT_S
    memory_budget_bytes: int = H2_MEMORY_BUDGET_BYTES
    write_buffer_high_water: int = H2_WRITE_BUFFER_HIGH_WATER
    stream_cost_bytes: int = H2_STREAM_COST_BYTES
    connection_budget_share: float = H2_CONNECTION_BUDGET_SHARE
    request_timeout_s: float = H2_REQUEST_TIMEOUT_S
    peer_reset_window_s: float = H2_PEER_RESET_WINDOW_S
    peer_max_resets: int = H2_PEER_MAX_RESETS
    peer_ban_s: float = H2_PEER_BAN_S
    tls_handshake_timeout_s: float = H2_TLS_HANDSHAKE_TIMEOUT_S
    max_pending_handshakes: int = H2_MAX_PENDING_HANDSHAKES
    tls_handshake_cost_bytes: int = H2_TLS_HANDSHAKE_COST_BYTES
    tls_connection_cost_bytes: int = H2_TLS_CONNECTION_COST_BYTES
    tls_connections_budget_share: float = H2_TLS_CONNECTIONS_BUDGET_SHARE
    reclaim_min_age_s: float = H2_RECLAIM_MIN_AGE_S
    peer_max_calls: int = GRPCIO_PEER_MAX_CALLS  # grpcio transport only

    def connections(self) -> int:
        """The connection cap this server enforces."""
        return self.max_connections if self.max_connections is not None else connection_limit()


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


class PeerResets:
    """Resets of unanswered streams per peer address, across its connections,
    in fixed windows (peer_reset_window_s); past peer_max_resets in a window
    the address is banned for peer_ban_s. Pure: the caller passes ``now``.
    At most H2_MAX_TRACKED_PEERS addresses are tracked (entries whose window
    ended are dropped first, all if none has), so a spread of source
    addresses cannot grow memory. Used by both transports."""

    __slots__ = ("limits", "_resets", "_banned")

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self._resets: dict[str, list] = {}  # peer address -> [window start, resets in it]
        self._banned: dict[str, float] = {}  # peer address -> time its ban ends

    def note(self, peer: str, now: float) -> bool:
        """Count one reset from ``peer``; True when it is over the limit (the
        peer is then banned)."""
        limits = self.limits
        entry = self._resets.get(peer)
        if entry is None or now - entry[0] >= limits.peer_reset_window_s:
            if entry is None and len(self._resets) >= H2_MAX_TRACKED_PEERS:
                self._forget(now)
            entry = self._resets[peer] = [now, 0]
        entry[1] += 1
        if entry[1] <= limits.peer_max_resets:
            return False
        self._banned[peer] = now + limits.peer_ban_s
        return True

    def banned(self, peer: str, now: float) -> bool:
        until = self._banned.get(peer)
        if until is None:
            return False
        if now < until:
            return True
        del self._banned[peer]
        return False

    def _forget(self, now: float) -> None:
        window = self.limits.peer_reset_window_s
        old = [p for p, (start, _) in self._resets.items() if now - start >= window]
        for p in old or list(self._resets):
            del self._resets[p]
        if len(self._banned) >= H2_MAX_TRACKED_PEERS:
            self._banned = {p: t for p, t in self._banned.items() if t > now}


class PeriodicWarnings:
    """Warnings logged at most once per LOG_PERIOD_S per kind, with the
    count of those left out, for both transports (an attacker must not turn
    the router's log into a flood)."""

    def __init__(self, logger: logging.Logger):
        self.log = logger
        self._warned: dict[str, tuple[float, int]] = {}  # kind -> (last logged, left out since)

    def warn(self, kind: str, msg: str, *args) -> None:
        now = time.monotonic()
        last, left_out = self._warned.get(kind, (-LOG_PERIOD_S, 0))
        if now - last < LOG_PERIOD_S:
            self._warned[kind] = (last, left_out + 1)
            return
        self._warned[kind] = (now, 0)
        if left_out:
            msg += " (%d more like it not logged)"
            args += (left_out,)
        self.log.warning(msg, *args)

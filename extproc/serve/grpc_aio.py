"""The reference gRPC server: the same service on grpc.aio.

The baseline the fast server (``extproc.serve.h2c``) is measured against
(docs/bench.md) and a fallback (config: ``[router] transport = "grpcio"``).
It serves the contract of ``extproc.serve.rpc``; its HTTP/2 limits are
grpc's own, except the message size, which the caller passes, and
SETTINGS_MAX_CONCURRENT_STREAMS (limits.LOCAL_MAX_CONCURRENT_STREAMS).

Per-peer abuse accounting (issue 17), as far as grpc.aio allows: calls are
counted per peer address (``context.peer()`` without its port) across
connections. A peer holding more than ``peer_max_calls`` open calls, or one
banned for resets, gets RESOURCE_EXHAUSTED on each new call. A call that
ends before we answered anything (a client cancel, or -- grpc.aio cannot tell
them apart while the handler waits for a request -- a half-close with no
request) counts as a reset of an unanswered stream in ``limits.PeerResets``;
past peer_max_resets in the window the address is banned for peer_ban_s.
What grpc.aio does not let us do: refuse or close a connection (no accept
hook, no GOAWAY of ours), see streams C-core reset before dispatching them to
Python (C-core's own rapid-reset handling covers those), or bound memory
per connection. ``GrpcioServer.counters`` counts what it did.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Iterable, Mapping

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2

from ..tls import TlsFiles, grpc_server_credentials
from .limits import LOCAL_MAX_CONCURRENT_STREAMS, PeerResets, PeriodicWarnings, ServerLimits
from .rpc import (
    DEFAULT_HEALTH_SERVICES,
    EXT_PROC_SERVICE,
    OK,
    TRACE_METADATA,
    NewStream,
    StreamingMethod,
    UnaryMethod,
)

log = logging.getLogger("extproc.serve.grpc_aio")


class GrpcioServer:
    def __init__(self, server, health_servicer, port: int, health_services: Iterable[str] = (),
                 counters: collections.Counter | None = None):
        self._server = server
        #: What the per-peer accounting did (peer_refused, peer_calls_refused, peer_resets_exceeded).
        self.counters: collections.Counter[str] = counters if counters is not None else collections.Counter()
        self._health = health_servicer
        self._health_services = tuple(health_services)
        self.port = port

    async def set_serving(self, serving: bool) -> None:
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
    limits: ServerLimits | None = None,
) -> GrpcioServer:
    """The same service on grpc.aio (baseline / fallback); with ``tls``,
    grpc's own TLS (``require_client_auth`` when a client CA is set).
    ``limits``: peer_max_calls and the peer reset window/limit/ban."""
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    limits = limits or ServerLimits()
    peers = PeerResets(limits)
    warnings = PeriodicWarnings(log)
    open_calls: collections.Counter[str] = collections.Counter()  # peer address -> open Process calls
    counters: collections.Counter[str] = collections.Counter()
    loop = asyncio.get_running_loop()

    async def process(request_iterator, context):
        peer = _peer_address(context.peer())
        if peers.banned(peer, loop.time()):
            counters["peer_refused"] += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many stream resets from this address")
        if open_calls[peer] >= limits.peer_max_calls:
            counters["peer_calls_refused"] += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open calls from this address")
        open_calls[peer] += 1
        meta = {k: v for k, v in context.invocation_metadata() or () if k in TRACE_METADATA}
        handler = new_stream(meta)
        state = [0]  # 0: open, 1: closed by us or failed, 2: client half-closed
        answered = [False]  # a response was written

        def done(ctx) -> None:
            left = open_calls[peer] - 1
            if left > 0:
                open_calls[peer] = left
            else:
                del open_calls[peer]
            if not answered[0] and (state[0] == 2 or ctx.cancelled()) and peers.note(peer, loop.time()):
                counters["peer_resets_exceeded"] += 1
                warnings.warn("peer_resets_exceeded",
                              "refusing calls from %s for %.0f s: more than %d unanswered calls ended in %.0f s",
                              peer, limits.peer_ban_s, limits.peer_max_resets, limits.peer_reset_window_s)
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
                answered[0] = True
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
            ("grpc.max_concurrent_streams", LOCAL_MAX_CONCURRENT_STREAMS),
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
    return GrpcioServer(server, health_servicer, bound, health_services, counters)


def _peer_address(peer: str) -> str:
    """The address of a grpc peer string without its port:
    "ipv4:127.0.0.1:5000" -> "127.0.0.1", "ipv6:[::1]:5000" -> "::1"."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return rest or peer

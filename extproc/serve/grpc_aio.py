"""The reference gRPC server: the same service on grpc.aio.

The baseline the fast server (``extproc.serve.h2c``) is measured against
(docs/bench.md) and a fallback (config: ``[router] transport = "grpcio"``).
It serves the contract of ``extproc.serve.rpc``; its HTTP/2 limits are
grpc's own, except the message size, which the caller passes.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2

from ..tls import TlsFiles, grpc_server_credentials
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
    def __init__(self, server, health_servicer, port: int, health_services: Iterable[str] = ()):
        self._server = server
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

"""Transports measured only for the comparison in docs/bench.md (not used in
production): grpcio's synchronous server on a ThreadPoolExecutor, and
grpclib (pure-Python gRPC on the ``h2`` library)."""

from __future__ import annotations

import asyncio
from concurrent import futures

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2

from extproc.serve.rpc import HEALTH_CHECK_METHOD, PROCESS_METHOD, EXT_PROC_SERVICE

#: Threads of the sync server: one per concurrently open stream (a stream
#: holds its thread), so above the benchmark's concurrency of 16.
SYNC_THREADS = 64


class _SyncServer:
    def __init__(self, server, port):
        self._server = server
        self.port = port

    async def stop(self, grace_seconds=None):
        await asyncio.get_running_loop().run_in_executor(None, lambda: self._server.stop(grace_seconds).wait())


async def serve_grpc_sync(new_stream, host, port, *, max_message_bytes, health_services=("", EXT_PROC_SERVICE)):
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    def process(request_iterator, context):
        handler = new_stream()
        for req in request_iterator:
            responses, close = handler.receive(req)
            yield from responses
            if close:
                return
        handler.finish()

    rpc = grpc.stream_stream_rpc_method_handler(
        process,
        request_deserializer=pb.ProcessingRequest.FromString,
        response_serializer=pb.ProcessingResponse.SerializeToString,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=SYNC_THREADS),
        options=[("grpc.max_receive_message_length", max_message_bytes), ("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(EXT_PROC_SERVICE, {"Process": rpc}),))
    hs = health.HealthServicer()
    for name in health_services:
        hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return _SyncServer(server, bound)


class _GrpclibServer:
    def __init__(self, server, port):
        self._server = server
        self.port = port

    async def stop(self, grace_seconds=None):
        self._server.close()
        await self._server.wait_closed()


async def serve_grpclib(new_stream, host, port, *, max_message_bytes, health_services=("", EXT_PROC_SERVICE)):
    from grpclib.const import Cardinality, Handler, Status
    from grpclib.server import Server

    services = frozenset(health_services)

    class Service:
        def __mapping__(self):
            return {
                PROCESS_METHOD: Handler(self.process, Cardinality.STREAM_STREAM, pb.ProcessingRequest, pb.ProcessingResponse),
                HEALTH_CHECK_METHOD: Handler(
                    self.check, Cardinality.UNARY_UNARY, health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
                ),
            }

        async def process(self, stream):
            handler = new_stream()
            async for req in stream:
                responses, close = handler.receive(req)
                for r in responses:
                    await stream.send_message(r)
                if close:
                    return
            handler.finish()

        async def check(self, stream):
            req = await stream.recv_message()
            if req.service not in services:
                await stream.send_trailing_metadata(status=Status.NOT_FOUND)
                return
            await stream.send_message(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING))

    server = Server([Service()])
    await server.start(host, port)
    bound = server._server.sockets[0].getsockname()[1]
    return _GrpclibServer(server, bound)

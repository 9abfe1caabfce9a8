"""The admin plane: the admin API on its own port, apart from ext_proc.

Worker i serves ``budget_router.admin.v1.Admin``, ``grpc.health.v1.Health``
and server reflection on ``[admin] listen``:``[admin] port + i`` (loopback by
default). The data plane's port (``[router] port``) carries ext_proc and the
health check Envoy needs, nothing that steers the router, so the network
policy of each port can follow who needs it: Envoy reaches ext_proc, only
operators (and peers warm-starting) reach admin.

grpc.aio serves it: the admin plane sees a few calls a minute, so the
purpose-built transport's CPU savings buy nothing here, while grpc.aio brings
TLS/mTLS and the flood limits of a hardened HTTP/2 stack for free.

Every call but health is authenticated (``extproc.admin.auth``) before its
handler runs; a refused call ends with UNAUTHENTICATED and is logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .. import config as C
from .. import tls
from ..core.estimator import snapshot_bound_bytes
from . import auth
from . import service as admin_service

log = logging.getLogger("budget_router.admin")

HEALTH_PREFIX = "/grpc.health.v1.Health/"

def max_message_bytes(cfg: C.Config) -> int:
    """Limit on one admin message (TakeSnapshot's reply, RestoreSnapshot's
    request, both ends): the largest calibration this config's table can
    hold (``estimator.snapshot_bound_bytes``), which also bounds what one
    call can make a worker parse."""
    return snapshot_bound_bytes(cfg.estimator.max_models) + SNAPSHOT_ENVELOPE_BYTES


#: Protobuf framing and the sample count around the snapshot JSON.
SNAPSHOT_ENVELOPE_BYTES = 1024

#: How long in-flight admin calls may finish at stop (they are in-memory).
STOP_GRACE_S = 1.0

_STATUS = {c.value[0]: c for c in grpc.StatusCode}


class _AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: auth.Authenticator):
        self.auth = authenticator

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        if self.auth.allows(details.invocation_metadata or ()):
            return handler
        return _deny(handler, details.method)


#: Refused calls are logged at most once per this many seconds (with the
#: count of the ones in between), so a client hammering the port without a
#: token cannot flood the log (like sshd's MaxStartups and fail2ban's
#: summaries, one line stands for a burst).
REFUSED_LOG_INTERVAL_S = 1.0


class _RefusedLog:
    def __init__(self) -> None:
        self.last = -REFUSED_LOG_INTERVAL_S
        self.suppressed = 0

    def note(self, method: str, peer: str) -> None:
        now = time.monotonic()
        if now - self.last < REFUSED_LOG_INTERVAL_S:
            self.suppressed += 1
            return
        log.warning("admin call refused (no or wrong token): %s from %s (+%d more refused since the last line)",
                    method, peer, self.suppressed,
                    extra={"fields": {"method": method, "peer": peer, "refused_since_last": self.suppressed}})
        self.last, self.suppressed = now, 0


_refused = _RefusedLog()


def _deny(handler, method: str):
    message = "admin call refused: send 'authorization: Bearer <token>' with the admin token"

    async def refuse(request_or_iterator, context):
        _refused.note(method, context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


def _admin_handler(svc: admin_service.AdminService, authenticator: auth.Authenticator) -> grpc.GenericRpcHandler:
    def unary(parse, fn):
        async def call(request: bytes, context):
            caller = f"peer={context.peer()} token={authenticator.identify(context.invocation_metadata() or ())}"
            try:
                req = parse(request)
            except DecodeError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "could not parse the request message")
            try:
                return fn(req, caller)
            except admin_service.AdminError as e:
                await context.abort(_STATUS.get(e.code, grpc.StatusCode.UNKNOWN), e.message)
        return grpc.unary_unary_rpc_method_handler(call, response_serializer=lambda m: m.SerializeToString())

    return grpc.method_handlers_generic_handler(
        admin_service.SERVICE, {name: unary(parse, fn) for name, (parse, fn) in svc.methods().items()})


def server_credentials(cfg: C.AdminConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the admin port (mTLS with tls_client_ca_file)."""
    return tls.grpc_server_credentials(tls.TlsFiles.of("admin", cfg))


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def channel_credentials(cfg: C.AdminConfig) -> grpc.ChannelCredentials | None:
    """Client side of server_credentials (the CLI, warm start): the CA in
    tls_client_ca_file verifies the server, this host's cert/key are the
    client certificate (peers of one fleet share a CA)."""
    return tls.grpc_channel_credentials(tls.TlsFiles.of("admin", cfg))


class AdminPlane:
    def __init__(self, server: grpc.aio.Server, health_servicer: Any, port: int):
        self.server = server
        self.health = health_servicer
        self.port = port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", admin_service.SERVICE):
            await self.health.set(name, status)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(STOP_GRACE_S)


async def serve(worker: Any, cfg: C.Config, port: int, tokens: tuple[str, ...] | None,
                config_path: str | None) -> AdminPlane:
    """Start the admin plane of ``worker`` on ``[admin] listen``:``port``,
    accepting any of ``tokens`` (``auth.load_tokens``). Health answers
    NOT_SERVING until ``set_serving(True)``."""
    auth.check_exposure(cfg, tokens)
    authenticator = auth.Authenticator(tokens)
    limit = max_message_bytes(cfg)
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(interceptors=[_AuthInterceptor(authenticator)], options=options)
    svc = admin_service.AdminService(worker, config_path)
    server.add_generic_rpc_handlers((_admin_handler(svc, authenticator),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [admin_service.SERVICE, "grpc.health.v1.Health", reflection.SERVICE_NAME], server)
    address = join_host_port(cfg.admin.listen, port)
    creds = server_credentials(cfg.admin)
    try:
        bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError(f"admin plane: cannot listen on {address} (in use?)")
    await server.start()
    plane = AdminPlane(server, health_servicer, bound)
    await plane.set_serving(False)
    return plane

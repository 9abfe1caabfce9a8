"""Warm start: a replica without a snapshot of its own takes a peer's.

At start, before the ext_proc port opens (so before it reports ready), a
worker that restored nothing from its state file asks every address of
``[admin] warm_start_peers`` (each ``host:port``; a name that resolves to many
addresses, e.g. a Kubernetes headless Service, means each of them) for its
calibration with the admin API's ``TakeSnapshot`` (authenticated with the
admin token, over TLS when the admin plane uses it). It keeps the answer that
has learned from the most samples and passes the plausibility check a state
file passes (``Router.restore``); peers that have learned nothing (a replica
starting at the same time, this one itself) are skipped. If no peer answers
within ``warm_start_timeout_s`` the worker starts from the prior.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import grpc

from .. import config as C
from ..dns import addresses
from . import auth
from .service import log_dropped, restore_json
from .plane import channel_credentials, join_host_port, max_message_bytes
from .v1 import admin_pb2 as pb
from .v1 import admin_pb2_grpc as pbg

log = logging.getLogger("budget_router.warm_start")

#: Peers asked at most (addresses after DNS resolution): a headless Service of
#: a large fleet resolves to every pod; 32 answers are plenty to find a warm
#: one, and the bound keeps a start from opening hundreds of connections.
MAX_WARM_START_PEERS = 32

#: Once one peer has answered with a calibration, how long the others may
#: still answer with a better-trained one: peers on one network answer within
#: milliseconds, and this keeps one dead address from costing the whole timeout.
WARM_START_GRACE_S = 0.5


async def resolve(peers: tuple[str, ...]) -> list[str]:
    """gRPC targets of every address of every ``host:port`` (deduplicated, in order)."""
    out: list[str] = []
    for peer in peers:
        try:
            found = await addresses(peer)
        except (socket.gaierror, OSError) as e:
            log.info("warm start: cannot resolve %s: %s", peer, e)
            continue
        for ip, port in found:
            target = join_host_port(ip, port)
            if target not in out:
                out.append(target)
    return out[:MAX_WARM_START_PEERS]


async def _ask(target: str, cfg: C.Config, token: str | None, timeout: float) -> tuple[str, pb.Snapshot] | None:
    options = [("grpc.max_receive_message_length", max_message_bytes(cfg))]
    creds = channel_credentials(cfg.admin)
    channel = (grpc.aio.secure_channel(target, creds, options=options) if creds
               else grpc.aio.insecure_channel(target, options=options))
    async with channel:
        try:
            snap = await pbg.AdminStub(channel).TakeSnapshot(
                pb.TakeSnapshotRequest(write=False), metadata=auth.call_metadata(token), timeout=timeout,
                wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            log.info("warm start: peer %s: %s %s", target, e.code().name, e.details())
            return None
        except (OSError, ValueError) as e:
            log.info("warm start: peer %s: %s", target, e)
            return None
    return target, snap


async def warm_start(router: Any, cfg: C.Config, token: str | None) -> str | None:
    """Restore ``router`` from the best peer; returns the peer's address, or
    None (the router keeps the prior) when none answered with a usable one."""
    timeout = cfg.admin.warm_start_timeout_s
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    targets = await resolve(cfg.admin.warm_start_peers)
    # wait_for_ready: a peer that is still starting gets until the deadline.
    pending = {asyncio.create_task(_ask(t, cfg, token, max(0.01, deadline - loop.time()))) for t in targets}
    answers: list[tuple[str, pb.Snapshot]] = []

    def collect(done) -> None:
        answers.extend(r for r in (t.result() for t in done) if r is not None and r[1].samples > 0)

    while pending and not answers:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        collect(done)
    if pending:
        # One warm peer found: the others get WARM_START_GRACE_S more to
        # offer a better-trained calibration, never past the deadline.
        done, pending = await asyncio.wait(pending, timeout=min(WARM_START_GRACE_S, max(0.0, deadline - loop.time())))
        collect(done)
        for t in pending:
            t.cancel()
    for target, snap in sorted(answers, key=lambda a: -a[1].samples):
        try:
            log_dropped(f"warm start from {target}", restore_json(router, snap.state_json))
        except ValueError as e:
            log.warning("warm start: calibration from %s refused: %s", target, e)
            continue
        log.info("warm start: calibration from %s (%d samples)", target, router.samples(),
                 extra={"fields": {"peer": target, "samples": router.samples()}})
        return target
    log.info("warm start: no peer answered with a calibration within %.1f s (%d address(es) asked); "
             "starting from the prior", timeout, len(targets))
    return None

"""The router service: worker processes that pump ext_proc streams into the core.

Thin shell. Each worker process owns one ``Router`` (the pure core), listens
on its own port (``config.worker_ports``: Envoy's ext_proc cluster lists every
worker as an endpoint, so each gets its own HTTP/2 connection and the streams
spread over processes), creates one ``StreamMachine`` per stream, snapshots
calibration periodically and on shutdown, and drains in-flight streams on
SIGTERM/SIGINT. With ``workers > 1`` a supervisor process starts the workers,
restarts one that dies, and forwards signals.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing as mp
import os
import random
import signal
import time

from google.protobuf.message import DecodeError

from . import monitor as mon
from . import snapshot
from . import transport
from ..admin import reflection
from ..admin import service as admin_service
from ..config import Config, worker_ports
from ..core.machine import StreamMachine
from ..core.router import Router

log = logging.getLogger("budget_router")

HEALTH_SERVICE = "grpc.health.v1.Health"

#: gRPC framing and the request headers travel with the body in one message:
#: 1 MiB above the body limit (gRPC's 4 MiB default would answer 500 for long
#: prompts), matching the Envoy side (``extproc.envoy.bootstrap``).
GRPC_HEADROOM_BYTES = 1024 * 1024

#: A worker that dies is restarted after this pause, so a crash loop costs
#: one start per second instead of a busy spin (like systemd's RestartSec).
RESTART_PAUSE_S = 1.0


def max_message_bytes(cfg: Config) -> int:
    return cfg.router.max_body_bytes + GRPC_HEADROOM_BYTES


class Worker:
    """One router worker: core + transport + snapshots (no process logic)."""

    def __init__(self, cfg: Config, index: int = 0, rng: random.Random | None = None, telemetry: bool = True,
                 config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.index = index
        self.router = Router(cfg)
        self.rng = rng or random.Random()
        self.server = None
        self.state_path = snapshot.worker_path(cfg.router.state_file, index)
        self.streams = 0
        self.telemetry = None
        if telemetry:
            from .telemetry import Telemetry
            self.telemetry = Telemetry(cfg, self.router, index)

    def load_state(self) -> None:
        state, src = snapshot.load_best(self.cfg.router.state_file)
        if state is None:
            return
        try:
            self.router.restore(state)
            log.info("worker %d: calibration restored from %s", self.index, src)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("worker %d: ignoring calibration snapshot %s: %s", self.index, src, e)

    def save_state(self) -> None:
        try:
            snapshot.save(self.state_path, self.router.snapshot())
        except OSError as e:
            log.warning("worker %d: could not write calibration snapshot %s: %s", self.index, self.state_path, e)

    def new_stream(self, metadata: dict[str, str] | None = None):
        """One ext_proc stream; ``metadata`` is the gRPC call's trace context."""
        self.streams += 1
        m = StreamMachine(self.router, self.rng.random)
        return self.telemetry.wrap(m, metadata) if self.telemetry is not None else m

    async def start(self, port: int | None = None) -> int:
        self.load_state()
        port = worker_ports(self.cfg)[self.index] if port is None else port
        # Everything allocated so far (modules, protobuf descriptors, numpy,
        # the restored calibration) lives for the whole process: move it out
        # of the cyclic GC's sight so collections scan only per-request
        # garbage (the technique CPython added gc.freeze() for, PEP-less,
        # after Instagram's pre-fork servers).
        gc.collect()
        gc.freeze()
        self.server = await transport.serve(
            self.cfg.router.transport, self.new_stream, self.cfg.router.listen, port,
            max_message_bytes=max_message_bytes(self.cfg), unary=self.admin_methods(),
            streaming=reflection.methods([transport.EXT_PROC_SERVICE, HEALTH_SERVICE, admin_service.SERVICE]))
        return self.server.port

    def admin_methods(self) -> dict[str, transport.UnaryMethod]:
        """The admin API (protos/budget_router/admin/v1) as unary methods."""
        svc = admin_service.AdminService(self, self.config_path)

        def method(parse, fn):
            def call(request: bytes) -> tuple[int, str, bytes]:
                try:
                    req = parse(request)
                except DecodeError:
                    return admin_service.INVALID_ARGUMENT, "could not parse the request message", b""
                try:
                    return transport.OK, "", fn(req).SerializeToString()
                except admin_service.AdminError as e:
                    return e.code, e.message, b""
            return call

        return {f"/{admin_service.SERVICE}/{name}": method(parse, fn)
                for name, (parse, fn) in svc.methods().items()}

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(self.cfg.router.drain_seconds)
            self.server = None
        self.save_state()
        if self.telemetry is not None:
            self.telemetry.shutdown()

    async def run_until(self, stop: asyncio.Event) -> None:
        async def snapshots() -> None:
            while True:
                await asyncio.sleep(self.cfg.router.snapshot_interval_s)
                self.save_state()

        tasks = [asyncio.create_task(snapshots())]
        if self.cfg.monitor.enabled:
            tasks.append(asyncio.create_task(self.follow_signals()))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.stop()

    async def follow_signals(self) -> None:
        """Feed the router the tiers' load every monitor interval: scraped
        here with one worker, else read from the supervisor's published file."""
        if self.cfg.router.workers == 1:
            m = mon.Monitor(self.cfg)
            await m.run(lambda inst: mon.observe(self.router, inst, time.time()))
            return
        path = mon.signals_path(self.cfg)
        while True:
            mon.observe(self.router, mon.read_published(path) or {}, time.time())
            await asyncio.sleep(self.cfg.monitor.interval_s)


async def _worker_main(cfg: Config, index: int, config_path: str | None = None) -> None:
    w = Worker(cfg, index, config_path=config_path)
    port = await w.start()
    log.info("worker %d (pid %d) serving ext_proc on %s:%d via %s",
             index, os.getpid(), cfg.router.listen, port, cfg.router.transport)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await w.run_until(stop)
    log.info("worker %d drained and stopped", index)


def _worker_process(cfg: Config, index: int, config_path: str | None) -> None:
    setup_logging()
    asyncio.run(_worker_main(cfg, index, config_path))


def setup_logging(level: str | None = None) -> None:
    """JSON lines on stderr (BUDGET_ROUTER_LOG_FORMAT=text for people)."""
    from .telemetry import JsonFormatter
    handler = logging.StreamHandler()
    if os.environ.get("BUDGET_ROUTER_LOG_FORMAT", "json") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("BUDGET_ROUTER_LOG_LEVEL", "INFO")).upper())


def serve(cfg: Config, config_path: str | None = None) -> int:
    """Run the router until SIGTERM/SIGINT. Returns an exit code.
    ``config_path`` is what the admin API's ReloadConfig re-reads."""
    setup_logging()
    if cfg.router.workers == 1:
        asyncio.run(_worker_main(cfg, 0, config_path))
        return 0
    ctx = mp.get_context("spawn")
    procs: dict[int, mp.Process] = {}
    stopping = False

    def start(i: int) -> None:
        p = ctx.Process(target=_worker_process, args=(cfg, i, config_path), name=f"budget-router-w{i}", daemon=False)
        p.start()
        procs[i] = p

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # One monitor for all workers: they read what it publishes (serve.monitor).
    monitor = mon.PublishingThread(cfg).start() if cfg.monitor.enabled else None
    for i in range(cfg.router.workers):
        start(i)
    while True:
        for i, p in list(procs.items()):
            p.join(timeout=0.2)
            if p.is_alive():
                continue
            if stopping:
                procs.pop(i)
            else:
                log.error("worker %d exited with %s; restarting", i, p.exitcode)
                time.sleep(RESTART_PAUSE_S)
                start(i)
        if stopping and not procs:
            if monitor is not None:
                monitor.stop()
            return 0

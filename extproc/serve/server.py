"""The router service: worker processes that pump ext_proc streams into the core.

Thin shell. Each worker process owns one ``Router`` (the pure core), listens
on its own port (``config.worker_ports``: Envoy's ext_proc cluster lists every
worker as an endpoint, so each gets its own HTTP/2 connection and the streams
spread over processes), creates one ``StreamMachine`` per stream, snapshots
calibration periodically, after ``snapshot_samples`` new samples and on
shutdown, and drains on SIGTERM (health NOT_SERVING for ``drain_delay_s``
while still serving, then in-flight streams get ``drain_seconds``); SIGHUP
reloads the config file. With ``workers > 1`` a supervisor process starts the
workers, restarts one that dies, and forwards signals; a worker gets SIGTERM
from the kernel if the supervisor dies (parent-death signal). Every signal's
behaviour: README "Signals".

Start order of a worker: stale snapshot temporaries removed, state file
restored (all or nothing), admin plane up on its own port
(``extproc.admin.plane``), warm start from a peer if nothing was restored,
then the ext_proc port opens: a worker is ready (ext_proc health SERVING)
only once its calibration is in place.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing as mp
import os
import random
import signal
import sys
import time

from .loop import choose as choose_loop, run as run_loop
from . import monitor as mon
from . import snapshot
from .. import tls
from . import transport
from .rpc import EXT_PROC_SERVICE
from ..admin import auth as admin_auth
from ..admin import plane as admin_plane
from ..admin import reflection
from ..admin import service as admin_service
from ..admin import warm
from ..config import Config, admin_ports, worker_ports
from .. import defaults as D
from ..defaults import SNAPSHOT_MIN_GAP_S
from ..core.machine import StreamMachine
from ..core.estimator import snapshot_bound_bytes
from ..core.router import Router

log = logging.getLogger("budget_router")

HEALTH_SERVICE = "grpc.health.v1.Health"

#: A worker that dies is restarted after this pause, so a crash loop costs
#: one start per second instead of a busy spin (like systemd's RestartSec).
RESTART_PAUSE_S = 1.0


#: How often the snapshot task looks at the sample count: a timer wakeup per
#: second costs nothing measurable and bounds the lag of the count trigger.
SNAPSHOT_CHECK_S = 1.0


def max_message_bytes(cfg: Config) -> int:
    """The ext_proc server's receive limit: gRPC framing and the request
    headers travel with the body in one message, so the body limit plus
    D.BODY_HEADROOM_BYTES (gRPC's 4 MiB default would answer 500 for long
    prompts), as Envoy's side (``envoy.bootstrap.grpc_max_message_bytes``)."""
    return cfg.router.max_body_bytes + D.BODY_HEADROOM_BYTES


def router_tls(cfg: Config) -> tls.TlsFiles | None:
    """The ext_proc port's TLS files ([router] tls_*), None for plain h2c."""
    return tls.TlsFiles.of("router", cfg.router)


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
        self.admin: admin_plane.AdminPlane | None = None
        self.warm_peer: str | None = None
        self.saved_samples = 0
        self.state_path = snapshot.worker_path(cfg.router.state_file, index)
        self.streams = 0
        self.snapshot_failures = 0
        self.telemetry = None
        if telemetry:
            from .telemetry import Telemetry
            self.telemetry = Telemetry(cfg, self.router, index, worker_state=self)

    def load_state(self) -> bool:
        """Restore the best snapshot file (a bad part costs only itself,
        logged; a bad root or layout costs the file); True if restored."""
        snapshot.remove_stale_temps(self.state_path)
        state, src = snapshot.load_best(self.cfg.router.state_file,
                                        snapshot_bound_bytes(self.cfg.estimator.max_models))
        if state is None:
            return False
        try:
            dropped = self.router.restore(state)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("worker %d: calibration snapshot %s refused, nothing restored (starting from the prior): %s",
                        self.index, src, e)
            return False
        admin_service.log_dropped(f"worker {self.index}: {src}", dropped)
        log.info("worker %d: calibration restored from %s (%d samples)", self.index, src, self.router.samples())
        return True

    def save_state(self) -> OSError | None:
        """Write the calibration snapshot; returns the error if the write
        failed (a full disk, a read-only volume), which is also logged and
        counted (``budget_router_snapshot_failures_total``); the previous
        file stays as it was."""
        samples = self.router.samples()
        try:
            snapshot.save(self.state_path, self.router.snapshot())
        except OSError as e:
            self.snapshot_failures += 1
            log.warning("worker %d: could not write calibration snapshot %s: %s", self.index, self.state_path, e,
                        extra={"fields": {"snapshot_failures": self.snapshot_failures}})
            return e
        self.saved_samples = samples
        return None

    def new_stream(self, metadata: dict[str, str] | None = None):
        """One ext_proc stream; ``metadata`` is the gRPC call's trace context."""
        self.streams += 1
        m = StreamMachine(self.router, self.rng.random)
        return self.telemetry.wrap(m, metadata) if self.telemetry is not None else m

    async def start(self, port: int | None = None, admin_port: int | None = None) -> int:
        restored = self.load_state()
        tokens = admin_auth.load_tokens(self.cfg)
        admin_port = admin_ports(self.cfg)[self.index] if admin_port is None else admin_port
        self.admin = await admin_plane.serve(self, self.cfg, admin_port, tokens, self.config_path)
        if not restored and self.cfg.admin.warm_start_peers:
            self.warm_peer = await warm.warm_start(self.router, self.cfg, tokens[0] if tokens else None)
        self.saved_samples = self.router.samples()
        port = worker_ports(self.cfg)[self.index] if port is None else port
        # Everything allocated so far (modules, protobuf descriptors, numpy,
        # the restored calibration) lives for the whole process: move it out
        # of the cyclic GC's sight so collections scan only per-request
        # garbage (the technique CPython added gc.freeze() for, PEP-less,
        # after Instagram's pre-fork servers).
        gc.collect()
        gc.freeze()
        # The data plane's port: ext_proc and its health check, nothing that
        # steers the router (that is the admin plane's port).
        self.server = await transport.serve(
            self.cfg.router.transport, self.new_stream, self.cfg.router.listen, port,
            max_message_bytes=max_message_bytes(self.cfg),
            streaming=reflection.methods([EXT_PROC_SERVICE, HEALTH_SERVICE]),
            tls=router_tls(self.cfg))
        await self.admin.set_serving(True)
        return self.server.port

    async def drain(self, skip: asyncio.Event | None = None) -> None:
        """Before ``stop``: health NOT_SERVING on the ext_proc and admin ports
        while streams are still served, for [router] drain_delay_s (cut short
        when ``skip`` is set: a second SIGTERM/SIGINT), so Envoy takes this
        worker out of its cluster before the port closes."""
        delay = self.cfg.router.drain_delay_s
        if self.server is not None and hasattr(self.server, "set_serving"):
            await self.server.set_serving(False)
        if self.admin is not None:
            await self.admin.set_serving(False)
        if delay <= 0:
            return
        log.info("worker %d: draining: health NOT_SERVING, still serving for %.1f s", self.index, delay,
                 extra={"fields": {"drain_delay_s": delay}})
        waiter = asyncio.ensure_future((skip or asyncio.Event()).wait())
        try:
            await asyncio.wait_for(waiter, timeout=delay)
        except asyncio.TimeoutError:
            pass

    def reload(self) -> None:
        """SIGHUP: re-read the configured file as admin ReloadConfig does
        (live keys applied, the rest reported as needing a restart); a bad
        file is logged and changes nothing."""
        from ..admin.v1 import admin_pb2 as pb
        svc = admin_service.AdminService(self, self.config_path)
        try:
            res = svc.reload_config(pb.ReloadConfigRequest(), caller="signal SIGHUP")
        except admin_service.AdminError as e:
            log.error("worker %d: SIGHUP: configuration not reloaded, nothing changed: %s", self.index, e.message)
            return
        log.info("worker %d: SIGHUP: configuration reloaded from %s%s", self.index,
                 self.config_path or "the environment",
                 f" (needs a restart: {', '.join(res.restart_required)})" if res.restart_required else "")

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(self.cfg.router.drain_seconds)
            self.server = None
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        self.save_state()
        if self.telemetry is not None:
            self.telemetry.shutdown()

    async def run_until(self, stop: asyncio.Event, skip_drain: asyncio.Event | None = None) -> None:
        async def snapshots() -> None:
            # Every snapshot_interval_s, and sooner once snapshot_samples new
            # samples were learned (at most one per SNAPSHOT_MIN_GAP_S).
            last = time.monotonic()
            while True:
                r = self.cfg.router
                await asyncio.sleep(min(r.snapshot_interval_s, SNAPSHOT_CHECK_S))
                now = time.monotonic()
                new = self.router.samples() - self.saved_samples
                if now - last >= r.snapshot_interval_s or (
                        r.snapshot_samples and new >= r.snapshot_samples and now - last >= SNAPSHOT_MIN_GAP_S):
                    self.save_state()
                    last = now

        tasks = [asyncio.create_task(snapshots())]
        if self.cfg.monitor.enabled:
            tasks.append(asyncio.create_task(self.follow_signals()))
        try:
            await stop.wait()
            await self.drain(skip_drain)
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
    # Signals first: a SIGTERM during start (a warm start takes seconds) stops
    # the worker cleanly once started, with a snapshot, instead of killing it.
    # SIGTERM: drain (NOT_SERVING for drain_delay_s), then stop; SIGINT (a
    # person at a terminal): stop without the delay; either one again during
    # the delay: stop now. SIGHUP: reload the config file.
    stop, skip_drain = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop(delay: bool) -> None:
        if stop.is_set() or not delay:
            skip_drain.set()
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_stop, True)
    loop.add_signal_handler(signal.SIGINT, on_stop, False)
    loop.add_signal_handler(signal.SIGHUP, w.reload)
    port = await w.start()
    files = router_tls(cfg)
    security = "h2c" if files is None else "mTLS" if files.mutual else "TLS"
    log.info("worker %d (pid %d) serving ext_proc on %s:%d via %s over %s, admin on %s:%d",
             index, os.getpid(), cfg.router.listen, port, cfg.router.transport, security, cfg.admin.listen,
             w.admin.port)
    await w.run_until(stop, skip_drain)
    log.info("worker %d drained and stopped", index)


#: prctl(2) option: the signal the kernel sends this process when its parent
#: dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """Ask the kernel for SIGTERM when the supervisor dies (even by kill -9),
    so a worker never outlives it holding its ports: it drains and stops as on
    any SIGTERM. Linux only (prctl PR_SET_PDEATHSIG); returns False where not
    available. If the supervisor is already gone (it died before the call),
    the worker stops at once."""
    ok = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            ok = libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
        except (OSError, AttributeError):
            ok = False
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
    return ok


def _worker_process(cfg: Config, index: int, config_path: str | None, parent_pid: int | None = None) -> None:
    setup_logging()
    # The supervisor's signal handlers are not inherited (spawn), but its
    # ignored signals would be: start from the defaults.
    if parent_pid is not None and not die_with_parent(parent_pid):
        log.warning("worker %d: no parent-death signal on this platform: stop the supervisor with SIGTERM", index)
    run_loop(_worker_main(cfg, index, config_path), choose_loop())


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
    # Refuse an unprotected non-loopback admin plane (or an unreadable token
    # or TLS file) here, with the config error, before any worker starts: a
    # worker failing on it would only be restarted over and over.
    admin_auth.check_exposure(cfg, admin_auth.load_tokens(cfg))
    admin_plane.server_credentials(cfg.admin)  # TLS files readable (ConfigError if not)
    files = router_tls(cfg)
    if files is not None:
        tls.server_context(files)  # ext_proc port's cert/key/CA readable, PEM, matching
    if cfg.router.workers == 1:
        run_loop(_worker_main(cfg, 0, config_path), choose_loop())
        return 0
    ctx = mp.get_context("spawn")
    procs: dict[int, mp.Process] = {}
    stopping = False

    def start(i: int) -> None:
        p = ctx.Process(target=_worker_process, args=(cfg, i, config_path, os.getpid()),
                        name=f"budget-router-w{i}", daemon=False)
        p.start()
        procs[i] = p

    def forward(signum: int) -> None:
        for p in procs.values():
            if p.is_alive():
                os.kill(p.pid, signum)

    def on_signal(signum, frame) -> None:
        # SIGTERM / SIGINT: every worker drains and stops, then the
        # supervisor exits; the same signal again reaches the workers again
        # (cutting their drain delay short).
        nonlocal stopping
        stopping = True
        forward(signum)

    def on_hup(signum, frame) -> None:
        log.info("supervisor: SIGHUP: every worker reloads the configuration")
        forward(signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
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

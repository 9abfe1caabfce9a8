"""Pool signals: scrape every tier endpoint's vLLM ``/metrics``, off the request path.

Shell around ``extproc.core.load`` (which parses and aggregates). Every
``[monitor] interval_s`` the monitor resolves each endpoint's host again (a
Kubernetes headless Service name resolves to one address per pod, and pods
come and go), fetches ``http://<address>:<port>/metrics`` from every address
at once with a deadline of half the interval, and keeps each instance's last
two samples. Addresses that no longer resolve are dropped; one that does not
answer keeps its old sample, which turns unknown after ``stale_intervals``.

Sharing with ``--workers N``: the supervisor process runs the one monitor (in
a thread with its own event loop) and publishes the samples as a small JSON
file beside the calibration snapshot (``<state_file>.signals.json``, written
to a temporary file and renamed, so a reader never sees half a file); each
worker reads it once per interval. So every endpoint is scraped once per
interval whatever the worker count, a worker restart loses nothing, and there
is no lock or shared-memory layout to keep in step with the code (a shared
memory segment would save one ~1 KB file read per worker per second: nothing).
With one worker the monitor runs inside it and feeds its router directly.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Callable, Mapping

import aiohttp
import orjson

from .. import defaults as D
from ..config import Config
from ..core.load import Instance, instances_from_json, instances_to_json, parse_metrics, tier_loads
from ..dns import addresses
from .snapshot import atomic_write

log = logging.getLogger("budget_router.monitor")

#: Largest /metrics body read: vLLM's exposition is ~30-60 KB (histograms per
#: engine); 4 MiB bounds a misdirected scrape of something else.
MAX_METRICS_BYTES = 4 * 1024 * 1024

Instances = dict[str, dict[str, Instance]]


def signals_path(cfg: Config) -> str:
    """Where the supervisor publishes the samples for its workers."""
    return cfg.router.state_file + ".signals.json"


class Monitor:
    """Scrapes the tiers of ``cfg``; ``instances`` holds the samples
    (tier -> "ip:port" -> Instance). ``clock`` is wall time, shared by
    processes reading the published file."""

    def __init__(self, cfg: Config, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.clock = clock
        self.instances: Instances = {t.name: {} for t in cfg.tiers}
        self.scrapes = 0
        self.errors = 0
        self._session: aiohttp.ClientSession | None = None

    async def _resolve(self, ep: str) -> list[tuple[str, int]]:
        try:
            return await addresses(ep)
        except (socket.gaierror, UnicodeError) as e:
            log.warning("monitor: cannot resolve %s: %s", ep, e)
            return []

    async def _fetch(self, ip: str, port: int) -> str | None:
        assert self._session is not None
        host = f"[{ip}]" if ":" in ip else ip
        try:
            async with self._session.get(f"http://{host}:{port}/metrics") as r:
                if r.status != 200:
                    return None
                body = await r.content.read(MAX_METRICS_BYTES)
                return body.decode("utf-8", "replace")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None

    async def scrape_once(self) -> None:
        """One round: resolve every endpoint, scrape every address in parallel."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.cfg.monitor.interval_s * D.MONITOR_TIMEOUT_FRACTION)
            self._session = aiohttp.ClientSession(timeout=timeout)
        targets: list[tuple[str, str, int]] = []
        for tier in self.cfg.tiers:
            resolved = await asyncio.gather(*(self._resolve(ep) for ep in tier.endpoints))
            addrs = {a for group in resolved for a in group}
            current = self.instances.setdefault(tier.name, {})
            for gone in set(current) - {f"{ip}:{port}" for ip, port in addrs}:
                del current[gone]  # the DNS name no longer lists it (pod gone)
            targets += [(tier.name, ip, port) for ip, port in sorted(addrs)]
        texts = await asyncio.gather(*(self._fetch(ip, port) for _, ip, port in targets))
        now = self.clock()
        for (tier, ip, port), text in zip(targets, texts):
            self.scrapes += 1
            sample = parse_metrics(text, now) if text is not None else None
            if sample is None:
                self.errors += 1
                continue
            key = f"{ip}:{port}"
            old = self.instances[tier].get(key)
            self.instances[tier][key] = old.then(sample) if old else Instance(sample)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self, on_round: Callable[[Instances], None] | None = None,
                  stop: asyncio.Event | None = None) -> None:
        """Scrape every interval until cancelled (or ``stop`` is set)."""
        interval = self.cfg.monitor.interval_s
        try:
            while stop is None or not stop.is_set():
                t0 = time.monotonic()
                try:
                    await self.scrape_once()
                    if on_round is not None:
                        on_round(self.instances)
                except Exception:  # a monitor bug must never take the router down
                    log.exception("monitor round failed")
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))
        finally:
            await self.close()


def publish(path: str, instances: Mapping[str, Mapping[str, Instance]]) -> None:
    """Write the samples atomically (temporary file + rename; no fsync: they
    are worthless after three intervals anyway)."""
    atomic_write(path, orjson.dumps(instances_to_json(instances)), ".signals-", durable=False)


def read_published(path: str) -> Instances | None:
    """The supervisor's latest samples, or None (not there yet, or unreadable)."""
    try:
        with open(path, "rb") as f:
            return instances_from_json(orjson.loads(f.read()))
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError, ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("monitor: ignoring unreadable signals file %s: %s", path, e)
        return None


class PublishingThread:
    """The supervisor's monitor: a daemon thread with its own event loop,
    publishing every round to ``signals_path(cfg)``."""

    def __init__(self, cfg: Config):
        self.monitor = Monitor(cfg)
        self.path = signals_path(cfg)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._main, name="budget-router-monitor", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self.monitor.run(lambda inst: publish(self.path, inst), self._stop))

    def start(self) -> "PublishingThread":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)


def observe(router, instances: Instances, now: float) -> list:
    """Feed ``router`` the tiers' load computed from ``instances`` at ``now``;
    logs and returns the adaptive threshold's moves."""
    cfg = router.cfg
    loads = tier_loads([t.name for t in cfg.tiers], instances, now, cfg.monitor.interval_s,
                       cfg.monitor.stale_intervals)
    moves = router.observe(loads, now)
    for m in moves:
        log.info("tier boundary %d moved %d -> %d (%s)", m.boundary, m.old, m.new, m.why,
                 extra={"fields": {"tier": cfg.tiers[m.boundary].name, "old": m.old, "new": m.new}})
    return moves

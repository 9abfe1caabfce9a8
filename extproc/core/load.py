"""Per-tier load from vLLM's own metrics: pure (text and samples in, load out).

The monitor (``extproc.serve.monitor``) scrapes every endpoint's ``/metrics``
and keeps the last two samples per instance; this module parses the text and
turns samples into one ``TierLoad`` per tier. The planner feeds the same
function with its simulated instances' samples, so stale and noisy signals
are modelled the same way online and offline.

Signals (vLLM 0.32 names, labels ``{engine, model_name}``; several label sets
on one instance are summed, KV usage is averaged):

* ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` (gauges),
* ``vllm:kv_cache_usage_perc`` (gauge, a share 0-1 despite its name),
* ``vllm:num_preemptions_total`` (counter): a rate from two samples.

A sample older than ``stale_intervals`` scrape intervals counts as unknown; a
tier with no fresh sample is unknown (``known=False``) and the closed loop
leaves it alone (static routing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
PREEMPTIONS = "vllm:num_preemptions_total"

#: vLLM before 0.7 called the KV gauge gpu_cache_usage_perc; read it as well.
KV_USAGE_LEGACY = "vllm:gpu_cache_usage_perc"

_WANTED = (RUNNING, WAITING, KV_USAGE, KV_USAGE_LEGACY, PREEMPTIONS)


@dataclass(frozen=True, slots=True)
class Sample:
    """One scrape of one instance at time ``t`` (seconds, the caller's clock)."""

    t: float
    running: float
    waiting: float
    kv_usage: float | None = None
    preemptions: float | None = None  # the cumulative counter

    def to_list(self) -> list:
        return [self.t, self.running, self.waiting, self.kv_usage, self.preemptions]

    @classmethod
    def from_list(cls, row: list) -> "Sample":
        return cls(float(row[0]), float(row[1]), float(row[2]),
                   None if row[3] is None else float(row[3]), None if row[4] is None else float(row[4]))


@dataclass(frozen=True, slots=True)
class Instance:
    """The latest sample of one instance and the one before it (for rates)."""

    last: Sample
    prev: Sample | None = None

    def then(self, sample: Sample) -> "Instance":
        return Instance(sample, self.last)

    def preemption_rate(self) -> float:
        """Preemptions per second between the two samples (0 without two, or
        across a counter reset: a restarted vLLM starts again from 0)."""
        p, q = self.prev, self.last
        if p is None or p.preemptions is None or q.preemptions is None or q.t <= p.t:
            return 0.0
        delta = q.preemptions - p.preemptions
        return delta / (q.t - p.t) if delta >= 0 else 0.0


@dataclass(frozen=True, slots=True)
class TierLoad:
    """What the router sees of one tier now."""

    name: str
    known: bool = False
    instances: int = 0          # instances with a fresh sample
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0       # mean over fresh instances that report it
    preemption_rate: float = 0.0  # per second, whole tier
    age_s: float = math.inf     # age of the newest sample (inf: none)

    @property
    def waiting_per_instance(self) -> float:
        return self.waiting / self.instances if self.instances else 0.0

    @property
    def pressure(self) -> float:
        """Queueing plus preemptions per instance: what the adaptive threshold
        balances between neighbouring tiers."""
        if not self.instances:
            return 0.0
        return (self.waiting + self.preemption_rate) / self.instances

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "known": self.known, "instances": self.instances, "running": self.running,
                "waiting": self.waiting, "kv_usage": round(self.kv_usage, 4),
                "preemption_rate": round(self.preemption_rate, 4),
                "age_s": None if math.isinf(self.age_s) else round(self.age_s, 3)}


def _label_free_name(line: str) -> tuple[str, str] | None:
    """(metric name, value text) of one exposition line, or None."""
    if not line or line[0] == "#":
        return None
    brace = line.find("{")
    if brace >= 0:
        name = line[:brace]
        close = line.rfind("}")
        if close < brace:
            return None
        rest = line[close + 1:].split()
    else:
        parts = line.split()
        if len(parts) < 2:
            return None
        name, rest = parts[0], parts[1:]
    if not rest:
        return None
    return name.strip(), rest[0]


def parse_metrics(text: str, t: float) -> Sample | None:
    """A ``Sample`` at time ``t`` from a Prometheus text exposition, or None
    when it has no vLLM request gauges (not a vLLM endpoint)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for line in text.splitlines():
        parsed = _label_free_name(line.strip())
        if parsed is None or parsed[0] not in _WANTED:
            continue
        name, value = parsed
        try:
            v = float(value)
        except ValueError:
            continue
        if math.isnan(v):
            continue
        sums[name] = sums.get(name, 0.0) + v
        counts[name] = counts.get(name, 0) + 1
    if RUNNING not in sums and WAITING not in sums:
        return None
    kv_name = KV_USAGE if KV_USAGE in sums else KV_USAGE_LEGACY if KV_USAGE_LEGACY in sums else None
    kv = sums[kv_name] / counts[kv_name] if kv_name else None
    return Sample(t, sums.get(RUNNING, 0.0), sums.get(WAITING, 0.0), kv, sums.get(PREEMPTIONS))


def tier_load(name: str, instances: Iterable[Instance], now: float, max_age_s: float) -> TierLoad:
    """Aggregate one tier's instances; samples older than ``max_age_s`` are unknown."""
    fresh = [i for i in instances if now - i.last.t <= max_age_s]
    if not fresh:
        return TierLoad(name)
    kvs = [i.last.kv_usage for i in fresh if i.last.kv_usage is not None]
    return TierLoad(
        name, True, len(fresh),
        running=sum(i.last.running for i in fresh),
        waiting=sum(i.last.waiting for i in fresh),
        kv_usage=sum(kvs) / len(kvs) if kvs else 0.0,
        preemption_rate=sum(i.preemption_rate() for i in fresh),
        age_s=max(0.0, now - max(i.last.t for i in fresh)),
    )


def tier_loads(names: Iterable[str], instances: Mapping[str, Mapping[str, Instance]], now: float,
               interval_s: float, stale_intervals: int) -> tuple[TierLoad, ...]:
    """One ``TierLoad`` per tier name, in order; ``instances`` maps tier name ->
    instance address -> ``Instance``."""
    max_age = interval_s * stale_intervals
    return tuple(tier_load(n, instances.get(n, {}).values(), now, max_age) for n in names)


def instances_to_json(instances: Mapping[str, Mapping[str, Instance]]) -> dict:
    return {"tiers": {tier: {addr: {"last": i.last.to_list(), "prev": i.prev.to_list() if i.prev else None}
                             for addr, i in per.items()} for tier, per in instances.items()}}


def instances_from_json(doc: Mapping) -> dict[str, dict[str, Instance]]:
    """Inverse of ``instances_to_json``; raises ValueError/TypeError/KeyError on junk."""
    return {tier: {addr: Instance(Sample.from_list(v["last"]), Sample.from_list(v["prev"]) if v["prev"] else None)
                   for addr, v in per.items()} for tier, per in doc["tiers"].items()}

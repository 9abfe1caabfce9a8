"""The worker pool: simulations of one plan over every core, each distinct
(fleet, seed) run once. `simulate` is pure, so a cached result is the result."""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from . import closed_form
from ..sim.fleet import FleetSpec, simulate
from ..sim.hardware import InstanceConfig
from ..sim.metrics import class_of, summarize
from ..sim.stop import MissRule, over_capacity
from ..sim.traces import Trace, perturb
from .steady import utilization, verdict


class Workers:
    """map() over a process pool (fork) when workers > 1, else in process."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.ex = None
        if self.workers > 1:
            self.ex = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"))

    def map(self, fn, items: list, cost=None) -> list:
        """[fn(x) for x in items], in parallel. ``cost(x)``: an estimate of the
        work of x; the costliest items are submitted first (longest processing
        time first), so a long job does not start last and leave a core idle.
        The results come back in the order of ``items`` whatever the order run."""
        if self.ex is None or len(items) <= 1:
            return [fn(x) for x in items]
        order = list(range(len(items)))
        if cost is not None:
            order.sort(key=lambda k: -cost(items[k]))
        out = [None] * len(items)
        for k, r in zip(order, self.ex.map(fn, [items[k] for k in order])):
            out[k] = r
        return out

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown()


@dataclass(frozen=True)
class ThroughputJob:
    """One instance of `cfg` on `trace`'s request mix, offline (`closed_form.throughput`)."""

    cfg: InstanceConfig
    trace: Trace = field(compare=False, repr=False)
    seed: int = 0


def throughput(job: ThroughputJob) -> float:
    return closed_form.throughput(job.cfg, job.trace, seed=job.seed) if len(job.trace) else 0.0


@dataclass(frozen=True)
class EvalKey:
    """What a fleet simulation's summary depends on, the trace aside (one cache per trace)."""

    spec: FleetSpec
    seed: int
    boundary: int
    measure_from: float = 0.0
    stop: tuple | None = None


@dataclass(frozen=True)
class EvalJob:
    """Simulate `spec` on `trace` perturbed by `seed`; summarize from `measure_from` s.

    ``stop``: (per-class P99 TTFT targets in ms, in `metrics.CLASSES` order;
    preemptions per 1K) to end a single-pool run as soon as it surely misses
    them or is over capacity (`sim.stop`); its summary then carries
    ``stopped`` and partial figures."""

    trace: Trace = field(compare=False, repr=False)
    spec: FleetSpec
    seed: int
    boundary: int
    measure_from: float = 0.0
    stop: tuple | None = None

    @property
    def key(self) -> EvalKey:
        return EvalKey(self.spec, self.seed, self.boundary, self.measure_from, self.stop)


def miss_rule(tr: Trace, job: EvalJob) -> MissRule | None:
    """The early-exit rule of a single-pool job on its perturbed trace (None: run to the end)."""
    if job.stop is None or len(job.spec.pools) != 1 or len(tr) == 0:
        return None
    ttft_ms, preempt = job.stop
    p = job.spec.pools[0]
    on = tr.arrival >= job.measure_from
    rule = MissRule(tr.arrival, class_of(tr.prompt + tr.output, job.boundary), on,
                    (tr.prompt + tr.output) > p.cfg.max_model_len, list(ttft_ms), preempt)
    if on.sum() > 1:  # `steady.verdict`'s capacity check, from the requests alone
        window_s = float(tr.arrival[on].max() - tr.arrival[on].min())
        rule.pre = over_capacity(utilization(p.cfg, p.count, tr.prompt[on], tr.output[on], window_s))
    return rule


def evaluate(job: EvalJob) -> dict:
    """The run's summary with its steady-state verdict (`steady.verdict`) as
    `steady`, and `stopped` when the early-exit rule ended it (`sim.stop`)."""
    tr = perturb(job.trace, job.seed)
    r = simulate(tr, job.spec, seed=job.seed, stop=miss_rule(tr, job))
    out = summarize(r, job.boundary, job.measure_from)
    out["steady"] = verdict(r, job.measure_from)
    if r.stopped is not None:
        out["stopped"] = r.stopped
    return out


def evaluate_unique(ex: Workers, jobs: list[EvalJob], cache: dict) -> list[dict]:
    """`evaluate` over jobs, each distinct (fleet, seed) simulated once: designs
    that come out the same (the sized baseline is often the best homogeneous
    pool) share their runs, and a design not grown in a round is not rerun."""
    todo: dict[EvalKey, EvalJob] = {}
    for j in jobs:
        if j.key not in cache and j.key not in todo:
            todo[j.key] = j
    for k, r in zip(todo, ex.map(evaluate, list(todo.values()), cost=lambda j: j.spec.instances)):
        cache[k] = r
    return [cache[j.key] for j in jobs]

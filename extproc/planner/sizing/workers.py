"""The worker pool: simulations of one plan over every core, each distinct
(fleet, seed) run once. `simulate` is pure, so a cached result is the result."""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

from . import closed_form
from ..sim.fleet import FleetSpec, PoolSpec, simulate
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

    ``stop``: (per-class P99 TTFT and TPOT targets in ms, in `metrics.CLASSES`
    order; preemptions per 1K) to end a single-pool run as soon as it surely misses
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
    ttft_ms, tpot_ms, preempt = job.stop
    p = job.spec.pools[0]
    on = tr.arrival >= job.measure_from
    rule = MissRule(tr.arrival, class_of(tr.prompt + tr.output, job.boundary), on,
                    (tr.prompt + tr.output) > p.cfg.max_model_len, list(ttft_ms), preempt,
                    tr.output, list(tpot_ms))
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


def fits_all(trace: Trace, cfg: InstanceConfig) -> bool:
    """Every request of the trace fits cfg's max_model_len (none is rejected)."""
    return len(trace) == 0 or int((trace.prompt + trace.output).max()) <= cfg.max_model_len


def same_run_cfg(trace: Trace, cfg: InstanceConfig) -> InstanceConfig:
    """cfg as far as a run on this trace can tell: max_model_len only rejects
    requests on arrival (`instance.Instance.add`), so when every request fits
    it changes nothing in the run and is left out (0) of the cache key."""
    return cfg.with_(max_model_len=0) if fits_all(trace, cfg) else cfg


def run_key(job: EvalJob) -> tuple:
    """What a run's figures depend on: a single pool's name and a max_model_len
    that rejects nothing do not (a split's short pool that gets every request
    runs as the single pool does); the pools' names go back in with `renamed`."""
    sp = job.spec
    if len(sp.pools) != 1:
        return (job.key,)
    p = sp.pools[0]
    norm = replace(sp, pools=(PoolSpec("", same_run_cfg(job.trace, p.cfg), p.count),))
    return (replace(job.key, spec=norm),)


def renamed(summary: dict, spec: FleetSpec) -> dict:
    """A single-pool run's summary as `spec` (same run, another pool name and
    max_model_len) reports it: the pool's name and the spec's description."""
    (name,) = summary["pools"]
    new = spec.pools[0].name
    out = dict(summary, spec=spec.describe())
    out["pools"] = {new: summary["pools"][name]}
    st = summary.get("steady")
    if st is not None:
        out["steady"] = dict(st, pools={new: st["pools"][name]})
    return out


def evaluate_unique(ex: Workers, jobs: list[EvalJob], cache: dict) -> list[dict]:
    """`evaluate` over jobs, each distinct run simulated once (`run_key`):
    designs that come out the same (the sized baseline is often the best
    homogeneous pool; a split whose short pool gets every request is that
    pool) share their runs, and a design not grown in a round is not rerun."""
    return evaluate_many(ex, [(jobs, cache)])[0]


def evaluate_many(ex: Workers, groups: list[tuple[list[EvalJob], dict]]) -> list[list[dict]]:
    """`evaluate_unique` for several (jobs, cache) groups -- one per trace, each
    trace with its own cache (`EvalKey` leaves the trace out) -- in one map over
    the workers, so the runs on several traces share the cores."""
    todo: list[dict[tuple, EvalJob]] = []
    for jobs, cache in groups:
        t: dict[tuple, EvalJob] = {}
        for j in jobs:
            k = run_key(j)
            if k not in cache and k not in t:
                t[k] = j
        todo.append(t)
    flat = [(g, k, j) for g, t in enumerate(todo) for k, j in t.items()]
    for (g, k, j), r in zip(flat, ex.map(evaluate, [j for _, _, j in flat],
                                         cost=lambda j: j.spec.instances * len(j.trace))):
        groups[g][1][k] = (r, j.spec)
    out = []
    for jobs, cache in groups:
        res = []
        for j in jobs:
            r, spec = cache[run_key(j)]
            res.append(r if spec == j.spec else renamed(r, j.spec))
        out.append(res)
    return out

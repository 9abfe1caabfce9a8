"""A fleet of vLLM instances in pools, a router and an in-pool balancer.

Discrete-event loop over arrivals. Before a request is dispatched, every
instance whose next completion is due is advanced, so what the balancer reads
(active requests, queue, KV use) is current. The router's pool decision is
`pick_pool` (one function: the routing hook); the in-pool choice is a
`balancers.Balancer` (Envoy LEAST_REQUEST by default).
"""
from __future__ import annotations

import heapq
import math
import sys
from dataclasses import dataclass, field

import numpy as np

from ...defaults import MARGIN_SIGMAS, MIN_MARGIN, OUTPUT_QUANTILE
from . import balancers
from .balancers import BALANCERS, DEFAULT_BALANCER, SCRAPE_INTERVAL_S
from .hardware import InstanceConfig
from .instance import INF, Instance, Records, Seq
from .traces import Trace

#: Default relative error of the "noise" router at p90 (|est/true - 1|): the
#: project's byte-ratio estimator is off by 9-15% for a typical text after
#: calibration (../shared/data/README.md); 10% is the middle.
NOISE_P90 = 0.10

#: z-score of the 90th percentile of a half-normal |N(0,1)|.
_Z90_HALF = 1.6449

# The router's safety margin is the router's own (extproc/defaults.py
# MARGIN_SIGMAS, MIN_MARGIN: the defaults of [policy] margin_sigmas /
# min_margin), imported above, never restated: MARGIN_SIGMAS x the mean
# absolute relative error, floored at MIN_MARGIN. With 1.25 sigmas and a
# lognormal error of p90 10% this is ~5.8%.

#: The noise router does not know output lengths: like the running router it
#: adds a learned quantile of the outputs it has seen (extproc/defaults.py
#: OUTPUT_QUANTILE, 0.85) to the prompt estimate.

ROUTERS = ("oracle", "noise", "estimator")


@dataclass(frozen=True)
class PoolSpec:
    name: str
    cfg: InstanceConfig
    count: int


@dataclass(frozen=True)
class FleetSpec:
    pools: tuple  # (PoolSpec,) homogeneous, (short, long) or one per tier
    b_short: int | None = None  # None: one pool takes everything
    router: str = "oracle"
    noise_p90: float = NOISE_P90
    margin: float | None = None  # None: the router's learned-margin rule
    spillover: bool = False  # the router's spillover (core.spillover) on the simulated signals
    adaptive: bool = False   # the router's adaptive boundaries (core.threshold)
    limits: tuple | None = None  # budget limit per tier but the last (N tiers); None: (b_short,)
    balancer: str = DEFAULT_BALANCER
    scrape_interval: float = SCRAPE_INTERVAL_S

    @property
    def tier_limits(self) -> tuple:
        return self.limits if self.limits is not None else (self.b_short,)

    @property
    def instances(self) -> int:
        return sum(p.count for p in self.pools)

    @property
    def gpus(self) -> int:
        return sum(p.count * p.cfg.tp for p in self.pools)

    def describe(self) -> str:
        ps = " + ".join(f"{p.count}x[{p.name}: {p.cfg.label()}]" for p in self.pools)
        r = "" if self.b_short is None else f" limits={','.join(map(str, self.tier_limits))} router={self.router}"
        return (ps + r + (" spillover" if self.spillover else "") + (" adaptive" if self.adaptive else "")
                + f" balancer={self.balancer}")


def noise_sigma(p90: float) -> float:
    """Sigma of a lognormal relative error whose |error| p90 is `p90`."""
    return math.log1p(p90) / _Z90_HALF


def default_margin(p90: float) -> float:
    sigma = noise_sigma(p90)
    return max(MIN_MARGIN, MARGIN_SIGMAS * sigma * math.sqrt(2 / math.pi))


def route(trace: Trace, spec: FleetSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pool index per request, balancer work estimate per request)."""
    n = len(trace)
    P = trace.prompt.astype(np.float64)
    O = trace.output.astype(np.float64)
    if spec.router == "oracle":
        budget = P + O
    elif spec.router == "noise":
        est = prompt_estimate(trace, spec, seed)
        m = default_margin(spec.noise_p90) if spec.margin is None else spec.margin
        budget = est * (1 + m) + float(np.quantile(O, OUTPUT_QUANTILE))
    elif spec.router == "estimator":
        if trace.est_budget is None:
            raise ValueError("router 'estimator' needs a replay trace (budget/pool fields); "
                             "use --router noise for traces without text")
        budget = trace.est_budget.astype(np.float64)
    else:
        raise ValueError(f"unknown router {spec.router!r}; one of {ROUTERS}")
    if len(spec.pools) == 1 or spec.b_short is None:
        return np.zeros(n, dtype=np.int64), budget
    # the smallest tier whose limit the budget fits (core.policy.tier_for, vectorised)
    pool = np.searchsorted(np.asarray(spec.tier_limits, dtype=np.float64), budget, side="left").astype(np.int64)
    if spec.router == "estimator" and trace.pool_hint is not None:
        hint = trace.pool_hint.astype(np.int64)
        pool = np.where(hint >= 0, hint, pool)
    return pool, budget


def prompt_estimate(trace: Trace, spec: FleetSpec, seed: int = 0) -> np.ndarray:
    """The router's estimate of each request's prompt tokens (what a
    prefill-aware picker beside it knows): exact for the oracle router, the
    same log-normal estimate `route` draws for the noise router, the replayed
    budget less the output allowance for the estimator."""
    P = trace.prompt.astype(np.float64)
    if spec.router == "noise":
        rng = np.random.default_rng(seed + 7919)  # `route` routes on this same draw
        return P * np.exp(rng.normal(0.0, noise_sigma(spec.noise_p90), len(trace)))
    if spec.router == "estimator" and trace.est_budget is not None:
        return np.maximum(trace.est_budget.astype(np.float64) - float(np.quantile(trace.output, OUTPUT_QUANTILE)), 1.0)
    return P


def pick_pool(routed: int, hook, t: float, work: float, pools: list) -> int:
    """The router's pool for one request at dispatch time: the tier its
    estimated budget selects (`route`), or, with the closed loop on, what the
    running router's own `Router.place` decides from the instances' signals
    (spillover, adaptive boundaries; `planner.sim.closed_loop`)."""
    return routed if hook is None else hook.place(t, work, pools)


@dataclass
class SimResult:
    spec: FleetSpec
    trace_name: str
    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    first_sched: np.ndarray
    preempts: np.ndarray
    rejected: np.ndarray
    pool: np.ndarray
    inst: np.ndarray
    inst_stats: list = field(default_factory=list)  # per instance dicts
    spilled: int = 0
    wall_s: float = 0.0
    loop: object = None  # the planner.sim.closed_loop.LoopHook, when the closed loop ran
    stopped: str | None = None  # the `stop.MissRule` that ended the run early (figures partial)


def loop_hook(spec: FleetSpec, log: bool = False):
    """The router's closed loop (spillover, adaptive boundaries) for a split
    fleet, or None (static routing)."""
    if len(spec.pools) < 2 or not (spec.spillover or spec.adaptive):
        return None
    from .closed_loop import LoopHook, loop_config
    cfg = loop_config([p.name for p in spec.pools], [p.cfg.max_model_len for p in spec.pools],
                      list(spec.tier_limits), spec.spillover, spec.adaptive)
    return LoopHook(cfg, log=[] if log else None)


def simulate(trace: Trace, spec: FleetSpec, seed: int = 0, progress: bool = False,
             check: bool = False, log: bool = False, stop=None) -> SimResult:
    """Run the fleet on the trace. Pure and deterministic for (trace, spec, seed).
    ``log``: keep the closed loop's every decision (``result.loop.log``).
    ``stop``: a `stop.MissRule`; the run ends as soon as it surely misses
    (``result.stopped``; a run it does not stop is the same as without it)."""
    import time as _time
    t0 = _time.perf_counter()
    n = len(trace)
    rec = Records(n)
    pool_of, work_est = route(trace, spec, seed)
    if spec.balancer not in BALANCERS:
        raise ValueError(f"unknown balancer {spec.balancer!r}; one of {', '.join(BALANCERS)}")
    if spec.balancer == "oracle-least-work":  # the upper bound knows true lengths
        work_est = (trace.prompt + trace.output).astype(np.float64)
    elif spec.balancer in balancers.PROMPT_WORK_BALANCERS:
        work_est = prompt_estimate(trace, spec, seed)
    works: list[list[float]] = []
    pools: list[list[Instance]] = []
    insts: list[Instance] = []
    bals: list[balancers.Balancer] = []
    rng = np.random.default_rng(seed + 104729)
    for p in spec.pools:
        if p.count < 1:
            raise ValueError(f"pool {p.name} needs at least one instance")
        w = [0.0] * p.count
        works.append(w)
        row = []
        fixed: dict = {}  # the pool's step-time memo (`Instance._f`): one config, one table
        for j in range(p.count):
            inst = Instance(p.cfg, len(insts), rec, w, j, check=check, fixed=fixed)
            row.append(inst)
            insts.append(inst)
        pools.append(row)
        bals.append(balancers.make(spec.balancer, row, w, rng, spec.scrape_interval))
    hook = loop_hook(spec, log)

    arrival = trace.arrival.tolist()
    P = trace.prompt.tolist()
    O = trace.output.tolist()
    R = pool_of.tolist()
    W = work_est.tolist()
    H = trace.hashes.tolist() if trace.hashes is not None else None
    stamp = [0] * len(insts)
    heap: list = []
    push, pop = heapq.heappush, heapq.heappop
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, file=sys.stderr, unit="req", mininterval=0.5, leave=False,
                   desc=f"simulate {spec.instances} inst")
    tick = 0
    stopped = None
    next_check = n + 1 if stop is None else 0 if stop.pre is not None else stop.every
    for i in range(n):
        t = arrival[i]
        while heap and heap[0][0] < t:
            _, iid, st = pop(heap)
            if st != stamp[iid]:
                continue
            inst = insts[iid]
            inst.run_until(t)
            st += 1
            stamp[iid] = st
            nt = inst.next_event()
            if nt < INF:
                push(heap, (nt, iid, st))
        if i >= next_check:  # every instance is at t: a request not yet served gets its token at t or later
            next_check = i + stop.every
            stopped = stop.check(t, rec.first_token, rec.preempts, rec.finish)
            if stopped is not None:
                break
        p = pick_pool(R[i], hook, t, W[i], pools)
        j = bals[p].pick(t)
        inst = pools[p][j]
        inst.run_until(t)
        works[p][j] += W[i]
        rec.pool[i] = p
        inst.add(Seq(i, P[i], O[i], W[i], H[i] if H is not None else None), t)
        iid = inst.iid
        st = stamp[iid] + 1
        stamp[iid] = st
        nt = inst.next_event()
        if nt < INF:
            push(heap, (nt, iid, st))
        if bar is not None:
            tick += 1
            if tick >= 5000:
                bar.update(tick)
                tick = 0
    # utilisation is measured over the trace window, not the drain tail
    t_end = arrival[-1] if n else 0.0
    win = []
    for inst in insts:
        if stopped is None:
            inst.run_until(t_end)
        win.append((inst.busy, inst.kv_int))
    for k, inst in enumerate(insts):
        if stopped is not None:
            break
        if stop is not None and k % stop.drain_every == stop.drain_every - 1:
            stopped = stop.check(t_end, rec.first_token, rec.preempts, rec.finish)
            if stopped is not None:
                break
        inst.run_until(INF)
    if bar is not None:
        bar.update(tick)
        bar.close()
    stats = []
    for k, p in enumerate(spec.pools):
        for inst in pools[k]:
            stats.append(dict(pool=k, iid=inst.iid, steps=inst.steps, jumps=inst.jumps,
                              busy=inst.busy, kv_int=inst.kv_int, blocks=inst.total_blocks,
                              busy_window=win[inst.iid][0], kv_int_window=win[inst.iid][1],
                              prefix_hits=inst.pc.hits if inst.pc else 0,
                              prefix_queries=inst.pc.queries if inst.pc else 0,
                              prefix_skipped=inst.prefix_skipped,
                              peak_used=inst.peak_used, preemptions=inst.preemptions,
                              recomputed_tokens=inst.recomputed_tokens,
                              completed=inst.completed, rejected=inst.rejected,
                              end=inst.t, free=inst.free, itl_hist=inst.itl_hist))
    spilled = sum(hook.router.spillover.spilled.values()) if hook is not None else 0
    f = lambda a, dt=np.float64: np.asarray(a, dtype=dt)  # noqa: E731
    return SimResult(spec, trace.name, trace.arrival, trace.prompt, trace.output,
                     f(rec.first_token), f(rec.finish), f(rec.first_sched),
                     f(rec.preempts, np.int64), np.frombuffer(bytes(rec.rejected), dtype=np.uint8).astype(bool),
                     f(rec.pool, np.int64), f(rec.inst, np.int64), stats, spilled,
                     _time.perf_counter() - t0, hook, stopped)

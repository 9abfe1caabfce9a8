"""Analytic pre-sizing: every candidate config's sustainable throughput on
its pool's traffic (`closed_form.throughput`), the cheapest by that estimate
chosen for sizing, and the sizing of all of them on the worker pool."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from ..sim.fleet import FleetSpec, PoolSpec
from ..sim.hardware import InstanceConfig
from ..sim.metrics import CLASSES
from ..sim.traces import Trace
from .bisect import SIZE_TOLERANCE, size_pool, stop_targets
from .design import Inputs, SizedPool, SizingContext, SizingJob
from .slo import ok
from .space import cost
from .traffic import SplitTraffic
from .workers import EvalJob, Workers, evaluate, same_run_cfg

#: Candidates per pool simulated after analytic pre-sizing (cheapest first).
TOP_K = 1

#: Roles whose other step budgets and thresholds the second wave screens
#: (`challengers`): the single pool, where issue 16 item 2 found the
#: mitigation that takes effect never sized, and the tiers of the cheapest
#: splits ("split": every tier of a split kept by SECOND_WAVE_SPLITS). Without
#: the tiers the H100 Mooncake split was 44 GPUs where a long pool at mbt
#: 2048 makes it 28: the throughput estimate's one pick per tier is not the
#: SLO's.
SECOND_WAVE_ROLES = ("homogeneous", "split")

#: The second wave screens the tiers of this many splits, the cheapest after
#: the first wave (meeting ones first). Screening every split's tiers cost
#: half again the plan's CPU on the Azure conv bench (202 s -> 303 s,
#: bench/bench_plan.py); a split that is not among the cheapest two before
#: the wave would need its tiers to beat two other splits' second waves too
#: (in the runs measured, the split the wave improved was among the two
#: cheapest: H100 Mooncake split-8192, 44 -> 28 GPUs).
SECOND_WAVE_SPLITS = 2

#: Single-pool candidates sized by the SLO search in the first wave, plain and
#: with a long-prefill threshold each. The throughput estimate ranks configs
#: that differ only in the step budget and the threshold too coarsely to pick
#: one (issue 16 item 2: only the cheapest by throughput was sized, and a
#: better mitigated pool was never tried), so the second wave (`challengers`,
#: `screen`) tries every other step budget and threshold against the best of
#: the first and sizes those that can beat it: the SLO decides, not the estimate.
HOMOGENEOUS_TOP_K = 1


def rate(tr: Trace) -> float:
    """Mean arrival rate (req/s)."""
    return len(tr) / max(tr.duration, 1e-9)


@dataclass(frozen=True)
class Owner:
    """Which design slot a sized pool fills: a role (baseline, homogeneous, a
    tier's pool name) and, for a split's tier, the split's index."""

    role: str
    split: int | None = None


@dataclass(frozen=True)
class Candidate:
    """A config for one role, pre-sized by its analytic throughput."""

    role: str  # "baseline", "homogeneous", a tier's pool name, or "rho" (closed form only)
    split: int | None  # index into the splits, None for single pools
    cfg: InstanceConfig
    traffic: str  # SizingJob.traffic
    trace: Trace = field(compare=False, repr=False)


def candidates(inp: Inputs, search: Trace, splits: list[SplitTraffic]) -> list[Candidate]:
    """Every config to pre-size, per role: single pools (plain and mitigated),
    the baseline when it is sized, each split's tiers, and rho's denominator
    (the baseline config on a two-pool split's short traffic)."""
    base_cfg, mml, sp_ = inp.base_cfg, inp.base_cfg.max_model_len, inp.space
    homog = sp_.configs(inp.model, base_cfg, mml) + sp_.configs(inp.model, base_cfg, mml, mitigation=True)
    out = [Candidate("homogeneous", None, c, "all", search) for c in homog]
    if inp.baseline.instances is None:
        out.append(Candidate("baseline", None, base_cfg, "all", search))
    for k, sp in enumerate(splits):
        for t in sp.tiers:
            if len(t.trace):
                out += [Candidate(t.name, k, c, f"{sp.name}/{t.name}", t.trace)
                        for c in sp_.configs(inp.model, base_cfg, t.max_model_len)]
        short = sp.tiers[0].trace
        if len(sp.tiers) == 2 and len(short):
            out.append(Candidate("rho", k, base_cfg, f"{sp.name}/short", short))
    return out


def _cheapest(cands: list[Candidate], mus: list[float], role: str, k: int | None, n: int = TOP_K) -> list[SizingJob]:
    """The n cheapest candidates of a role by their analytic size (ceil(rate / mu))."""
    xs = [(c, mu) for c, mu in zip(cands, mus) if c.role == role and c.split == k and mu > 0]
    xs.sort(key=lambda x: cost(x[0].cfg, math.ceil(rate(x[0].trace) / x[1])))
    pool = "all" if k is None else role
    return [SizingJob(pool, c.traffic, c.cfg, mu, c.trace) for c, mu in xs[:n]]


def sizing_jobs(inp: Inputs, cands, mus, splits) -> list[tuple[Owner, SizingJob]]:
    """(owner, job) per pool to size: the sized baseline,
    the cheapest plain and the cheapest mitigated single pool, each split's tiers."""
    jobs = []
    if inp.baseline.instances is None:
        jobs += [(Owner("baseline"), j) for j in _cheapest(cands, mus, "baseline", None)]
    plain = _cheapest(cands, mus, "homogeneous", None, len(cands))
    chosen = ([j for j in plain if not j.cfg.long_prefill_token_threshold][:HOMOGENEOUS_TOP_K]
              + [j for j in plain if j.cfg.long_prefill_token_threshold][:HOMOGENEOUS_TOP_K])
    jobs += [(Owner("homogeneous"), j) for j in chosen]
    for k, sp in enumerate(splits):
        for t in sp.tiers:
            jobs += [(Owner(t.name, k), j) for j in _cheapest(cands, mus, t.name, k)]
    return jobs


def fingerprint(tr: Trace) -> bytes:
    """The requests of a trace (not its name): two traffics with the same
    fingerprint run the same."""
    h = hashlib.sha1()
    for a in (tr.arrival, tr.prompt, tr.output, tr.est_prompt, tr.est_budget, tr.pool_hint):
        h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
    h.update(b"-" if tr.hashes is None else repr(hash(tuple(tr.hashes.tolist()))).encode())
    return h.digest()


def size_key(j: SizingJob) -> tuple:
    """A sizing job's result depends on its requests, its config as a run can
    tell it (`workers.same_run_cfg`), its start: a split's short pool that gets
    every request is sized once with the single pool of the same config."""
    return (fingerprint(j.trace), same_run_cfg(j.trace, j.cfg), j.mu, j.start)


def size_all(ex: Workers, jobs: list[SizingJob], ctx: SizingContext, n_search: int, log) -> list[SizedPool]:
    """One sized pool per job, in parallel; the same requests on the same config are sized once."""
    keys = [size_key(j) for j in jobs]
    uniq: dict = {}
    for k, j in zip(keys, jobs):
        uniq.setdefault(k, j)
    if log:
        log(f"sizing {len(uniq)} pools (of {len(jobs)} roles) x {len(ctx.seeds)} seeds on {n_search:,} requests")
    done = dict(zip(uniq, ex.map(partial(size_pool, ctx=ctx), list(uniq.values()), cost=lambda j: len(j.trace))))
    return [replace(done[k], name=j.pool, cfg=j.cfg) for k, j in zip(keys, jobs)]


@dataclass(frozen=True)
class Pruned:
    """A candidate pool not sized: it misses the targets on some seed at
    `screen_count` (cheaper than the best pool sized for its role by more than
    the search's 2% resolution), so (the criterion being monotone in the
    count, as the search assumes) it cannot beat that pool by more than the
    resolution of the sizes themselves."""

    owner: Owner
    cfg: InstanceConfig
    mu: float
    count: int  # the count screened (0: one instance already costs as much as the best)
    best_cost: float  # USD/h of the best pool sized for the role when screened
    figures: dict  # the screening run's class P99s and why it missed


def challengers(cands: list[Candidate], mus: list[float], owner: Owner, sized_cfgs) -> list[SizingJob]:
    """A role's candidates for the second wave: per step budget and threshold
    (max_num_batched_tokens, long_prefill_token_threshold) not yet sized, the
    cheapest by the throughput estimate, so every step budget of the grid
    (2K-16K) and every threshold is tried against the SLO (issue 16 item 2)
    while `screen` keeps the ones that cannot win from a full search."""
    seen = {(c.max_num_batched_tokens, c.long_prefill_token_threshold) for c in sized_cfgs}
    out = []
    for j in _cheapest(cands, mus, owner.role, owner.split, len(cands)):
        k = (j.cfg.max_num_batched_tokens, j.cfg.long_prefill_token_threshold)
        lpt = j.cfg.long_prefill_token_threshold
        if lpt and len(j.trace) and lpt >= int(j.trace.prompt.max()):
            continue  # caps no prompt of the traffic: the plain config in effect
        if k not in seen:
            seen.add(k)
            out.append(j)
    return out


def screen_count(cfg: InstanceConfig, best_cost: float) -> int:
    """The count of cfg a challenger must meet at to be sized: the largest
    count cheaper than best_cost by more than the search's own resolution
    (`bisect.SIZE_TOLERANCE`: sizes are found to within 2%, so a candidate
    within that of the best is not told apart from it) -- 0: none."""
    unit = cost(cfg, 1)
    bar = best_cost * (1.0 - SIZE_TOLERANCE)
    n = math.ceil(bar / unit) - 1 if unit > 0 else 0
    while n > 0 and cost(cfg, n) >= bar:
        n -= 1
    return max(n, 0)


def _screen(job_n: tuple, ctx: SizingContext) -> tuple[bool, tuple]:
    """(meets on every seed, the ((n, seed), summary) runs made) for `job` at
    n instances: seed after seed, early exit on, stopping at the first miss.
    The runs are `bisect.size_pool`'s own at that count (same fleet, same
    early-exit targets), so a job sized afterwards starts with them."""
    job, n = job_n
    stop = stop_targets(ctx)
    spec = FleetSpec((PoolSpec(job.pool, job.cfg, n),), balancer=ctx.balancer)
    runs = []
    for x in ctx.seeds:
        s = evaluate(EvalJob(job.trace, spec, x, ctx.slo.boundary, ctx.warmup, stop))
        runs.append(((n, x), s))
        if not ok(s, ctx.tg, ctx.slo):
            return False, tuple(runs)
    return True, tuple(runs)


def screen(ex: Workers, items: list[tuple], ctx: SizingContext) -> tuple[list, list]:
    """items: (owner, job, the best cost sized for the owner's role). Returns
    ([(owner, job to size, starting at the count screened)], [Pruned]): a job
    that misses on some seed at `screen_count` is dominated; one that meets
    there beats the best and is sized. The same run (`size_key`) is screened once."""
    counts = [screen_count(j.cfg, best) for _, j, best in items]
    todo: dict = {}
    for (_, j, _), n in zip(items, counts):
        if n > 0:
            todo.setdefault((size_key(j), n), (j, n))
    res = dict(zip(todo, ex.map(partial(_screen, ctx=ctx), list(todo.values()), cost=lambda x: x[1])))
    keep, pruned = [], []
    for (o, j, best), n in zip(items, counts):
        met, runs = res.get((size_key(j), n), (False, ())) if n > 0 else (False, ())
        if met:
            keep.append((o, replace(j, start=n, seeded=runs)))
            continue
        s = runs[-1][1] if runs else None
        figs = {} if s is None else {"stopped": s.get("stopped"), "steady_ok": bool(s["steady"]["ok"]),
                                     "preempt_per_1k": s["fleet"]["preemptions_per_1k"],
                                     **{f"{c}_ttft_p99_ms": s["classes"][c]["ttft_p99_ms"] for c in CLASSES},
                                     **{f"{c}_tpot_p99_ms": s["classes"][c]["tpot_p99_ms"] for c in CLASSES}}
        pruned.append(Pruned(o, j.cfg, j.mu, n, best, figs))
    return keep, pruned

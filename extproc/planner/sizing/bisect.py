"""Monotone search for the smallest instance count that meets the targets:
bracket from the analytic start, then bisect to SIZE_TOLERANCE."""
from __future__ import annotations

import math
from typing import Callable

from ..sim.fleet import FleetSpec, PoolSpec
from ..sim.metrics import CLASSES
from .design import SizedPool, SizingContext, SizingJob
from .slo import ok
from .steady import worst
from .workers import EvalJob, evaluate

#: The bisection stops when the bracket is within 2% of the count (or 1): a
#: P99 differs between seeds by more than that.
SIZE_TOLERANCE = 0.02

#: Steps of the search from the analytic start: down by DOWN, up by UP, at most
#: MAX_GROWTH x the start before a pool is declared infeasible.
DOWN, UP, MAX_GROWTH = 0.8, 1.25, 64


def narrow(good: Callable[[int], bool], lo: int, hi: int) -> int:
    """Bisect between lo (fails) and hi (meets) until within SIZE_TOLERANCE; the meeting end."""
    while hi - lo > max(1, SIZE_TOLERANCE * hi):
        mid = (lo + hi) // 2
        if good(mid):
            hi = mid
        else:
            lo = mid
    return hi


def search(good: Callable[[int], bool], start: int, cap: int, limit: int) -> tuple[int, bool]:
    """(smallest count meeting, feasible) for a monotone criterion: down by
    DOWN from a start that meets, or up by UP (at most to cap, giving up past
    limit) from one that fails, then `narrow`."""
    if good(start):
        hi, lo = start, 0
        while hi > 1:
            m = max(1, min(hi - 1, int(hi * DOWN)))
            if good(m):
                hi = m
            else:
                lo = m
                break
    else:
        lo, hi = start, None
        while hi is None:
            m = min(cap, max(lo + 1, math.ceil(lo * UP)))
            if good(m):
                hi = m
            elif m >= cap or m >= limit:
                return m, False
            else:
                lo = m
    return narrow(good, lo, hi), True


def stop_targets(ctx: SizingContext) -> tuple:
    """`workers.EvalJob.stop` for this plan's targets: the effective per-class
    P99 TTFT and TPOT targets (ms) and the preemption SLO."""
    return (tuple(ctx.tg[c]["ttft_target_ms"] for c in CLASSES),
            tuple(ctx.tg[c]["tpot_target_ms"] for c in CLASSES), ctx.slo.preempt_per_1k)


class _Runs:
    """The simulations of one sizing job, per (count, seed), and the record of
    every count tried (the worst seed's figures: a count meets only if every
    seed meets, issue 16 item 4)."""

    def __init__(self, job: SizingJob, ctx: SizingContext, early_exit: bool = True):
        self.job, self.ctx = job, ctx
        self.runs: dict[tuple[int, int], dict] = {}  # (count, seed) -> summary
        self.tried: dict[int, dict] = {}
        # a run that surely misses ends early (`sim.stop`): the search only needs "misses"
        self.stop = stop_targets(ctx) if early_exit else None

    def meets(self, n: int, seeds) -> bool:
        """Do n instances meet the targets on every one of these seeds?"""
        job, ctx = self.job, self.ctx
        spec = FleetSpec((PoolSpec(job.pool, job.cfg, n),), balancer=ctx.balancer)
        for x in seeds:
            if (n, x) not in self.runs:
                self.runs[n, x] = evaluate(EvalJob(job.trace, spec, x, ctx.slo.boundary, ctx.warmup,
                                                   self.stop))
        seed_ok = [ok(self.runs[n, x], ctx.tg, ctx.slo) for x in seeds]
        w = worst([self.runs[n, x] for x in seeds])
        f, met = w["fleet"], all(seed_ok)
        self.tried[n] = {"count": n, "seeds": len(seeds), "ok": met, "seed_ok": seed_ok,
                         "preempt_per_1k": f["preemptions_per_1k"],
                         "steady_ok": bool(w.get("steady", {}).get("ok", True)),
                         **{f"{c}_ttft_p99_ms": w["classes"][c]["ttft_p99_ms"] for c in ctx.tg},
                         **{f"{c}_tpot_p99_ms": w["classes"][c]["tpot_p99_ms"] for c in ctx.tg}}
        stopped = [self.runs[n, x].get("stopped") for x in seeds]
        if any(stopped):  # the figures of a stopped run are partial (lower bounds)
            self.tried[n]["early_exit"] = stopped
        return met

    def per_seed(self) -> tuple:
        """Per seed, the smallest count from which every larger run of that seed meets."""
        counts = sorted({n for n, _ in self.runs})
        out = []
        for x in self.ctx.seeds:
            best = None
            for n in reversed(counts):
                if (n, x) not in self.runs:
                    continue
                if ok(self.runs[n, x], self.ctx.tg, self.ctx.slo):
                    best = n
                else:
                    break
            out.append(best)
        return tuple(out)

    def cliff(self) -> int | None:
        """The largest count whose first-seed preemptions exceed the SLO (a run
        stopped early counts its preemptions so far: a lower bound)."""
        s0, cap = self.ctx.seeds[0], self.ctx.slo.preempt_per_1k
        bad = [n for n in sorted({n for n, _ in self.runs})
               if self.runs[n, s0]["fleet"]["preemptions_per_1k"] > cap]
        return max(bad) if bad else None


def size_pool(job: SizingJob, ctx: SizingContext, early_exit: bool = True) -> SizedPool:
    """Smallest count of `job.cfg` whose per-class P99s meet the targets on every seed.

    Phase 1 brackets and bisects on the first seed alone (cheap); phase 2
    searches up from that point with every seed, so the answer meets on each
    seed (never a size below some seed's own minimum) while the other seeds
    run only near the boundary.
    """
    tr, seeds = job.trace, ctx.seeds
    rate = len(tr) / max(tr.duration, 1e-9)
    runs = _Runs(job, ctx, early_exit)
    runs.runs.update(dict(job.seeded))  # the screen's runs at `job.start` (`presize.screen`)
    cap = max(1, len(tr))
    start = min(cap, max(1, math.ceil(rate / job.mu))) if job.mu > 0 else 1
    start = job.start or start
    limit = start * MAX_GROWTH
    hi, feasible = search(lambda n: runs.meets(n, seeds[:1]), start, cap, limit)
    if feasible and len(seeds) > 1:
        hi, feasible = search(lambda n: runs.meets(n, seeds), hi, cap, limit)
    per_seed = runs.per_seed()
    if feasible and per_seed and all(x is not None for x in per_seed):
        # a larger count that failed on some seed makes `hi` luck: take the
        # count from which every count tried meets on every seed
        hi = max(hi, *per_seed)
    return SizedPool(job.pool, job.cfg, hi, feasible, job.mu, rate, per_seed,
                     tuple(runs.tried[n] for n in sorted(runs.tried)), runs.cliff())

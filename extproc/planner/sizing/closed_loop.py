"""Split designs again with the router's closed loop (spillover, adaptive
boundaries) on: the first tier, the one spillover relieves, shrunk while the
whole fleet still meets every class target."""
from __future__ import annotations

from dataclasses import replace

from ..sim.traces import Trace
from .bisect import DOWN, narrow
from .design import Design, SizingContext
from .slo import ok
from .steady import worst
from .workers import EvalJob, Workers, evaluate_unique

#: Shrink steps (x DOWN each) of the first tier when the router's closed loop
#: is on: spillover lends it the larger tiers' headroom, so it may need fewer
#: instances than sized alone; a few steps of 20% cover the 47-53%
#: multiplexing loss the planner measured on Mooncake (issue 10).
CLOSED_LOOP_SHRINK_STEPS = 4


def _shrink_first(meets, hi: int) -> int:
    """From hi (meets), the smallest first-tier count that still meets:
    CLOSED_LOOP_SHRINK_STEPS steps down by DOWN, then bisection."""
    lo = 0
    for _ in range(CLOSED_LOOP_SHRINK_STEPS):
        n = max(1, int(hi * DOWN))
        if n == hi:
            break
        if not meets(n):
            lo = n
            break
        hi = n
    return narrow(meets, lo, hi) if lo else hi


def closed_loop_designs(ex: Workers, search: Trace, splits: list[Design], ctx: SizingContext,
                        spillover: bool, adaptive: bool, router: str, noise_p90: float, log) -> list[Design]:
    """Each split design of 2+ pools again with the router's closed loop on,
    as `fleet.loop_hook` runs it: its first tier shrunk while the whole fleet
    (every seed, search window) meets every class target; `verify` then
    checks the whole trace and grows any pool that misses."""
    tag = "+".join(k for k, on in (("spillover", spillover), ("adaptive", adaptive)) if on)
    out = []
    for d in splits:
        if len(d.pools) < 2:
            continue
        nd = replace(d, name=f"{d.name}+{tag}", spillover=spillover, adaptive=adaptive,
                     what=d.what + f"; router {tag} on")

        def meets(n: int, nd=nd) -> bool:  # the fleet, its first tier at n instances
            spec = nd.with_count(0, n).spec(router, noise_p90, ctx.balancer)
            jobs = [EvalJob(search, spec, x, ctx.slo.boundary, ctx.warmup) for x in ctx.seeds]
            return ok(worst(evaluate_unique(ex, jobs, {})), ctx.tg, ctx.slo)

        n = _shrink_first(meets, d.pools[0].count)
        if log and n != d.pools[0].count:
            log(f"  {nd.name}: pool {d.pools[0].name} {d.pools[0].count} -> {n} meets with the closed loop")
        out.append(nd.with_count(0, n))
    return out

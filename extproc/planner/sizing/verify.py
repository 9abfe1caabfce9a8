"""Every design on the whole trace for every seed; pools that miss their
class targets (or steady state, `steady.py`) on any seed grow until every
seed meets (issue 16 item 4: no averaging into a size no seed meets)."""
from __future__ import annotations

import math

from ..sim.traces import Trace
from .design import Design, SizingContext, Verified
from .slo import ok
from .steady import worst
from .workers import EvalJob, Workers, evaluate_unique

#: Verification rounds on the full trace (each grows failing pools by 5%).
VERIFY_ROUNDS = 6
VERIFY_GROWTH = 0.05


def per_seed_figures(sums: list[dict], seeds, tg: dict, slo) -> tuple:
    """plan.json's `per_seed`: each seed's class P99s, preemptions, whether
    it meets on its own and its steady-state verdict."""
    return tuple(dict(seed=s, **{c: {"ttft_p99_ms": x["classes"][c]["ttft_p99_ms"],
                                     "tpot_p99_ms": x["classes"][c]["tpot_p99_ms"]} for c in tg},
                      preempt_per_1k=x["fleet"]["preemptions_per_1k"], meets=ok(x, tg, slo),
                      steady={n: {"utilization": v["utilization"], "queue_grows": v["grows"], "ok": v["ok"]}
                              for n, v in x.get("steady", {}).get("pools", {}).items()})
                 for s, x in zip(seeds, sums))


def grow_missing(d: Design, summary: dict, ctx: SizingContext, log) -> Design | None:
    """The design with every pool that misses the targets on its own grown by
    VERIFY_GROWTH (at least one instance); None when no single pool misses."""
    grown = d
    for k, p in enumerate(d.pools):
        ps = summary["pools"][p.name]
        st = summary.get("steady", {}).get("pools", {}).get(p.name)
        if not ok({"fleet": ps, "classes": ps["classes"], **({"steady": st} if st else {})}, ctx.tg, ctx.slo):
            new = max(p.count + 1, math.ceil(p.count * (1 + VERIFY_GROWTH)))
            if log:
                why = "" if st is None or st["ok"] else f" (steady state: utilization {st['utilization']:.2f}, queue grows {st['grows']})"
                log(f"  verify {d.name}: pool {p.name} misses on the whole trace on some seed{why}; {p.count} -> {new}")
            grown = grown.with_count(k, new)
    return grown if grown is not d else None


def verify(ex: Workers, trace: Trace, designs: list[Design], ctx: SizingContext, router: str,
           noise_p90: float, log) -> list[Verified]:
    """Simulate every design on the whole trace for every seed (in parallel);
    grow the pools that miss their class targets on any seed until every seed meets.
    A pinned design is simulated once, as pinned. Returns one Verified per
    design, in order, at its final size."""
    current = list(designs)
    out: list[Verified | None] = [None] * len(designs)
    todo = [i for i, d in enumerate(designs) if not d.pinned]
    pinned = [i for i, d in enumerate(designs) if d.pinned]
    cache: dict = {}
    n = len(ctx.seeds)
    for rnd in range(VERIFY_ROUNDS + 1):
        batch = todo + (pinned if rnd == 0 else [])
        jobs = [EvalJob(trace, current[i].spec(router, noise_p90, ctx.balancer), s, ctx.slo.boundary)
                for i in batch for s in ctx.seeds]
        res = evaluate_unique(ex, jobs, cache)
        again = []
        for k, i in enumerate(batch):
            sums = res[k * n:(k + 1) * n]
            out[i] = Verified(current[i], worst(sums), per_seed_figures(sums, ctx.seeds, ctx.tg, ctx.slo))
            if current[i].pinned or ok(out[i].summary, ctx.tg, ctx.slo) or rnd == VERIFY_ROUNDS:
                continue
            grown = grow_missing(current[i], out[i].summary, ctx, log)
            if grown is not None:
                current[i] = grown
                again.append(i)
        todo = again
        if not todo:
            break
    return out

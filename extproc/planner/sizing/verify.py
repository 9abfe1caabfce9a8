"""Every design on the whole trace for every seed; pools that miss their
class targets (or steady state, `steady.py`) on any seed grow until every
seed meets (issue 16 item 4: no averaging into a size no seed meets)."""
from __future__ import annotations

import math

from ..sim.traces import Trace
from .design import Design, SizingContext, Verified
from .slo import ok
from .steady import worst
from .workers import EvalJob, Workers, evaluate_many

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


def missing_pools(d: Design, summary: dict, ctx: SizingContext) -> list[int]:
    """The pools of d that miss the targets (or steady state) on their own."""
    out = []
    for k, p in enumerate(d.pools):
        ps = summary["pools"][p.name]
        st = summary.get("steady", {}).get("pools", {}).get(p.name)
        if not ok({"fleet": ps, "classes": ps["classes"], **({"steady": st} if st else {})}, ctx.tg, ctx.slo):
            out.append(k)
    return out


def grow_missing(d: Design, summary: dict, ctx: SizingContext, log, growth: float = VERIFY_GROWTH,
                 where: str = "the whole trace") -> Design | None:
    """The design with every pool that misses the targets on its own grown by
    `growth` (at least one instance); None when no single pool misses."""
    grown = d
    for k in missing_pools(d, summary, ctx):
        p = d.pools[k]
        st = summary.get("steady", {}).get("pools", {}).get(p.name)
        new = max(p.count + 1, math.ceil(p.count * (1 + growth)))
        if log:
            why = "" if st is None or st["ok"] else f" (steady state: utilization {st['utilization']:.2f}, queue grows {st['grows']})"
            log(f"  verify {d.name}: pool {p.name} misses on {where} on some seed{why}; {p.count} -> {new}")
        grown = grown.with_count(k, new)
    return grown if grown is not d else None


def verify(ex: Workers, trace: Trace | tuple, designs: list[Design], ctx: SizingContext, router: str,
           noise_p90: float, log, growth: float = VERIFY_GROWTH, rounds: int = VERIFY_ROUNDS,
           where: str = "the whole trace", caches: list | None = None) -> list[Verified]:
    """Simulate every design on the whole trace (or on each of a tuple of
    traces, `horizon.py`) for every seed (in parallel); grow the pools that
    miss their class targets on any seed (and trace) by `growth` until every
    seed meets. A pinned design is simulated once, as pinned. Returns one
    Verified per design, in order, at its final size; its `per_seed` and
    `runs` are per (trace, seed), the last trace's seeds last."""
    traces = trace if isinstance(trace, tuple) else (trace,)
    current = list(designs)
    out: list[Verified | None] = [None] * len(designs)
    todo = [i for i, d in enumerate(designs) if not d.pinned]
    pinned = [i for i, d in enumerate(designs) if d.pinned]
    if caches is None:
        caches = [{} for _ in traces]  # one cache per trace (`workers.EvalKey`)
    n = len(ctx.seeds)
    for rnd in range(rounds + 1):
        batch = todo + (pinned if rnd == 0 else [])
        per_trace = evaluate_many(ex, [([EvalJob(t, current[i].spec(router, noise_p90, ctx.balancer), s,
                                                 ctx.slo.boundary) for i in batch for s in ctx.seeds], c)
                                       for t, c in zip(traces, caches)])
        again = []
        for k, i in enumerate(batch):
            runs = tuple(tuple(res[k * n:(k + 1) * n]) for res in per_trace)
            sums = [x for r in runs for x in r]
            out[i] = Verified(current[i], worst(sums), per_seed_figures(runs[-1], ctx.seeds, ctx.tg, ctx.slo),
                              runs)
            if current[i].pinned or ok(out[i].summary, ctx.tg, ctx.slo) or rnd == rounds:
                continue
            grown = grow_missing(current[i], out[i].summary, ctx, log, growth, where)
            if grown is not None:
                current[i] = grown
                again.append(i)
        todo = again
        if not todo:
            break
    return out

"""Planner v2: what each design costs at the latency each class of request gets.

Designs compared (docs/planner.md):

* ``baseline`` -- the operator's homogeneous fleet as they run it today
  (``--baseline``): evaluated as is with ``instances=N``, else sized.
* ``homogeneous-best`` -- the cheapest single pool the config search finds
  (GPU, TP, max_num_seqs, max_num_batched_tokens, and vLLM's long-prefill
  mitigations), so a split is never compared with a strawman only.
* ``split-B`` -- a short pool (max_model_len = B) and a long pool per candidate
  B_short, each pool's config searched the same way.

Every design is sized and judged by the same per-class targets (`slo.py`).
Method, one module per step:
1. Analytic pre-sizing (`closed_form.throughput`: the cost model at a batch
   the KV cache holds, no thrashing): each candidate config's sustainable
   throughput on its pool's traffic; rate / throughput starts the search, and
   the cheapest candidates by that estimate are simulated. A second wave
   (`presize.challengers`, `presize.screen`) tries every other step budget and
   threshold of the grid against the best single pool (`presize.SECOND_WAVE_ROLES`)
   and sizes those that beat it; the rest are reported as pruned.
2. Monotone bisection (`bisect.py`): a count meets only if it meets on every
   seed (`traces.perturb`). A run that surely misses ends early (`sim.stop`:
   same verdict, same path, same sizes). Long traces are searched on a window.
3. With ``--spillover``/``--adaptive``, each split again with the router's
   closed loop on (`closed_loop.py`).
4. Each design is simulated on the whole trace for every seed and grown until
   every seed meets (`verify.py`); the per-seed minimal sizes from the search
   give ``seed_spread_gpus``. Then the cheapest designs of each kind are checked
   and grown on the horizon traces (`horizon.py`: the trace before --window and
   its 2-hour tile), so a plan holds when re-simulated over a longer horizon.
5. A split is recommended only when its saving over the best homogeneous
   design exceeds the seed spread plus the search tolerance (`recommend.py`).

Work runs on a process pool over all cores (`workers.py`). The result is
typed (`PlanResult`); `report.plan_json` writes it as plan.json.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, replace

from . import closed_form
from ..sim.balancers import DEFAULT_BALANCER
from ..sim.traces import Trace
from .closed_loop import closed_loop_designs
from .design import Design, Inputs, Judged, SizedPool, SizingContext
from .presize import (SECOND_WAVE_ROLES, SECOND_WAVE_SPLITS, Owner, candidates, challengers, rate, screen, size_all,
                      sizing_jobs)
from .recommend import Recommendation, recommend
from .slo import SLO, targets
from .space import AUTO_B_SHORT, Baseline, Space, check_tiers
from .traffic import SEARCH_WINDOW_S, SplitTraffic, route_splits, search_trace
from .horizon import hold
from .verify import verify as verify_designs
from .workers import ThroughputJob, Workers, throughput

#: Seeds per design (arrival jitter + sampling, `traces.perturb`); the issue's
#: floor of 3 is what gives a spread at all.
SEEDS = 3


@dataclass(frozen=True)
class PlanResult:
    """Everything plan.json reports (`report.plan_json`)."""

    trace: Trace = field(compare=False, repr=False)
    search: Trace = field(compare=False, repr=False)  # what the sizing searched (a window of a long trace)
    inputs: Inputs
    splits: tuple  # of SplitTraffic
    tiers: tuple | None  # --tiers
    closed_loop: tuple  # "adaptive", "spillover" as on
    candidates: int  # configs pre-sized
    designs: tuple  # of Judged, the baseline first
    recommendation: Recommendation
    sized: tuple = ()  # every SLO-sized candidate pool: (Owner, SizedPool)
    pruned: tuple = ()  # single-pool candidates screened out (`presize.Pruned`)
    horizon: tuple = field(default=(), compare=False, repr=False)  # the final check's traces (`horizon.hold`)


def _pick(sized: list[SizedPool], owners: list[Owner], owner: Owner) -> SizedPool | None:
    """The owner's cheapest feasible sized pool."""
    xs = [s for s, o in zip(sized, owners) if o == owner]
    xs.sort(key=lambda s: (not s.feasible, s.cost))
    return xs[0] if xs else None


def single_pool_designs(inp: Inputs, trace: Trace, sized, owners) -> list[Design]:
    """The baseline (pinned, or sized) and the best single pool found."""
    base_cfg, pinned = inp.base_cfg, inp.baseline.instances is not None
    if pinned:
        b0 = SizedPool("all", base_cfg, inp.baseline.instances, True, 0.0, rate(trace))
    else:
        b0 = _pick(sized, owners, Owner("baseline"))
    out = [Design("baseline", "homogeneous", (b0,), f"the operator's fleet: {base_cfg.label()}"
                  + (" (pinned)" if pinned else " (sized)"), pinned=pinned)]
    h = _pick(sized, owners, Owner("homogeneous"))
    if h is not None:
        out.append(Design("homogeneous-best", "homogeneous", (h,), f"best single pool found: {h.cfg.label()}"))
    return out


def split_designs(inp: Inputs, splits: list[SplitTraffic], sized, owners, rho_mu: dict) -> list[Design]:
    """Per split, its sized tiers (a tier without traffic has no pool) and the closed form beside it."""
    out = []
    for k, sp in enumerate(splits):
        kept = [(p, t.max_model_len) for p, t in ((_pick(sized, owners, Owner(t.name, k)), t) for t in sp.tiers)
                if p is not None]
        pools = tuple(p for p, _ in kept)
        if not pools:
            continue
        s = pools[0] if pools[0].name == "short" else None
        rho = (s.mu / rho_mu[k]) if s is not None and rho_mu.get(k) else float("nan")
        cf = closed_form.savings(sp.alpha, rho) if rho == rho and rho > 0 else float("nan")
        what = (f"short pool max_model_len={sp.b} + long pool {inp.base_cfg.max_model_len}: " if len(sp.tiers) == 2
                else f"{len(sp.tiers)} context tiers {'/'.join(str(t.max_model_len) for t in sp.tiers)}: ")
        out.append(Design(sp.name, "split", pools, what + " + ".join(f"{p.name} {p.cfg.label()}" for p in pools),
                          b_short=sp.b, limits=tuple(m for _, m in kept[:-1]), alpha=sp.alpha, rho=rho,
                          closed_form=cf))
    return out


def _designs(ex: Workers, inp: Inputs, trace: Trace, search: Trace, splits, closed_loop, log) -> tuple:
    """Steps 1-3 of the module doc: (the sized designs, the number of candidates,
    every sized candidate pool with its owner, the pruned candidates)."""
    cands = candidates(inp, search, splits)
    if log:
        log(f"pre-sizing {len(cands)} candidate configs (throughput runs, {ex.workers} workers)")
    mus = ex.map(throughput, [ThroughputJob(c.cfg, c.trace) for c in cands])
    owned = sizing_jobs(inp, cands, mus, splits)
    owners = [o for o, _ in owned]
    sized = size_all(ex, [j for _, j in owned], inp.ctx, len(search), log)
    more, pruned = _second_wave(ex, inp, cands, mus, sized, owners, len(search), log)
    owners += [o for o, _ in more]
    sized += [p for _, p in more]
    rho_mu = {c.split: mu for c, mu in zip(cands, mus) if c.role == "rho"}
    designs = single_pool_designs(inp, trace, sized, owners) + split_designs(inp, splits, sized, owners, rho_mu)
    if closed_loop:  # --spillover / --adaptive: each split again with the router's closed loop on
        designs += closed_loop_designs(ex, search, [d for d in designs if d.kind == "split"], inp.ctx,
                                       "spillover" in closed_loop, "adaptive" in closed_loop, inp.router,
                                       inp.noise_p90, log)
    return designs, len(cands), tuple(zip(owners, sized)), tuple(pruned)


def _second_wave_role(g: Owner, best: dict, sized, owners, whole: set) -> bool:
    """Whether the second wave screens role g: the single pool, and each tier
    of the SECOND_WAVE_SPLITS cheapest splits after the first wave (those with
    every tier meeting first). A split with a tier that gets every request
    (`whole`: its split indices) is the single pool under another
    max_model_len, whose step budgets and thresholds the single pool's own
    second wave tries: it is left out."""
    if g.split is None:
        return g.role in SECOND_WAVE_ROLES
    if "split" not in SECOND_WAVE_ROLES and g.role not in SECOND_WAVE_ROLES or g.split in whole:
        return False
    tiers: dict = {}
    for p, o in zip(sized, owners):
        if o.split is not None and o.split not in whole:
            tiers.setdefault(o.split, {}).setdefault(o.role, []).append(p)
    def key(k):
        pools = [min(ps, key=lambda p: (not p.feasible, p.cost)) for ps in tiers[k].values()]
        return (not all(p.feasible for p in pools), sum(p.cost for p in pools))
    return g.split in sorted(tiers, key=key)[:SECOND_WAVE_SPLITS]


def _bar(g: Owner, best: dict, groups) -> float:
    """The cost a second-wave challenger for role g must beat (by the search's
    resolution, `presize.screen_count`): the best pool of its role; for a
    split's tier also the cost that would make its split cheaper than the
    cheapest split so far (the split's other tiers at their best), since only
    the cheapest meeting split reaches the verdict. A split with a tier that
    meets nowhere keeps its role's bar."""
    if g.split is None:
        return best[g]
    totals: dict = {}
    for o in groups:  # every sized tier of every split
        if o.split is not None:
            totals[o.split] = totals.get(o.split, 0.0) + best.get(o, float("inf"))
    if math.isinf(totals[g.split]):
        return best[g]
    return max(0.0, min(best[g], min(totals.values()) - (totals[g.split] - best[g])))


def _second_wave(ex: Workers, inp: Inputs, cands, mus, sized, owners, n_search: int, log) -> tuple[list, list]:
    """([(owner, more sized pools)], the pruned): per role of
    `presize.SECOND_WAVE_ROLES` (the single pool and the cheapest splits'
    tiers, `_second_wave_role`), every step budget and threshold not sized yet
    (`presize.challengers`, cheapest estimate first), one per role and worker
    at a time, screened against the best pool sized for the role so far (a
    split's tier: against what makes its split the cheapest, `_bar`)
    (`presize.screen`); those that beat it are sized and lower the bar."""
    def group(o: Owner) -> Owner:
        return Owner("homogeneous") if o.role == "baseline" else o
    best: dict = {}
    cfgs: dict = {}
    for p, o in zip(sized, owners):
        g = group(o)
        cfgs.setdefault(g, []).append(p.cfg)
        if p.feasible:
            best[g] = min(best.get(g, p.cost), p.cost)
    whole = {c.split for c in cands if c.split is not None and c.role != "rho" and len(c.trace) == n_search}
    queues = {g: challengers(cands, mus, g, cfgs[g]) for g in best
              if _second_wave_role(g, best, sized, owners, whole)}
    more, pruned = [], []
    while any(queues.values()):
        items = []
        for g, q in queues.items():
            take, queues[g] = q[:ex.workers], q[ex.workers:]
            items += [(g, j, _bar(g, best, cfgs)) for j in take]
        keep, out = screen(ex, items, inp.ctx)
        pruned += out
        if keep:
            got = size_all(ex, [j for _, j in keep], inp.ctx, n_search, log)
            for (g, _), p in zip(keep, got):
                more.append((g, p))
                if p.feasible:
                    best[g] = min(best[g], p.cost)
    if log:
        log(f"second wave: {len(more) + len(pruned)} more candidate pools screened against the best of "
            f"their role, {len(more)} sized, {len(pruned)} pruned (dominated)")
    return more, pruned


def _inputs(model, baseline, slo, space, router, balancer, seeds, noise_p90, price, trace) -> Inputs:
    base_cfg = baseline.config(model)
    if price is not None:
        base_cfg = base_cfg.with_(gpu=replace(base_cfg.gpu, price_per_hour=price))
    tg = targets(slo, base_cfg, trace.prompt, trace.total)
    ctx = SizingContext(tg, slo, tuple(range(max(1, seeds))), balancer)
    return Inputs(model, baseline, base_cfg, space, router, noise_p90, ctx)


def _log_infeasible(inp: Inputs, log) -> None:
    for c, t in inp.ctx.tg.items():
        if t["infeasible"]:
            log(f"class {c}: target TTFT {t['ttft_slo_ms']:.0f} ms / TPOT {t['tpot_slo_ms']:.0f} ms "
                f"is INFEASIBLE on an idle {inp.base_cfg.label()} (idle P99 TTFT "
                f"{t['idle_ttft_p99_ms']:.0f} ms, TPOT {t['idle_tpot_p99_ms']:.1f} ms): every design "
                f"is held to {t['ttft_target_ms']:.0f} / {t['tpot_target_ms']:.1f} ms instead")


def plan(trace: Trace, model: str = "llama-3-70b", baseline: Baseline | None = None,
         slo: SLO | None = None, b_shorts=None, space: Space | None = None,
         router: str = "oracle", balancer: str = DEFAULT_BALANCER, seeds: int = SEEDS,
         search_window: float = SEARCH_WINDOW_S, workers: int | None = None,
         noise_p90: float = 0.10, price: float | None = None, progress: bool = False,
         verify: bool = True, tiers=None, spillover: bool = False, adaptive: bool = False,
         horizon: tuple = ()) -> PlanResult:
    """Size and compare the designs (module doc). ``tiers`` (context lengths,
    e.g. (8192, 32768, 131072)) adds an N-tier design; ``spillover`` /
    ``adaptive`` add each split design again with the router's closed loop on;
    ``horizon``: the traces the cheapest designs must also hold on
    (`horizon.horizons`; empty: no final check)."""
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else None
    inp = _inputs(model, baseline or Baseline(), slo or SLO(), space or Space(), router, balancer, seeds,
                  noise_p90, price, trace)
    mml = inp.base_cfg.max_model_len
    search, warmup = search_trace(trace, search_window)
    inp = replace(inp, ctx=replace(inp.ctx, warmup=warmup))
    if log:
        _log_infeasible(inp, log)
    b_shorts = sorted({int(b) for b in (AUTO_B_SHORT if b_shorts is None else b_shorts) if int(b) < mml})
    tiers = check_tiers(tiers, mml)
    closed_loop = tuple(k for k, on in (("adaptive", adaptive), ("spillover", spillover)) if on)
    ex = Workers(workers if workers is not None else (os.cpu_count() or 1))
    try:
        splits = route_splits(trace, search, inp, b_shorts, tiers, log)
        designs, n_cands, all_sized, pruned = _designs(ex, inp, trace, search, splits, closed_loop, log)
        if log:
            log(f"verifying {len(designs)} designs x {len(inp.ctx.seeds)} seeds on {len(trace):,} requests")
        verified = verify_designs(ex, trace, designs, inp.ctx, router, noise_p90, log if verify else None)
        verified = hold(ex, trace, tuple(horizon), verified, inp.ctx, router, noise_p90, log if verify else None)
    finally:
        ex.close()
    base_cost = verified[0].design.cost
    judged = tuple(Judged.of(v, inp.ctx.tg, inp.ctx.slo, base_cost) for v in verified)
    return PlanResult(trace, search, inp, tuple(splits), tiers, closed_loop, n_cands, judged, recommend(list(judged)),
                      all_sized, pruned, tuple(horizon))

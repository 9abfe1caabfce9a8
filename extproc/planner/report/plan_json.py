"""plan.json: a typed plan (`sizing.plan.PlanResult`) as JSON, every field
written here and nowhere else (tests/schemas/plan.schema.json)."""
from __future__ import annotations

import os

import orjson

from ..sizing.bisect import SIZE_TOLERANCE
from ..sizing.design import Judged, SizedPool
from ..sizing.plan import PlanResult
from ..sizing.recommend import Recommendation, split_noise


def pool_json(p: SizedPool) -> dict:
    return {"name": p.name, "count": p.count, "config": p.cfg.to_json(),
            "label": p.cfg.label(), "vllm_args": p.cfg.vllm_args(),
            "mu_rps": p.mu, "rate_rps": p.rate, "feasible": p.feasible,
            "per_seed_counts": list(p.per_seed), "preemption_cliff_instances": p.cliff,
            "tried": list(p.tried)}


def design_json(j: Judged) -> dict:
    d, f = j.design, j.summary["fleet"]
    return {
        "name": d.name, "kind": d.kind, "b_short": d.b_short,
        "limits": list(d.tier_limits) if len(d.pools) > 1 else [],
        "spillover": d.spillover, "adaptive": d.adaptive,
        "what": d.what, "gpus": d.gpus, "usd_per_hour": d.cost,
        "savings_vs_baseline": j.savings_vs_baseline,
        "instances": {p.name: p.count for p in d.pools},
        "pools": [pool_json(p) for p in d.pools],
        "classes": j.classes,
        "meets": j.meets,
        "meets_effective": j.meets_effective,
        "feasible": j.feasible,
        "preempt_per_1k": f["preemptions_per_1k"], "rejected": int(round(f["rejected"])),
        "seed_spread_gpus": j.seed_spread_gpus, "seed_band_gpus": list(j.seed_band_gpus),
        "itl_p99_ms": f.get("itl_p99_ms"),  # inter-token latency P99 over every token gap
        "gpu_busy": f["gpu_busy"], "kv_util": f["kv_util"], "prefix_hit_rate": f["prefix_hit_rate"],
        "preemption_cliff_instances": {p.name: p.cliff for p in d.pools},
        "per_seed": list(j.per_seed),
        # the traces it was simulated on, the plan's first, then the final horizon's (`sizing.horizon`)
        "verified_on": list(j.verified_on),
        "horizon": j.horizon,
        "alpha": d.alpha, "rho": d.rho,
        "closed_form_savings": d.closed_form,
        "summary": j.summary,
    }


def recommendation_json(r: Recommendation, balancer: str | None = None) -> dict:
    cf = r.closed_form
    closed = {"alpha": cf.alpha, "rho": cf.rho, "predicted": cf.predicted, "b_short": cf.b_short}
    d = r.design
    return {"design": d.name if d else None, "savings_vs_baseline": d.savings_vs_baseline if d else None,
            "closed_form": closed, "split": d is not None and d.kind == "split", "margin": r.margin,
            "why": r.why,
            "best_single_pool": ({"design": r.best_single_pool.name, "gpus": r.best_single_pool.design.gpus,
                                  "balancer": balancer} if r.best_single_pool is not None else None),
            "saving_vs_best_single_pool": r.saving_vs_best_single_pool}


def plan_json(res: PlanResult) -> dict:
    tr, inp = res.trace, res.inputs
    slo, tg, space, base_cfg = inp.ctx.slo, inp.ctx.tg, inp.space, inp.base_cfg
    return {
        "version": 2, "trace": tr.name, "requests": len(tr), "duration_s": tr.duration,
        "rate_rps": len(tr) / max(tr.duration, 1e-9), "model": base_cfg.model.name,
        "router": inp.router, "balancer": inp.ctx.balancer, "seeds": list(inp.ctx.seeds),
        # issue 16 item 4: a design meets only if it meets on every seed (per-seed sizes: pools' per_seed_counts)
        "seed_rule": "every seed",
        "slo": {"class_boundary": slo.boundary, "ttft_p99_ms": slo.ttft_ms, "tpot_p99_ms": slo.tpot_ms,
                "preempt_per_1k": slo.preempt_per_1k, "targets": tg,
                "infeasible": any(t["infeasible"] for t in tg.values())},
        "baseline": {**inp.baseline.__dict__, "config": base_cfg.to_json()},
        "search": {"requests": len(res.search), "window_s": res.search.duration, "warmup_s": inp.ctx.warmup,
                   "tolerance": SIZE_TOLERANCE,
                   "gpus": list(space.gpus) or [base_cfg.gpu_key()], "tps": list(space.tps),
                   "max_num_seqs": list(space.seqs), "max_num_batched_tokens": list(space.mbts),
                   "long_prefill_token_threshold": list(space.lpts),
                   "b_short": [sp.b for sp in res.splits if len(sp.tiers) == 2],
                   "tiers": list(res.tiers) if res.tiers else None, "closed_loop": sorted(res.closed_loop),
                   "candidates": res.candidates},
        "designs": [{**design_json(j), "balancer": inp.ctx.balancer} for j in res.designs],
        # the final check (`sizing.horizon`): the traces the cheapest designs of each kind must hold on
        "horizon": {"traces": [{"role": h.role, "trace": h.trace.name, "requests": len(h.trace),
                                "duration_s": h.trace.duration} for h in res.horizon],
                    "rule": ("the cheapest meeting designs of each kind, re-simulated on every seed of each "
                             "trace and grown until they meet; only designs that hold are recommended")
                    if res.horizon else "off"},
        "recommendation": recommendation_json(res.recommendation, inp.ctx.balancer),
        # every pool the SLO search sized (not only the ones the designs kept)
        "sized_candidates": [{"role": o.role, "split": o.split, "balancer": inp.ctx.balancer, **pool_json(p)}
                             for o, p in res.sized],
        # candidate pools not sized: they miss where they would beat the best pool of their role by > 2%
        "pruned_candidates": [{"role": x.owner.role, "split": x.owner.split, "balancer": inp.ctx.balancer,
                               "config": x.cfg.to_json(),
                               "label": x.cfg.label(), "mu_rps": x.mu, "screened_count": x.count,
                               "best_usd_per_hour": x.best_cost, "screen": x.figures}
                              for x in res.pruned],
    }


def matrix_json(plans: list[dict]) -> dict:
    """One plan.json from the same plan run under several balancers (one
    plan dict each, `plan_json`): every design of every run, each carrying its
    ``balancer``; ``balancer_matrix`` {balancer: {design: gpus or None when it
    misses}}; the recommendation is the cheapest meeting design of all, judged
    against the strongest realistic single pool (the cheapest meeting
    homogeneous design under any balancer but the oracle, a named bound only)."""
    from ..sim.balancers import REALISTIC_BALANCERS
    out = dict(plans[0])
    designs = [d for p in plans for d in p["designs"]]
    ok = [d for d in designs if d["meets_effective"] and d["feasible"]
          and d.get("horizon", "off") in ("off", "held")]
    singles = [d for d in ok if d["kind"] == "homogeneous" and d["balancer"] in REALISTIC_BALANCERS]
    best_h = min(singles, key=lambda d: d["usd_per_hour"], default=None)
    # the cheapest meeting split, fewer preemptions first at equal cost (as `recommend`)
    best_s = min((d for d in ok if d["kind"] == "split"), key=lambda d: (d["usd_per_hour"], d["preempt_per_1k"]),
                 default=None)
    best = min(ok, key=lambda d: (d["usd_per_hour"], d["kind"] == "split", d["preempt_per_1k"]), default=None)
    split_note = None
    if best_s is not None and best_h is not None:
        # the rule of `recommend._split_or_not`, across balancers: a split only when its saving
        # over the best realistic single pool exceeds both seed spreads + 2 x the search tolerance
        s_save = 1.0 - best_s["usd_per_hour"] / best_h["usd_per_hour"]
        noise = split_noise(best_s["seed_spread_gpus"], best_h["seed_spread_gpus"], best_h["gpus"])
        split_note = {"design": best_s["name"], "gpus": best_s["gpus"], "balancer": best_s["balancer"],
                      "saving_vs_best_single_pool": s_save, "noise": noise, "margin": s_save - noise}
        if best is best_s and s_save <= noise:
            best = best_h
    saving = 1.0 - best["usd_per_hour"] / best_h["usd_per_hour"] if best and best_h else None
    per_run = {p["balancer"]: p["recommendation"] for p in plans}
    why = (f"{best['name']} under {best['balancer']} is the cheapest design meeting the per-class targets"
           + (f"; {saving:.1%} below the best realistic single pool ({best_h['name']} under "
              f"{best_h['balancer']}, {best_h['gpus']} GPUs)" if saving is not None else "")
           if best else "no design meets the per-class targets under any balancer")
    if best is not None and best is best_h and split_note is not None and split_note["saving_vs_best_single_pool"] > 0:
        why = (f"keep one pool: {best_h['name']} under {best_h['balancer']} ({best_h['gpus']} GPUs); the best split "
               f"({split_note['design']} under {split_note['balancer']}, {split_note['gpus']} GPUs) saves "
               f"{split_note['saving_vs_best_single_pool']:.1%}, within seed spread + search tolerance "
               f"({split_note['noise']:.1%})")
    out.update({
        "balancer": "matrix", "balancers": [p["balancer"] for p in plans], "designs": designs,
        "balancer_matrix": {p["balancer"]: {d["name"]: (d["gpus"] if d["meets_effective"] and d["feasible"] else None)
                                            for d in p["designs"]} for p in plans},
        "sized_candidates": [c for p in plans for c in p.get("sized_candidates", [])],
        "pruned_candidates": [c for p in plans for c in p.get("pruned_candidates", [])],
        "recommendation": {
            "design": best["name"] if best else None, "balancer": best["balancer"] if best else None,
            "savings_vs_baseline": best["savings_vs_baseline"] if best else None,
            "closed_form": per_run[best["balancer"]]["closed_form"] if best else plans[0]["recommendation"]["closed_form"],
            "split": bool(best and best["kind"] == "split"),
            "margin": split_note["margin"] if split_note else None, "why": why,
            "best_split": split_note,
            "best_single_pool": ({"design": best_h["name"], "gpus": best_h["gpus"], "balancer": best_h["balancer"]}
                                 if best_h else None),
            "saving_vs_best_single_pool": saving, "per_balancer": per_run},
    })
    return out


def balancer_view(res: dict, balancer: str | None) -> dict:
    """A balancer-matrix plan.json (`matrix_json`) as that balancer's own plan:
    its designs and its own recommendation, so what is compared with re-plans
    under that one balancer (`sizing.slo_sweep`) is not mixed with designs
    sized under the others. Any other plan is returned as is."""
    if not res.get("balancer_matrix") or balancer not in res["balancer_matrix"]:
        return res
    out = {k: v for k, v in res.items() if k not in ("balancer_matrix", "balancers")}
    out["balancer"] = balancer
    out["designs"] = [d for d in res["designs"] if d.get("balancer") == balancer]
    out["recommendation"] = res["recommendation"]["per_balancer"][balancer]
    out["sized_candidates"] = [c for c in res.get("sized_candidates", []) if c.get("balancer") == balancer]
    return out


def write_json(out: str | None, name: str, obj) -> None:
    """obj as indented JSON in out/name (nothing without out)."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "wb") as f:
        f.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY,
                             default=lambda o: float(o) if hasattr(o, "__float__") else str(o)))

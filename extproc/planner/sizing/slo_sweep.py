"""How much of a plan's saving the SLO targets buy, and what kind of saving it is
(issue 16 item 5), as plan.json's additive `slo_realism` block.

* ``kind``: a split whose short pool serves about as many requests per
  instance as the single pool (rho within RHO_ISOLATION_BAND of 1) saves by
  *latency isolation* -- short requests no longer share steps with long
  prefills, so fewer instances meet the short class's P99 -- not by a pool
  config that is faster per GPU.
* ``sensitivity``: the plan re-sized with every latency target times
  SENSITIVITY_FACTOR (a saving that shrinks there was bought by a tight target).
* ``short_ttft_sweep``: the saving at a few short-class TTFT targets (the
  plot `saving_vs_short_ttft.png`).
* ``decomposition``: the split re-sized with both pools pinned to the
  baseline's config (only max_model_len differs) against the baseline: that
  saving is isolation; the rest of the tuned split's saving is pool configuration.

Each re-plan is bounded: only the recommended (else cheapest) split's B_short,
the seeds and search window of the main plan, no closed loop. Pure over a
`plan` callable (tests pass the real one).
"""
from __future__ import annotations

from collections.abc import Callable

from .slo import SENSITIVITY_FACTOR, SLO, scaled

#: rho (short-pool throughput per instance / single pool's) within this band of
#: 1 labels a saving "latency isolation": the split's instances do no more work
#: than the single pool's, so the saving comes from the short class's P99, not
#: throughput. 15%: wider than the seed spread + search tolerance a plan
#: reports (typically 5-12%), so a config effect is not mistaken for isolation.
RHO_ISOLATION_BAND = 0.15

#: Short-class TTFT targets of the sweep, as multiples of the plan's own:
#: one tighter, the plan's, and three looser (1.5x, 2x, 4x), the range over
#: which interactive-chat targets are quoted (1-8 s at a 2 s default).
SWEEP_FACTORS = (0.75, 1.0, 1.5, 2.0, 4.0)


def saving_kind(rho: float | None) -> str:
    """'latency isolation' (rho ~ 1), 'throughput' (rho > 1: the short pool's
    config serves more per instance), 'isolation despite lower throughput'
    (rho < 1), or 'unknown' (no rho)."""
    if rho is None or rho != rho:
        return "unknown"
    if abs(rho - 1.0) <= RHO_ISOLATION_BAND:
        return "latency isolation"
    return "throughput" if rho > 1.0 else "isolation despite lower throughput"


def verdict(res: dict) -> dict:
    """The figures of one plan.json a sweep point keeps: baseline, best single
    pool, best split (meeting the effective targets) and their savings."""
    good = [d for d in res["designs"] if d["meets_effective"] and d["feasible"]]
    base = res["designs"][0]
    single = min((d for d in good if d["kind"] == "homogeneous"), key=lambda d: d["usd_per_hour"], default=None)
    split = min((d for d in good if d["kind"] == "split"), key=lambda d: d["usd_per_hour"], default=None)

    def _s(d):
        return None if d is None else 1.0 - d["usd_per_hour"] / base["usd_per_hour"]
    return {"baseline_gpus": base["gpus"],
            "best_single": None if single is None else {"design": single["name"], "gpus": single["gpus"]},
            "best_split": None if split is None else {"design": split["name"], "gpus": split["gpus"],
                                                       "rho": split["rho"]},
            "recommended": res["recommendation"]["design"],
            "saving_vs_baseline": _s(split),
            "saving_vs_best_single": (None if split is None or single is None
                                      else 1.0 - split["usd_per_hour"] / single["usd_per_hour"])}


def _split_b(res: dict) -> int | None:
    rec = next((d for d in res["designs"] if d["name"] == res["recommendation"]["design"]), None)
    if rec is not None and rec["kind"] == "split":
        return rec["b_short"]
    sp = [d for d in res["designs"] if d["kind"] == "split" and d["b_short"]]
    return min(sp, key=lambda d: d["usd_per_hour"])["b_short"] if sp else None


def realism(res: dict, slo: SLO, replan: Callable[..., dict] | None = None, *, sweep: bool = False,
            factors=SWEEP_FACTORS, log=None) -> dict:
    """plan.json's `slo_realism` for the plan `res` (a plan.json dict) made at
    `slo`. `replan(slo=..., b_shorts=[B], pinned=bool) -> plan.json dict`
    re-plans; without it (or `sweep`) only the labels and idle slack (free)."""
    tg = res["slo"]["targets"]
    rec = next((d for d in res["designs"] if d["name"] == res["recommendation"]["design"]), None)
    rho = rec["rho"] if rec is not None and rec["kind"] == "split" else None
    out = {"idle_slack": {c: {k: t[k] for k in ("idle_ttft_p99_ms", "idle_ttft_ratio", "idle_ttft_slack_ms",
                                                 "idle_tpot_p99_ms", "idle_tpot_ratio", "idle_tpot_slack_ms",
                                                 "tight") if k in t} for c, t in tg.items()},
           "recommended_rho": rho, "saving_kind": saving_kind(rho) if rho is not None else None,
           "rho_isolation_band": RHO_ISOLATION_BAND}
    b = _split_b(res)
    if not sweep or replan is None or b is None:
        return out
    here = verdict(res)
    out["b_short"] = b
    if log:
        log(f"slo realism: re-sizing split-{b} with targets x{SENSITIVITY_FACTOR:g}")
    out["sensitivity"] = {"factor": SENSITIVITY_FACTOR, "at_targets": here,
                          "at_scaled_targets": verdict(replan(slo=scaled(slo, SENSITIVITY_FACTOR), b_shorts=[b]))}
    pts = []
    for i, f in enumerate(factors):
        ms = slo.ttft_ms["short"] * f
        if log:
            log(f"slo realism: short TTFT {ms:,.0f} ms ({i + 1}/{len(factors)})")
        v = here if f == 1.0 else verdict(replan(slo=scaled(slo, 1.0, short_ttft_ms=ms), b_shorts=[b]))
        pts.append({"short_ttft_ms": ms, **v})
    out["short_ttft_sweep"] = pts
    if log:
        log(f"slo realism: split-{b} with both pools on the baseline's config (isolation only)")
    pinned = verdict(replan(slo=slo, b_shorts=[b], pinned=True))
    total, iso = here["saving_vs_baseline"], pinned["saving_vs_baseline"]
    out["decomposition"] = {
        "split_identical_configs": pinned["best_split"], "split_tuned_configs": here["best_split"],
        "baseline_gpus": here["baseline_gpus"],
        "saving_vs_baseline": total, "isolation": iso,
        "configuration": None if total is None or iso is None else total - iso,
        "how": ("isolation = saving of the split whose pools both run the baseline's config (only "
                "max_model_len differs) over the baseline; configuration = the tuned split's saving "
                "minus that")}
    return out

"""Closed-loop routing in the fleet simulator: fewest GPUs meeting equal
per-class SLOs for one pool, 2 tiers (static / spillover) and 3 tiers
(static / spillover), on a trace at its native rate. Slow (minutes): a greedy
search adds one instance at a time to the tier whose class misses its SLO
worst. Writes bench/results/closed_loop.json and prints a table.

    PYTHONPATH=. .venv/bin/python bench/closed_loop.py [--trace FILE] [--window 1800]

Classes are by true budget (prompt + output): with tiers 8192,32768,131072
the classes are <= 8K, <= 32K and the rest; every class must meet P99 TTFT
<= its target and preemptions <= --slo-preempt-per-1k, whatever pool served
it (spillover moves requests, not classes). A class's TTFT target is
--slo-ttft-ms, raised as ``budget-router plan`` does to the idle-instance
prefill floor of its own prompts (x TTFT_FLOOR_SLACK): the same targets for
every configuration.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import orjson

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from extproc.planner.fleet import FleetSpec, PoolSpec, simulate  # noqa: E402
from extproc.planner.hardware import make_config  # noqa: E402
from extproc.planner.plan import (SLO_PREEMPT_PER_1K, SLO_TTFT_P99_MS, TTFT_FLOOR_SLACK,  # noqa: E402
                                  ttft_floor_ms)
from extproc.planner.traces import load_trace, window  # noqa: E402

TRACE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "traces", "conversation_trace.jsonl")
#: Give up on a configuration above this many instances (something is wrong).
MAX_INSTANCES = 64
#: Growth of a tier that misses its SLO (plan._verify grows by the same 10%).
GROWTH = 0.1


def class_stats(r, bounds: list[int]) -> list[dict]:
    """Per class (by true budget against ``bounds``): P99 TTFT, preemptions/1k."""
    total = r.prompt + r.output
    cls = np.searchsorted(np.asarray(bounds), total, side="left")
    out = []
    for k in range(len(bounds) + 1):
        m = (cls == k) & ~r.rejected
        ttft = (r.first_token - r.arrival)[m]
        ttft = ttft[np.isfinite(ttft)]
        out.append({"n": int(m.sum()),
                    "ttft_p99_ms": float(1e3 * np.percentile(ttft, 99)) if ttft.size else 0.0,
                    "preempt_per_1k": float(1e3 * r.preempts[m].sum() / max(1, m.sum())),
                    "rejected": int((r.rejected & (cls == k)).sum())})
    return out


def class_targets(tr, cfg, bounds: list[int], slo_ms: float) -> list[float]:
    cls = np.searchsorted(np.asarray(bounds), tr.total, side="left")
    return [max(slo_ms, TTFT_FLOOR_SLACK * ttft_floor_ms(cfg, tr.prompt[cls == k])) for k in range(len(bounds) + 1)]


def search(tr, lens: list[int], spill: bool, targets: list[float], slo_pre: float, gpu: str, model: str,
           class_bounds: list[int], log) -> dict:
    """Greedy: start at one instance per tier; while a class misses its SLO,
    grow the tier of the class that misses it worst by 10% (at least one
    instance, as the planner's verification step does): GPU counts are
    found to within ~10%."""
    cfgs = [make_config(gpu, model, max_model_len=m).validate() for m in lens]
    names = ["all"] if len(lens) == 1 else ["short", *(f"tier{i}" for i in range(1, len(lens) - 1)), "long"]
    counts = [1] * len(lens)
    sims = 0
    while sum(counts) <= MAX_INSTANCES:
        pools = tuple(PoolSpec(n, c, k) for n, c, k in zip(names, cfgs, counts))
        spec = (FleetSpec(pools) if len(lens) == 1 else
                FleetSpec(pools, b_short=lens[0], limits=tuple(lens[:-1]), spillover=spill))
        r = simulate(tr, spec)
        sims += 1
        stats = class_stats(r, class_bounds)
        worst, k_worst = 1.0, None
        for k, s in enumerate(stats):
            miss = max(s["ttft_p99_ms"] / targets[k], s["preempt_per_1k"] / slo_pre if slo_pre else 0,
                       2.0 if s["rejected"] else 0.0)
            if s["n"] and miss > worst:
                worst, k_worst = miss, k
        log(f"  {counts} -> per class TTFT p99 ms {[round(s['ttft_p99_ms']) for s in stats]}, "
            f"spilled {r.spilled}")
        if k_worst is None:
            return {"tiers": lens, "spillover": spill, "counts": counts, "gpus": spec.gpus,
                    "classes": stats, "spilled": r.spilled, "sims": sims}
        # the class's own tier (one pool: the pool)
        k = min(k_worst, len(lens) - 1) if len(lens) > 1 else 0
        counts[k] += max(1, math.ceil(GROWTH * counts[k]))
    return {"tiers": lens, "spillover": spill, "error": f"no fleet up to {MAX_INSTANCES} instances", "sims": sims}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=TRACE)
    ap.add_argument("--window", type=float, default=0, help="keep the first N seconds (0 = all)")
    ap.add_argument("--gpu", default="a100")
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--slo-ttft-ms", type=float, default=SLO_TTFT_P99_MS)
    ap.add_argument("--slo-preempt-per-1k", type=float, default=SLO_PREEMPT_PER_1K)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "closed_loop.json"))
    a = ap.parse_args()
    if not os.path.exists(a.trace):
        print(f"skip: trace {a.trace} absent", file=sys.stderr)
        return 0
    tr = load_trace(a.trace)
    if a.window:
        tr = window(tr, 0.0, a.window)
    ctx = make_config(a.gpu, a.model).max_model_len
    rate = len(tr) / max(1e-9, float(tr.arrival[-1] - tr.arrival[0]))
    print(f"{os.path.basename(a.trace)}: {len(tr)} requests at its native {rate:.2f} req/s; SLO per class: "
          f"P99 TTFT <= {a.slo_ttft_ms:.0f} ms, preemptions <= {a.slo_preempt_per_1k}/1k", file=sys.stderr)
    bounds3 = [8192, 32768]
    targets = class_targets(tr, make_config(a.gpu, a.model).validate(), bounds3, a.slo_ttft_ms)
    print("per-class P99 TTFT targets (ms): " + ", ".join(f"{t:.0f}" for t in targets), file=sys.stderr)
    configs = [([ctx], False), ([8192, ctx], False), ([8192, ctx], True),
               ([8192, 32768, ctx], False), ([8192, 32768, ctx], True)]
    rows = []
    for lens, spill in configs:
        t0 = time.perf_counter()
        label = f"{len(lens)} tier(s) {','.join(map(str, lens))}{' + spillover' if spill else ''}"
        print(label, file=sys.stderr, flush=True)
        res = search(tr, lens, spill, targets, a.slo_preempt_per_1k, a.gpu, a.model, bounds3,
                     lambda m: print(m, file=sys.stderr, flush=True))
        res["label"] = label
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(res)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "wb") as f:
        f.write(orjson.dumps({"trace": a.trace, "requests": len(tr), "rate_rps": rate, "targets_ms": targets,
                              "rows": rows},
                             option=orjson.OPT_INDENT_2))
    print(f"\n{'configuration':<44}{'instances':>10}{'GPUs':>6}{'spilled':>9}  per-class P99 TTFT (ms)")
    for r in rows:
        if "error" in r:
            print(f"{r['label']:<44}{r['error']}")
            continue
        print(f"{r['label']:<44}{str(r['counts']):>10}{r['gpus']:>6}{r['spilled']:>9}  "
              + ", ".join(f"{c['ttft_p99_ms']:.0f}" for c in r["classes"]))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

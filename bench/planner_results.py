"""Docs results: `plan` on the four shared traces, per rate and GPU, at equal
per-class SLOs (defaults of `budget-router plan`). Slow (minutes per run at
1,000 req/s); writes one plan.json per run under bench/results/ and prints a
markdown row per run (the table of docs/planner.md).

    PYTHONPATH=. .venv/bin/python bench/planner_results.py [--rates native,1000] [--gpus a100,h200]
        [--files conversation_trace.jsonl,...] [--workers N] [--b-short auto|N,...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import orjson

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from extproc.planner.report.plan_json import plan_json  # noqa: E402
from extproc.planner.sizing.plan import plan  # noqa: E402
from extproc.planner.sizing.space import Baseline  # noqa: E402
from extproc.planner.sim.traces import load_trace, scale_rate, tile  # noqa: E402

TRACES = os.environ.get("TRACES_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "traces"))
FILES = ["AzureLLMInferenceTrace_code.csv", "AzureLLMInferenceTrace_conv.csv",
         "conversation_trace.jsonl", "synthetic_trace.jsonl"]
#: At 1,000 req/s a trace lasts 4-19 s; it is tiled to this many seconds so the
#: fleet reaches steady state.
TILE_S = 60.0

HEADER = ("| trace @ rate | GPU | baseline GPUs | best single pool | best split | split vs baseline | "
          "split vs best single | spread+tol | closed form (α, ρ) | short P99 TTFT base / split (ms) | "
          "preempt/1K base / split | recommendation | plan s |\n|" + "---|" * 13)


def row(res: dict, wall: float) -> str:
    ds = {d["name"]: d for d in res["designs"]}
    base = ds["baseline"]
    homs = [d for d in res["designs"] if d["kind"] == "homogeneous" and d["meets_effective"]]
    sps = [d for d in res["designs"] if d["kind"] == "split" and d["meets_effective"]]
    bh = min(homs, key=lambda d: d["usd_per_hour"], default=None)
    bs = min(sps, key=lambda d: d["usd_per_hour"], default=None)
    hb = ds.get("homogeneous-best", base)
    r = res["recommendation"]
    cf = r["closed_form"]
    fmt = lambda d: f"{d['gpus']} (±{d['seed_spread_gpus']})" if d else "-"  # noqa: E731
    vs_base = f"{1 - bs['usd_per_hour'] / base['usd_per_hour']:+.1%}" if bs else "-"
    vs_h = f"{1 - bs['usd_per_hour'] / bh['usd_per_hour']:+.1%}" if bs and bh else "-"
    noise = (f"{((bs['seed_spread_gpus'] + bh['seed_spread_gpus']) / bh['gpus'] + 0.04):.1%}"
             if bs and bh else "-")
    cfs = (f"{cf['predicted']:.1%} ({cf['alpha']:.2f}, {cf['rho']:.2f})"
           if cf["predicted"] is not None and cf["predicted"] == cf["predicted"] else "-")
    tt = lambda d: f"{d['classes']['short']['ttft_p99_ms']:,.0f}" if d else "-"  # noqa: E731
    pp = lambda d: f"{d['preempt_per_1k']:.1f}" if d else "-"  # noqa: E731
    return (f"| {res['trace']} @ {res['rate_rps']:.0f} | {res['designs'][0]['pools'][0]['config']['gpu']} | "
            f"{fmt(base)} | {fmt(hb)} | {(bs['name'] + ': ' + fmt(bs)) if bs else '-'} | {vs_base} | {vs_h} | "
            f"{noise} | {cfs} | {tt(base)} / {tt(bs)} | {pp(base)} / {pp(bs)} | {r['design']} | {wall:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="native,1000")
    ap.add_argument("--gpus", default="a100,h200")
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--b-short", default="auto", help="auto or N,N,... (fewer candidates: faster)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--files", default=",".join(FILES), help="comma-separated trace files in the traces folder")
    a = ap.parse_args()
    if not os.path.isdir(TRACES):
        print(f"skip: traces folder {TRACES} absent", file=sys.stderr)
        return 0
    os.makedirs(a.out, exist_ok=True)
    print(HEADER, flush=True)
    for rate in a.rates.split(","):
        for f in a.files.split(","):
            for gpu in a.gpus.split(","):
                tr = load_trace(os.path.join(TRACES, f))
                if rate != "native":
                    tr = tile(scale_rate(tr, float(rate)), TILE_S)
                t0 = time.perf_counter()
                bs = None if a.b_short == "auto" else [int(x) for x in a.b_short.split(",")]
                res = plan_json(plan(tr, a.model, Baseline(gpu=gpu), b_shorts=bs, workers=a.workers, progress=True))
                wall = time.perf_counter() - t0
                res["plan_wall_s"] = wall
                name = f"{f.split('.')[0]}_{rate}_{gpu}_{a.model}.json"
                with open(os.path.join(a.out, name), "wb") as fh:
                    fh.write(orjson.dumps(res, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2,
                                          default=float))
                print(row(res, wall), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

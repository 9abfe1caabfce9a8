"""Closed-loop routing in the planner: fewest GPUs meeting equal per-class SLOs
for one pool, 2 tiers and 3 tiers, each with and without the router's
spillover, on a trace at its native rate -- `budget-router plan --b-short 8192
--tiers 8192,32768,131072 --spillover` (plan.py sizes every design with the
same search and judges it by the same class targets). Slow (minutes). Writes
bench/results/closed_loop.json (the plan.json) and prints the plan's table.

    PYTHONPATH=. .venv/bin/python bench/closed_loop.py [--trace FILE] [--window 1800] [--adaptive]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import orjson

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from extproc.planner.report.plan_json import plan_json  # noqa: E402
from extproc.planner.report.text import print_plan  # noqa: E402
from extproc.planner.sizing.plan import plan  # noqa: E402
from extproc.planner.sizing.space import Baseline, Space  # noqa: E402
from extproc.planner.sim.traces import load_trace, window  # noqa: E402

TRACE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "traces", "conversation_trace.jsonl")
TIERS = (8192, 32768, 131072)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=TRACE)
    ap.add_argument("--window", type=float, default=0, help="keep the first N seconds (0 = all)")
    ap.add_argument("--gpu", default="a100")
    ap.add_argument("--adaptive", action="store_true", help="the router's adaptive boundaries as well")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "closed_loop.json"))
    a = ap.parse_args()
    if not os.path.exists(a.trace):
        print(f"skip: {a.trace} absent", file=sys.stderr)
        return 0
    tr = load_trace(a.trace)
    if a.window:
        tr = window(tr, 0.0, a.window)
    t0 = time.perf_counter()
    res = plan_json(plan(tr, baseline=Baseline(gpu=a.gpu), b_shorts=[TIERS[0]], space=Space(seqs=(256,), mbts=(8192,)),
                         workers=a.workers, progress=True, tiers=TIERS, spillover=True, adaptive=a.adaptive))
    print_plan(res)
    print(f"\nwall {time.perf_counter() - t0:.0f} s")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "wb") as f:
        f.write(orjson.dumps(res, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-class P99s of a plan's designs at their planned sizes under each balancer.

    PYTHONPATH=. .venv/bin/python bench/balancer_sensitivity.py bench/results/PLAN.json TRACE
        [--rate R] [--balancers least-request,round-robin,kv-aware,oracle-least-work]

Re-simulates every design of the plan (seed 0) with each balancer and prints a
markdown table: what the plan's sizes are worth when the balancer changes.
"""
from __future__ import annotations

import argparse
import os
import sys

import orjson

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from extproc.planner.sim.fleet import FleetSpec, PoolSpec, simulate  # noqa: E402
from extproc.planner.sim.hardware import make_config  # noqa: E402
from extproc.planner.sim.metrics import summarize  # noqa: E402
from extproc.planner.sim.traces import load_trace, scale_rate  # noqa: E402


def spec_of(d: dict, model: str, balancer: str) -> FleetSpec:
    pools = []
    for p in d["pools"]:
        c = p["config"]
        cfg = make_config(c["gpu"], model, c["max_model_len"], c["tp"], max_num_seqs=c["max_num_seqs"],
                          max_num_batched_tokens=c["max_num_batched_tokens"],
                          gpu_memory_utilization=c["gpu_memory_utilization"],
                          long_prefill_token_threshold=c["long_prefill_token_threshold"],
                          max_num_partial_prefills=c["max_num_partial_prefills"])
        pools.append(PoolSpec(p["name"], cfg, p["count"]))
    return FleetSpec(tuple(pools), b_short=d["b_short"] if len(pools) == 2 else None, balancer=balancer)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("plan")
    ap.add_argument("trace")
    ap.add_argument("--rate", type=float)
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--balancers", default="least-request,round-robin,kv-aware,oracle-least-work")
    a = ap.parse_args()
    res = orjson.loads(open(a.plan, "rb").read())
    tr = load_trace(a.trace)
    if a.rate:
        tr = scale_rate(tr, a.rate)
    boundary = res["slo"]["class_boundary"]
    print("| design | GPUs | balancer | short P99 TTFT ms | short P99 TPOT ms | long P99 TTFT ms | "
          "long P99 TPOT ms | preempt/1K |\n|---|---|---|---|---|---|---|---|")
    for d in res["designs"]:
        for b in a.balancers.split(","):
            s = summarize(simulate(tr, spec_of(d, a.model, b)), boundary)
            c = s["classes"]
            print(f"| {d['name']} | {d['gpus']} | {b} | {c['short']['ttft_p99_ms']:,.0f} | "
                  f"{c['short']['tpot_p99_ms']:.0f} | {c['long']['ttft_p99_ms']:,.0f} | "
                  f"{c['long']['tpot_p99_ms']:.0f} | {s['fleet']['preemptions_per_1k']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

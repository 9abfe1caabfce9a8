"""Simulator speed: simulated requests per wall-second on one core.

A sized Llama-3-70B / 4xA100 fleet (default 300 instances, P99 TTFT ~2-3 s)
serving Azure conv scaled to 1,000 req/s (tiled to --duration s); a synthetic
trace of the same shape when the shared traces are absent. Bounded: one run of
--duration simulated seconds (default 60 s = 60K requests, ~3-5 s of wall time).

    PYTHONPATH=. .venv/bin/python bench/bench_simulator.py [--duration 60] [--instances 300]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from extproc.planner.sim.fleet import FleetSpec, PoolSpec, simulate  # noqa: E402
from extproc.planner.sim.hardware import make_config  # noqa: E402
from extproc.planner.sim.metrics import summarize  # noqa: E402
from extproc.planner.sim.traces import load_trace, scale_rate, synthetic, tile  # noqa: E402

TRACE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "traces",
                     "AzureLLMInferenceTrace_conv.csv")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if os.path.exists(TRACE):
        tr = tile(scale_rate(load_trace(TRACE), a.rate), a.duration)
        src = "Azure conv"
    else:
        tr = synthetic(int(a.rate * a.duration), a.rate, 1100, 230, seed=0, max_total=8192)
        src = "synthetic (shared traces absent)"
    cfg = make_config("a100", "llama-3-70b", max_model_len=8192)
    spec = FleetSpec((PoolSpec("short", cfg, a.instances),))
    best = None
    for _ in range(a.repeat):
        t0 = time.process_time()
        r = simulate(tr, spec)
        cpu = time.process_time() - t0
        best = cpu if best is None else min(best, cpu)
    m = summarize(r)["fleet"]
    steps = sum(s["steps"] for s in r.inst_stats)
    print(f"command: {' '.join(sys.argv)}")
    print(f"trace: {src} at {a.rate:.0f} req/s, {len(tr):,} requests over {tr.duration:.0f} s")
    print(f"fleet: {a.instances} x Llama-3-70B TP4 A100, max_model_len 8192, max_num_seqs 256")
    print(f"simulated {steps:,} iterations; P99 TTFT {m['ttft_p99_ms']:.0f} ms, "
          f"preemptions/1k {m['preemptions_per_1k']:.2f}")
    print(f"best of {a.repeat}: {best:.2f} CPU-s -> {len(tr) / best:,.0f} simulated requests per second (one core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

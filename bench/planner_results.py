"""Docs results (docs/planner.md, "Results"): `budget-router plan` per trace
and GPU under every realistic balancer, and the savings table read back from
the plan.json files it writes.

    # run (Mooncake conversation --window 0:1200: 147-180 s per GPU on 2 shared cores, docs/planner.md)
    PYTHONPATH=. .venv/bin/python bench/planner_results.py run [--files conversation_trace.jsonl,...]
        [--gpus a100,h100] [--balancer realistic] [--workers 2] [--window START:LEN] [--out out/planner-results]
    # table from any plan.json files (what the docs' table is)
    PYTHONPATH=. .venv/bin/python bench/planner_results.py table out/planner-results/*/plan.json

`run` calls the project CLI (`python -m extproc.cli plan ... --out DIR --emit
DIR/emit`), so the table is exactly what an operator's `plan` writes; each
run's wall time goes to DIR/wall_s.txt. `table` prints one row per plan.json
(GPUs of the sized baseline, the best realistic single pool and the best
split, each with its balancer; the saving against the best single pool) and
the balancer x design matrix of each.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import orjson

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TRACES = os.environ.get("TRACES_DIR", os.path.join(ROOT, "..", "shared", "data", "traces"))
FILES = ["conversation_trace.jsonl", "AzureLLMInferenceTrace_conv.csv"]

HEADER = ("| trace | GPU | req/s | baseline (sized) | best single pool | best split | split vs best single "
          "| noise (spreads + 2 x tol) | split vs baseline | recommendation | short P99 TTFT target / idle |\n|"
          + "---|" * 11)


def _ok(d: dict) -> bool:
    return bool(d["meets_effective"] and d["feasible"])


def _gpus(d: dict | None, with_balancer: bool = True) -> str:
    if d is None:
        return "-"
    spread = f" ±{d['seed_spread_gpus']}" if d.get("seed_spread_gpus") else ""
    return f"{d['name']} [{d.get('balancer', '-')}]: {d['gpus']}{spread}" if with_balancer else f"{d['gpus']}{spread}"


def summary(res: dict) -> dict:
    """The figures of one plan.json the table shows."""
    ds = res["designs"]
    ok = [d for d in ds if _ok(d)]
    single = min((d for d in ok if d["kind"] == "homogeneous"), key=lambda d: d["usd_per_hour"], default=None)
    split = min((d for d in ok if d["kind"] == "split"), key=lambda d: (d["usd_per_hour"], d["preempt_per_1k"]),
                default=None)
    bases = [d for d in ds if d["name"] == "baseline" and _ok(d)]
    base = min(bases, key=lambda d: d["usd_per_hour"], default=None)
    return {"single": single, "split": split, "baseline": base,
            "vs_single": None if not (split and single) else 1 - split["usd_per_hour"] / single["usd_per_hour"],
            "vs_base": None if not (split and base) else 1 - split["usd_per_hour"] / base["usd_per_hour"]}


def _pct(x) -> str:
    return "-" if x is None else f"{x:+.1%}"


def row(res: dict) -> str:
    s = summary(res)
    r = res["recommendation"]
    t = res["slo"]["targets"]["short"]
    rec = f"{r['design']} [{r.get('balancer') or res['balancer']}]" if r["design"] else "none meets"
    gpu = res["designs"][0]["pools"][0]["config"]["gpu"]
    bs = r.get("best_split")
    noise = f"{bs['noise']:.1%}" if bs else "-"
    return (f"| {res['trace']} | {gpu} | {res['rate_rps']:.1f} | {_gpus(s['baseline'])} | {_gpus(s['single'])} | "
            f"{_gpus(s['split'])} | {_pct(s['vs_single'])} | {noise} | {_pct(s['vs_base'])} | {rec} | "
            f"{t['ttft_slo_ms']:,.0f} / {t['idle_ttft_p99_ms']:,.0f} ms |")


def matrix(res: dict) -> str:
    """GPUs per design x balancer ('-': misses the targets on some seed or in steady state)."""
    m = res.get("balancer_matrix") or {res["balancer"]: {d["name"]: d["gpus"] if _ok(d) else None
                                                         for d in res["designs"]}}
    bals = list(m)
    names = list(dict.fromkeys(n for b in bals for n in m[b]))
    out = ["| design | " + " | ".join(bals) + " |", "|---|" + "---:|" * len(bals)]
    for n in names:
        out.append(f"| {n} | " + " | ".join("-" if m[b].get(n) is None else f"{m[b][n]:,}" for b in bals) + " |")
    return "\n".join(out)


def cmd_table(paths: list[str]) -> int:
    plans = []
    for p in paths:
        with open(p, "rb") as f:
            plans.append(orjson.loads(f.read()))
    print(HEADER)
    for res in plans:
        print(row(res))
    for p, res in zip(paths, plans):
        gpu = res["designs"][0]["pools"][0]["config"]["gpu"]
        print(f"\n{res['trace']} on {gpu} ({p}): GPUs by design x balancer\n")
        print(matrix(res))
    return 0


def cmd_run(a) -> int:
    if not os.path.isdir(TRACES):
        print(f"skip: traces folder {TRACES} absent", file=sys.stderr)
        return 0
    done = []
    for f in a.files.split(","):
        for gpu in a.gpus.split(","):
            out = os.path.join(a.out, f"{f.split('.')[0]}_{gpu}")
            cmd = [sys.executable, "-m", "extproc.cli", "plan", "--trace", os.path.join(TRACES, f), "--gpu", gpu,
                   "--balancer", a.balancer, "--workers", str(a.workers), "--out", out,
                   "--emit", os.path.join(out, "emit")]
            if a.window:
                cmd += ["--window", a.window]
            print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
            wall = time.perf_counter() - t0
            if rc != 0:
                print(f"plan failed (rc {rc}) for {f} on {gpu}", file=sys.stderr)
                return rc
            with open(os.path.join(out, "wall_s.txt"), "w") as fh:
                fh.write(f"{wall:.1f}\n")
            done.append(os.path.join(out, "plan.json"))
    return cmd_table(done)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run `plan` per trace x GPU, then print the table")
    r.add_argument("--files", default=",".join(FILES), help="comma-separated trace files in the traces folder")
    r.add_argument("--gpus", default="a100,h100")
    r.add_argument("--balancer", default="realistic")
    r.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    r.add_argument("--window", help="START:LEN seconds of each trace (faster; say so where quoted)")
    r.add_argument("--out", default=os.path.join(ROOT, "out", "planner-results"))
    t = sub.add_parser("table", help="the docs' table from plan.json files")
    t.add_argument("plans", nargs="+")
    a = ap.parse_args()
    return cmd_table(a.plans) if a.cmd == "table" else cmd_run(a)


if __name__ == "__main__":
    sys.exit(main())

"""Docs results: `budget-router plan` on the four shared traces at 1,000 req/s and
at each trace's native rate. Slow (minutes); writes docs/planner_results.md and
JSON under bench/results/. Skips with a message when the traces are absent.

    PYTHONPATH=. .venv/bin/python bench/planner_results.py [--rates native,1000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import orjson

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from extproc.planner.plan import plan  # noqa: E402
from extproc.planner.traces import load_trace, scale_rate, tile  # noqa: E402

TRACES = os.environ.get("TRACES_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "traces"))
FILES = ["AzureLLMInferenceTrace_code.csv", "AzureLLMInferenceTrace_conv.csv",
         "conversation_trace.jsonl", "synthetic_trace.jsonl"]
#: At 1,000 req/s a trace lasts 4-19 s; it is tiled to this many seconds so the
#: fleet reaches steady state.
TILE_S = 60.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="native,1000")
    ap.add_argument("--b-short", default="8192,16384")
    ap.add_argument("--gpu", default="a100")
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--files", default=",".join(FILES), help="comma-separated trace files in the traces folder")
    a = ap.parse_args()
    if not os.path.isdir(TRACES):
        print(f"skip: traces folder {TRACES} absent", file=sys.stderr)
        return 0
    os.makedirs(a.out, exist_ok=True)
    bs = [int(x) for x in a.b_short.split(",")]
    for rate in a.rates.split(","):
        for f in a.files.split(","):
            tr = load_trace(os.path.join(TRACES, f))
            if rate != "native":
                tr = tile(scale_rate(tr, float(rate)), TILE_S)
            t0 = time.perf_counter()
            res = plan(tr, a.gpu, a.model, b_shorts=bs)
            res["plan_wall_s"] = time.perf_counter() - t0
            name = f"{f.split('.')[0]}_{rate}_{a.gpu}_{a.model}.json"
            with open(os.path.join(a.out, name), "wb") as fh:
                fh.write(orjson.dumps(res, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2,
                                      default=float))
            h = res["homogeneous"]
            line = [f, rate, len(tr), h["gpus"], h["pool"]["max_num_seqs"]]
            for r in res["dual"]:
                if "error" in r:
                    continue
                line += [r["b_short"], r["gpus"], f"{r['savings']:.3f}", f"{r['closed_form_savings']:.3f}",
                         f"{r['alpha']:.3f}", f"{r['rho']:.2f}"]
            print(*line, f"{res['plan_wall_s']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

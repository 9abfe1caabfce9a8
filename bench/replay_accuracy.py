"""Routing accuracy of the estimator on chats it has never seen, per tokenizer.

For each tokenizer in ../shared/data/calib: build a replay file of multi-turn
chats with system prompts (bench/make_replay_set.py: lengths concentrated
around B_short, true counts from that tokenizer + a chat template the router
is not told), run it through ``budget-router replay`` (the service's own
estimator and policy, learning from every line), and compare with a fixed
4 bytes/token estimator under the same output-budget rule.

    python bench/replay_accuracy.py [--n 10000] [--near-share 0.1] [--out docs/accuracy.md]

Prints a markdown table; with --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import orjson

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from extproc import config as C  # noqa: E402
from extproc.tools import replay  # noqa: E402
from extproc.core.policy import true_budget  # noqa: E402
from extproc.core.request import parse  # noqa: E402
import make_replay_set  # noqa: E402

TOKENIZERS = ("llama3", "qwen2.5", "cl100k", "o200k", "deepseek_v4")
TEMPLATES = {"llama3": "llama31", "qwen2.5": "chatml", "cl100k": "chatml", "o200k": "chatml", "deepseek_v4": "llama30"}


def fixed_ratio(path: str, b_short: int, default_output: int) -> dict:
    """Baseline: prompt = content bytes / 4, same output rule, no learning."""
    harmful = benign = n = 0
    errs = []
    for i, line in enumerate(open(path, "rb")):
        rec = orjson.loads(line)
        body, usage = rec["body"], rec["usage"]
        p = parse("/v1/chat/completions", orjson.dumps(body))
        est = len(p.text) / 4.0
        cap = p.max_output
        out = cap if cap is not None else default_output
        true = true_budget(usage["prompt_tokens"], cap, usage["completion_tokens"])
        short, oracle_short = est + out <= b_short, true <= b_short
        harmful += short and not oracle_short
        benign += oracle_short and not short
        n += 1
        if i >= replay.WARMUP_REQUESTS and usage["prompt_tokens"] > replay.LONG_PROMPT_TOKENS:
            errs.append(abs(est - usage["prompt_tokens"]) / usage["prompt_tokens"])
    return {"harmful_pct": 100 * harmful / n, "misroute_pct": 100 * (harmful + benign) / n,
            "p90": replay.percentile(errs, 90)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--near-share", type=float, default=0.1)
    ap.add_argument("--b-short", type=int, default=8192)
    ap.add_argument("--tokenizers", default=",".join(TOKENIZERS))
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if not os.path.exists(make_replay_set.CALIB):
        print(f"calib data not found at {make_replay_set.CALIB}; nothing to measure", file=sys.stderr)
        return 2
    cfg = C.load(env={}).replace(policy={"b_short": a.b_short})
    rows = []
    tmp = tempfile.mkdtemp(prefix="replay-acc-")
    for tok in a.tokenizers.split(","):
        path = os.path.join(tmp, f"{tok}.jsonl")
        make_replay_set.main(["--tokenizer", tok, "--template", TEMPLATES[tok], "--n", str(a.n),
                              "--near-share", str(a.near_share), "--b-short", str(a.b_short), "--out", path])
        t0 = time.perf_counter()
        s = replay.run(cfg, path, os.devnull, err=io.StringIO())
        dt = time.perf_counter() - t0
        base = fixed_ratio(path, a.b_short, cfg.policy.default_output_tokens)
        os.unlink(path)
        e = s["rel_error_long_prompts"]["all"]
        rows.append((tok, TEMPLATES[tok], s, e, base, dt))
        print(f"{tok}: harmful {s['harmful_pct']:.2f}% all {s['misroute_pct']:.2f}% p90 {100 * e['p90']:.1f}% "
              f"(fixed 4 B/tok: {base['harmful_pct']:.2f}% / {base['misroute_pct']:.2f}% / "
              f"{100 * base['p90']:.1f}%) in {dt:.1f} s", file=sys.stderr, flush=True)
    lines = [
        f"Command: `python bench/replay_accuracy.py --n {a.n} --near-share {a.near_share} --b-short {a.b_short}`",
        "",
        "| tokenizer (template) | harmful | all misroutes | p50 / p90 rel. error, prompts > 1K tokens | "
        "fixed 4 B/token: harmful / all / p90 | replay speed |",
        "|---|---|---|---|---|---|",
    ]
    for tok, tpl, s, e, base, dt in rows:
        lines.append(
            f"| {tok} ({tpl}) | {s['harmful_pct']:.2f}% | {s['misroute_pct']:.2f}% | "
            f"{100 * e['p50']:.1f}% / {100 * e['p90']:.1f}% | {base['harmful_pct']:.2f}% / "
            f"{base['misroute_pct']:.2f}% / {100 * base['p90']:.1f}% | {s['requests'] / dt:.0f} req/s |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

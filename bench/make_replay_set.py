"""Build a replay file (``budget-router replay`` input) from ../shared/data/calib.

Multi-turn chats with system prompts, lengths concentrated around B_short, and
``usage.prompt_tokens`` from the calib file's exact counts for one tokenizer
(the router never sees which) plus a chat-template overhead. The count of a
chat is the sum of its texts' counts plus the template: tokenizers merge
little across the template's special tokens, so this is the count vLLM would
report to within a few tokens.

    python bench/make_replay_set.py --tokenizer deepseek_v4 --n 20000 --out /tmp/replay.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys

import orjson

CALIB = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "calib", "calib_samples.jsonl.gz")

#: Template overheads (fixed, per message) of common chat templates:
#: Llama-3.1 default (system header with dates ~25 + begin/generation prompt),
#: Qwen ChatML (<|im_start|>role\n ... <|im_end|>\n), Llama-3.0.
TEMPLATES = {"llama31": (30, 5), "chatml": (3, 5), "llama30": (6, 5)}


def load(path: str, tokenizer: str) -> list[tuple[str, int, str]]:
    out = []
    with gzip.open(path) as f:
        for line in f:
            r = orjson.loads(line)
            out.append((r["text"], int(r["tokens"][tokenizer]), r["category"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", default=CALIB)
    ap.add_argument("--tokenizer", default="deepseek_v4", choices=["llama3", "qwen2.5", "cl100k", "o200k", "deepseek_v4"])
    ap.add_argument("--template", default="llama31", choices=sorted(TEMPLATES))
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--b-short", type=int, default=8192)
    ap.add_argument("--near-share", type=float, default=0.5, help="share of requests with budgets near B_short")
    ap.add_argument("--model", default="hidden-model")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if not os.path.exists(a.calib):
        print(f"calib data not found at {a.calib}", file=sys.stderr)
        return 2
    rng = random.Random(a.seed)
    texts = load(a.calib, a.tokenizer)
    system = [t for t in texts if t[2] == "en" and 10 <= t[1] <= 300]
    fixed, per_msg = TEMPLATES[a.template]
    with open(a.out, "wb") as out:
        for _ in range(a.n):
            if rng.random() < a.near_share:
                target = int(rng.gauss(0.8 * a.b_short, 0.2 * a.b_short))
            else:
                target = int(rng.lognormvariate(7.3, 1.0))
            target = max(20, target)
            # One language per chat, as in real conversations.
            lang = rng.choice(["en", "en", "code", "mixed_en_code", "json", "zh", "ja"])
            pool = [t for t in texts if t[2] == lang] if rng.random() < 0.8 else texts
            messages = []
            tokens = fixed
            if rng.random() < 0.7:
                s = rng.choice(system)
                messages.append({"role": "system", "content": s[0]})
                tokens += s[1] + per_msg
            role = "user"
            while tokens < target or not any(m["role"] == "user" for m in messages):
                t = rng.choice(pool)
                messages.append({"role": role, "content": t[0]})
                tokens += t[1] + per_msg
                role = "assistant" if role == "user" else "user"
                if len(messages) > 400:
                    break
            if messages[-1]["role"] != "user":
                t = rng.choice(pool)
                messages.append({"role": "user", "content": t[0]})
                tokens += t[1] + per_msg
            body: dict = {"model": a.model, "messages": messages}
            completion = int(min(4000, rng.lognormvariate(5.5, 0.9)))
            if rng.random() < 0.6:
                cap = rng.choice([256, 512, 1024, 2048])
                body["max_tokens"] = cap
                completion = min(completion, cap)
            out.write(orjson.dumps({"body": body, "usage": {"prompt_tokens": tokens, "completion_tokens": completion}}) + b"\n")
    print(f"wrote {a.n} requests to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

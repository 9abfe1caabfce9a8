"""``budget-router replay``: run users' own request logs through the router's core.

Input: JSONL, one request a line:
``{"body": <OpenAI request JSON>, "usage": {"prompt_tokens": N, "completion_tokens": M}}``
(optional ``"path"``; default ``/v1/chat/completions`` when the body has
``messages``, else ``/v1/completions``; optional ``"t"`` (seconds) and
``"load"``: ``{"<tier>": {"instances", "running", "waiting", "kv_usage",
"preemption_rate"}}``, the tiers' load as the monitor saw it then, fed to the
same spillover and adaptive-threshold objects the service runs; tiers left
out are unknown). Lines are processed in order through
the same estimator and policy the service runs: (observe) -> estimate -> decide -> learn
(every line with usage is learned from, as if all responses were sampled).

Output: one JSON line per input line, in order, with ``estimate``,
``prompt_tokens``, ``budget``, ``category``, ``pool``, ``oracle_pool`` (what
the true budget picks), and a summary on stderr.

The true budget of a request is prompt_tokens + its output cap when it gives
one (that is what vLLM reserves and checks against max_model_len), else
prompt_tokens + completion_tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import IO, Any, Iterable

import orjson

from ..config import Config
from ..core.load import TierLoad
from ..core.policy import tier_for, true_budget
from ..core.request import CHAT_PATH, COMPLETIONS_PATH
from ..core.router import Router

#: Requests before accuracy figures count ("after warm-up"): with adaptive
#: sampling every (model, category) learns from its first 32 responses, so
#: 200 requests cover the first samples of the usual 4-6 categories.
WARMUP_REQUESTS = 200

#: Prompts shorter than this are left out of the headline error figure, as
#: in the issue: short prompts have large relative errors that never matter
#: for routing at B_short >= 4K.
LONG_PROMPT_TOKENS = 1000


@dataclass
class Summary:
    requests: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    with_usage: int = 0
    harmful: int = 0
    benign: int = 0
    rejected: int = 0
    spilled: int = 0
    pools: dict[str, int] = field(default_factory=dict)
    rel_errors: dict[str, list[float]] = field(default_factory=dict)  # after warm-up, > 1000 tokens
    all_rel_errors: dict[str, list[float]] = field(default_factory=dict)

    def add_error(self, category: str, rel: float, prompt_tokens: int, index: int) -> None:
        self.all_rel_errors.setdefault(category, []).append(rel)
        if index >= WARMUP_REQUESTS and prompt_tokens > LONG_PROMPT_TOKENS:
            self.rel_errors.setdefault(category, []).append(rel)

    def as_dict(self) -> dict[str, Any]:
        n = max(1, self.with_usage)
        out: dict[str, Any] = {
            "requests": self.requests, "bad_lines": len(self.bad_lines), "with_usage": self.with_usage,
            "pools": self.pools, "rejected": self.rejected, "spilled": self.spilled,
            "harmful": self.harmful, "benign": self.benign,
            "harmful_pct": round(100 * self.harmful / n, 3),
            "benign_pct": round(100 * self.benign / n, 3),
            "misroute_pct": round(100 * (self.harmful + self.benign) / n, 3),
            "rel_error_long_prompts": {},
        }
        everything = [e for v in self.rel_errors.values() for e in v]
        for cat, errs in sorted(self.rel_errors.items()) + [("all", everything)]:
            if errs:
                out["rel_error_long_prompts"][cat] = {
                    "n": len(errs), "p50": round(percentile(errs, 50), 4), "p90": round(percentile(errs, 90), 4)}
        return out


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def recorded_loads(router: Router, load: Any) -> tuple[TierLoad, ...]:
    """A replay record's ``load`` as one TierLoad per tier (missing: unknown)."""
    out = []
    for t in router.cfg.tiers:
        v = load.get(t.name) if isinstance(load, dict) else None
        if not isinstance(v, dict) or not v.get("instances"):
            out.append(TierLoad(t.name))
            continue
        out.append(TierLoad(t.name, True, int(v["instances"]), float(v.get("running", 0)),
                            float(v.get("waiting", 0)), float(v.get("kv_usage", 0)),
                            float(v.get("preemption_rate", 0)), 0.0))
    return tuple(out)


def replay_lines(router: Router, lines: Iterable[bytes], out: IO[bytes], summary: Summary) -> None:
    tiers = router.cfg.tiers
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
            body = rec["body"]
            if not isinstance(body, dict):
                raise ValueError("'body' is not a JSON object")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            msg = f"not a replay record: {e}"
            summary.bad_lines.append((lineno, msg))
            out.write(orjson.dumps({"line": lineno, "error": msg}) + b"\n")
            continue
        index = summary.requests
        summary.requests += 1
        path = rec.get("path") or (CHAT_PATH if "messages" in body else COMPLETIONS_PATH)
        if "load" in rec:
            t = rec.get("t")
            router.observe(recorded_loads(router, rec["load"]), float(t) if isinstance(t, (int, float)) else index)
        limits = router.limits()
        d = router.route(path, orjson.dumps(body))
        usage = rec.get("usage") if isinstance(rec.get("usage"), dict) else {}
        pt, ct = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
        row: dict[str, Any] = {
            "line": lineno, "estimate": d.estimate, "prompt_tokens": pt, "output": d.output,
            "output_source": d.output_source, "budget": d.budget, "margin": round(d.margin, 4),
            "category": d.category or None, "model": d.model or None, "pool": d.pool, "reason": d.reason,
            "completion_tokens": ct,
        }
        if d.from_pool:
            row["from_pool"] = d.from_pool
        if d.status is not None:
            summary.rejected += 1
            row["status"] = d.status
        summary.pools[d.pool] = summary.pools.get(d.pool, 0) + 1
        summary.spilled += bool(d.from_pool)
        if pt is not None:
            budget = true_budget(pt, d.output if d.capped else None, ct)
            oracle_i = tier_for(limits, budget)
            oracle = tiers[oracle_i].name
            row["true_budget"] = budget
            row["oracle_pool"] = oracle
            summary.with_usage += 1
            if d.status is None:
                chosen = router.cfg.tier_index(d.pool)
                if chosen < oracle_i:  # a tier too small for it: vLLM would reject or truncate
                    summary.harmful += 1
                elif chosen > oracle_i and d.routable and not d.from_pool:  # bigger than needed (not by spillover)
                    summary.benign += 1
            if d.routable and not d.exact:
                rel = (d.estimate - pt) / pt if pt else None
                if rel is not None:
                    row["rel_error"] = round(rel, 5)
                    summary.add_error(d.category, abs(rel), pt, index)
            router.learn(d, pt, ct)
        else:
            row["oracle_pool"] = None
        out.write(orjson.dumps(row) + b"\n")


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"requests: {s['requests']} ({s['with_usage']} with usage, {s['bad_lines']} bad lines, "
        f"{s['rejected']} rejected 400/413)",
        "pools: " + ", ".join(f"{k}={v}" for k, v in sorted(s["pools"].items()))
        + (f" ({s['spilled']} by spillover)" if s.get("spilled") else ""),
        f"misroutes: harmful {s['harmful']} ({s['harmful_pct']:.2f}%), benign {s['benign']} "
        f"({s['benign_pct']:.2f}%), all {s['misroute_pct']:.2f}%",
        f"prompt estimate |relative error|, prompts > {LONG_PROMPT_TOKENS} tokens after {WARMUP_REQUESTS} requests:",
    ]
    for cat, e in s["rel_error_long_prompts"].items():
        lines.append(f"  {cat:<8} n={e['n']:<6} p50={100 * e['p50']:.1f}%  p90={100 * e['p90']:.1f}%")
    return "\n".join(lines)


def run(cfg: Config, requests: str, out_path: str | None, err: IO[str] = sys.stderr) -> dict[str, Any]:
    router = Router(cfg)
    summary = Summary()
    out = open(out_path, "wb") if out_path else sys.stdout.buffer
    try:
        with open(requests, "rb") as f:
            replay_lines(router, f, out, summary)
    finally:
        if out_path:
            out.close()
        else:
            out.flush()
    s = summary.as_dict()
    for lineno, msg in summary.bad_lines[:20]:
        print(f"line {lineno}: {msg}", file=err)
    if len(summary.bad_lines) > 20:
        print(f"... and {len(summary.bad_lines) - 20} more bad lines", file=err)
    print(format_summary(s), file=err)
    return s

"""``budget-router demo``: the whole stack, real-looking traffic, a report.

1. starts the same stack as ``budget-router up`` on free loopback ports
   (Envoy + router + a short and a long simulated vLLM pool);
2. replays traffic through Envoy with the official ``openai`` client: the
   built-in mix (``extproc.tools.demo_traffic``), real prompt files (``--prompts``)
   or a trace's arrival times and sizes (``--trace``);
3. reports, per request, what the router decided (the ``x-budget-decision``
   response header) against the truth (the response's ``usage``): requests per
   pool, estimate error per category early vs late (convergence), misroutes,
   errors, the latency Envoy + router add, and the calibration the router
   learned (read from its snapshot after shutdown); writes ``report.json``,
   ``report.md``, ``estimate_error.png`` and ``pools.png`` to ``--out``;
4. stops everything, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from .. import config as C
from . import demo_traffic as T
from ..core.policy import true_budget
from .replay import percentile
from .stack import POOL_KINDS, POOLS_SIM, POOLS_VLLM

# --- Defaults ---------------------------------------------------------------------

#: Requests of a default run: enough for every (model, category) fit to pass
#: its 32 "learn from everything" samples and show convergence in the last
#: 20%, small enough for ~1-2 minutes on 2 cores.
DEFAULT_REQUESTS = 300

#: Requests of a default run with real vLLM pools (``--pools vllm``): two CPU
#: servers answer ~2-4 requests a second on 2 cores, so ~1-2 minutes of traffic.
DEFAULT_REQUESTS_VLLM = 150

#: Prompt and output sizes of the built-in mix with real vLLM pools: their
#: long context is 8,192 tokens (tools/vllm_pool.py), 1/16 of the 131,072 the
#: mix is written for.
VLLM_MIX_SCALE = 1 / 16

#: Client concurrency: keeps both pools batching (a real load) while 2 cores
#: still run Envoy, the router, two pools and this client without the client
#: becoming the bottleneck (measured: 16+ only adds queueing).
DEFAULT_CONCURRENCY = 12

#: Wall seconds per simulated GPU second. The simulator decodes ~50 tok/s per
#: sequence, so the default mix (~120K output tokens, 300 requests at
#: concurrency 12) would take ~5 minutes at 1.0; 0.25 makes a 512-token answer
#: ~2.5 s and the default run ~70 s of traffic (~85 s in all, measured on 2
#: cores), slow enough to watch the progress bar and keep real batching in
#: the pools. The latency figure is unaffected: it compares identical requests.
DEMO_TIME_SCALE = 0.25

#: [router] sample_rate for the demo. The router learns from every response
#: while a (model, category) has < 32 samples, then from this share; the
#: deployment default (5%) would need thousands of requests to show
#: convergence, so the demo learns from every response.
DEMO_SAMPLE_RATE = 1.0

#: Identical request pairs sent straight to the short pool and through Envoy to
#: measure what the proxy + router add: 100 gives a stable p50 and a p99 that
#: is the 2nd-largest difference, in ~2 s.
LATENCY_PAIRS = 100

#: Model name of the latency probes: the router keys what it learns by
#: (model, category), so probes never disturb the demo model's calibration.
PROBE_MODEL = "latency-probe"

#: Per-request client timeout: above the slowest long prompt at the demo's
#: time scale by a wide margin; a stuck request is reported, not waited for.
REQUEST_TIMEOUT_S = 120.0

#: Whole traffic phase deadline (seconds): a run never hangs; unfinished
#: requests are cancelled and reported.
DEFAULT_DEADLINE_S = 600.0

#: Rolling-median window (requests of one category) of the convergence plot.
ROLLING_WINDOW = 15

#: Early / late share of each category's requests compared in the report.
PHASE_SHARE = 0.2

DEFAULT_OUT = "out/demo"

_PROMPT_IN_ERROR = re.compile(r"\((\d+) in the messages")


@dataclass
class Result:
    index: int
    kind: str
    stream: bool
    max_tokens: int | None
    deliberate: bool
    content_bytes: int
    status: int | None = None          # HTTP status (None: no response)
    error: str = ""
    pool: str | None = None            # router's decision
    served_by: str | None = None       # x-pool-name of the answering pool
    estimate: int | None = None
    budget: int | None = None
    category: str | None = None
    reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None   # of the first choice
    latency_s: float | None = None
    sent_at: float | None = None       # seconds after the traffic started
    scheduled_at: float | None = None  # trace arrival time (scaled), if any
    target_tokens: int | None = None   # trace input length, if any

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.prompt_tokens is not None

    @property
    def true_budget(self) -> int | None:
        if self.prompt_tokens is None:
            return None
        return true_budget(self.prompt_tokens, self.max_tokens, self.completion_tokens)

    @property
    def rel_error(self) -> float | None:
        if self.estimate is None or not self.prompt_tokens or self.status != 200:
            return None
        return (self.estimate - self.prompt_tokens) / self.prompt_tokens


def parse_decision(value: str | None) -> dict[str, str]:
    """``pool=short; est=1234; budget=2258; margin=0.120; cat=prose; reason=...`` -> dict
    (budget: the padded one the limits were compared with)."""
    out: dict[str, str] = {}
    for part in (value or "").split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _apply_headers(res: Result, headers: Any, decision_header: str) -> None:
    d = parse_decision(headers.get(decision_header))
    res.pool = d.get("pool")
    res.estimate = _int(d.get("est"))
    res.budget = _int(d.get("budget"))
    res.category = d.get("cat") if d.get("cat") not in (None, "-") else None
    res.reason = d.get("reason")
    res.served_by = headers.get("x-pool-name")


# --- Sending ------------------------------------------------------------------------

async def send_one(client, req: T.DemoRequest, decision_header: str, t0: float) -> Result:
    import openai
    res = Result(req.index, req.kind, req.stream, req.max_tokens, req.deliberate_error, req.content_bytes(),
                 scheduled_at=req.at, target_tokens=req.target_tokens)
    body = req.body()
    start = time.perf_counter()
    res.sent_at = start - t0
    try:
        raw = await client.chat.completions.with_raw_response.create(**body)
        _apply_headers(res, raw.headers, decision_header)
        res.status = raw.status_code
        if req.stream:
            usage = None
            async for chunk in raw.parse():
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.choices and chunk.choices[0].finish_reason:
                    res.finish_reason = chunk.choices[0].finish_reason
        else:
            parsed = raw.parse()
            usage = parsed.usage
            if parsed.choices:
                res.finish_reason = parsed.choices[0].finish_reason
        if usage is not None:
            res.prompt_tokens, res.completion_tokens = usage.prompt_tokens, usage.completion_tokens
    except openai.APIStatusError as e:
        res.status = e.status_code
        _apply_headers(res, e.response.headers, decision_header)
        res.error = str(e.message)[:300]
        m = _PROMPT_IN_ERROR.search(res.error)
        if m:  # vLLM's context-length message names the prompt's token count
            res.prompt_tokens = int(m.group(1))
    except (openai.APIError, OSError, asyncio.TimeoutError) as e:
        res.error = f"{type(e).__name__}: {e}"[:300]
    res.latency_s = time.perf_counter() - start
    return res


async def run_traffic(url: str, reqs: list[T.DemoRequest], concurrency: int, decision_header: str,
                      deadline_s: float, progress: bool = True) -> tuple[list[Result], float]:
    """Send every request (at its arrival time for traces) with at most
    ``concurrency`` in flight; returns results in request order and wall time."""
    from openai import AsyncOpenAI
    from tqdm import tqdm

    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(reqs), desc="requests", unit="req", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    counts = {"short": 0, "long": 0, "err": 0}
    t0 = time.perf_counter()

    async def one(req: T.DemoRequest) -> Result:
        if req.at is not None:
            await asyncio.sleep(max(0.0, t0 + req.at - time.perf_counter()))
        async with sem:
            r = await send_one(client, req, decision_header, t0)
        if r.status == 200:
            counts[r.served_by or r.pool or "short"] = counts.get(r.served_by or r.pool or "short", 0) + 1
        else:
            counts["err"] += 1
        bar.set_postfix(short=counts["short"], long=counts["long"], errors=counts["err"], refresh=False)
        bar.update(1)
        return r

    tasks = [asyncio.ensure_future(one(r)) for r in reqs]
    try:
        await asyncio.wait(tasks, timeout=deadline_s)
    finally:
        # deadline, Ctrl-C or an error: cancel what is left before closing the client
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        bar.close()
        await client.close()
    results = []
    for req, t in zip(reqs, tasks):
        if t.done() and not t.cancelled() and t.exception() is None:
            results.append(t.result())
        else:
            r = Result(req.index, req.kind, req.stream, req.max_tokens, req.deliberate_error, req.content_bytes())
            r.error = "cancelled: demo deadline reached" if t.cancelled() or not t.done() else repr(t.exception())
            results.append(r)
    return results, time.perf_counter() - t0


async def measure_latency(envoy_url: str, pool_url: str, pairs: int, seed: int) -> dict[str, Any]:
    """Identical small requests, one straight to the short pool and one through
    Envoy (+ router), alternating which goes first; sequential so nothing else
    is in flight."""
    import random

    from openai import AsyncOpenAI
    rng = random.Random(seed)
    via = AsyncOpenAI(base_url=envoy_url, api_key="unused", max_retries=0, timeout=30.0)
    direct = AsyncOpenAI(base_url=pool_url, api_key="unused", max_retries=0, timeout=30.0)
    lat: dict[str, list[float]] = {"direct": [], "envoy": []}
    try:
        async def timed(client, body) -> float:
            t = time.perf_counter()
            await client.chat.completions.create(**body)
            return time.perf_counter() - t

        for i in range(pairs + 2):  # 2 warm-up pairs (connections) not counted
            body = {"model": PROBE_MODEL, "max_tokens": 1,
                    "messages": [{"role": "user", "content": T.prose_text(rng, rng.randint(100, 400))}]}
            order = [("direct", direct), ("envoy", via)]
            if i % 2:
                order.reverse()
            for name, client in order:
                dt = await timed(client, body)
                if i >= 2:
                    lat[name].append(dt)
    finally:
        await via.close()
        await direct.close()
    diffs = [e - d for e, d in zip(lat["envoy"], lat["direct"])]
    ms = lambda v: round(1000 * v, 3)  # noqa: E731
    return {
        "pairs": len(diffs),
        "direct_p50_ms": ms(pct(lat["direct"], 50)), "direct_p99_ms": ms(pct(lat["direct"], 99)),
        "envoy_p50_ms": ms(pct(lat["envoy"], 50)), "envoy_p99_ms": ms(pct(lat["envoy"], 99)),
        "added_p50_ms": ms(pct(lat["envoy"], 50) - pct(lat["direct"], 50)),
        "added_p99_ms": ms(pct(lat["envoy"], 99) - pct(lat["direct"], 99)),
        "paired_diff_p50_ms": ms(pct(diffs, 50)),
    }


# --- Analysis ---------------------------------------------------------------------------

pct = percentile  # linear-interpolated percentile, shared with replay


def _r(x: float, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


def analyze(results: list[Result], b_short: int, short: str = "short") -> dict[str, Any]:
    pools: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    statuses: dict[str, int] = {}
    harmful: list[int] = []
    truncated: list[int] = []   # harmful, answered 200 but cut short (vLLM 0.32+)
    benign: list[int] = []
    judged = 0
    unexpected: list[dict[str, Any]] = []
    deliberate: list[dict[str, Any]] = []
    mismatch = 0
    for r in results:
        key = str(r.status) if r.status is not None else ("cancelled" if r.error.startswith("cancelled") else "no response")
        statuses[key] = statuses.get(key, 0) + 1
        k = by_kind.setdefault(r.kind, {"n": 0, "short": 0, "long": 0, "errors": 0})
        k["n"] += 1
        if r.pool:
            pools[r.pool] = pools.get(r.pool, 0) + 1
            if r.pool in k:
                k[r.pool] += 1
        if r.status == 200 and r.served_by and r.pool and r.served_by != r.pool:
            mismatch += 1
        tb = r.true_budget
        is_harmful = False
        if tb is not None and r.pool and not r.deliberate:
            judged += 1
            oracle = short if tb <= b_short else "long"
            if r.pool == short and oracle != short:
                harmful.append(r.index)
                is_harmful = True
                if r.status == 200 and r.finish_reason == "length" and (
                        r.max_tokens is None or (r.completion_tokens or 0) < r.max_tokens):
                    truncated.append(r.index)
            elif r.pool != short and oracle == short:
                benign.append(r.index)
        if r.status != 200:
            k["errors"] += 1
            item = {"index": r.index, "kind": r.kind, "status": r.status, "pool": r.pool,
                    "reason": r.reason, "error": r.error}
            if r.deliberate:
                deliberate.append(item)
            elif not is_harmful:  # a harmful misroute's 400 is counted as a misroute
                unexpected.append(item)
    # estimate error per router category: early vs late
    cats: dict[str, list[Result]] = {}
    for r in results:
        if r.rel_error is not None and r.category:
            cats.setdefault(r.category, []).append(r)
    per_cat: dict[str, Any] = {}
    everything: list[Result] = sorted((r for v in cats.values() for r in v), key=lambda r: r.index)
    for cat, rs in sorted(cats.items()) + [("all", everything)]:
        rs = sorted(rs, key=lambda r: r.index)
        n = len(rs)
        m = max(1, int(round(n * PHASE_SHARE)))
        first = [abs(r.rel_error) for r in rs[:m]]
        last = [abs(r.rel_error) for r in rs[-m:]]
        per_cat[cat] = {
            "n": n, "phase_n": m,
            "first_p50": _r(pct(first, 50)), "last_p50": _r(pct(last, 50)),
            "first_p90": _r(pct(first, 90)), "last_p90": _r(pct(last, 90)),
            "bytes_per_token": _r(sum(r.content_bytes for r in rs) / max(1, sum(r.prompt_tokens for r in rs)), 3),
        }
    lat = [r.latency_s for r in results if r.status == 200 and r.latency_s is not None]
    n_judged = max(1, judged)
    trace: dict[str, Any] = {}
    lags = [r.sent_at - r.scheduled_at for r in results if r.scheduled_at is not None and r.sent_at is not None]
    if lags:
        # how late requests left because --concurrency was full, and how close
        # the built prompts came to the trace's input lengths
        size = [abs(r.prompt_tokens - r.target_tokens) / r.target_tokens for r in results
                if r.target_tokens and r.prompt_tokens and r.status == 200]
        trace = {"start_lag_p50_s": _r(pct(lags, 50), 3), "start_lag_p99_s": _r(pct(lags, 99), 3),
                 "prompt_vs_trace_rel_diff_p50": _r(pct(size, 50)), "prompt_vs_trace_rel_diff_p90": _r(pct(size, 90))}
    return {
        "requests": len(results),
        "ok": sum(1 for r in results if r.ok),
        "statuses": statuses,
        "pools": pools,
        "served_by_mismatch": mismatch,
        "by_kind": by_kind,
        "estimate_error": per_cat,
        "misroutes": {
            "judged": judged, "harmful": len(harmful), "benign": len(benign),
            "harmful_pct": round(100 * len(harmful) / n_judged, 2),
            "benign_pct": round(100 * len(benign) / n_judged, 2),
            "harmful_requests": harmful[:50], "benign_requests": benign[:50],
            "harmful_truncated": len(truncated), "truncated_requests": truncated[:50],
        },
        "errors": {"deliberate": deliberate, "unexpected": unexpected},
        "request_latency_s": {"p50": _r(pct(lat, 50), 3), "p99": _r(pct(lat, 99), 3)},
        "trace": trace,
    }


def learned_table(cfg, state_file: str) -> list[dict[str, Any]]:
    """The router's learned calibration, read from the snapshot it writes on
    shutdown (the demo talks to a separate process; this is its own table)."""
    from ..serve import snapshot
    from ..core.router import Router
    state, _src = snapshot.load_best(state_file)
    if state is None:
        return []
    router = Router(cfg)
    router.restore(state)
    return [row for row in router.estimator.table() if row.get("model") != PROBE_MODEL]


# --- Plots ------------------------------------------------------------------------------

_COLORS = {"prose": "tab:blue", "code": "tab:green", "cjk": "tab:red", "json": "tab:purple",
           "tokens": "tab:gray"}


def _rolling_median(values: list[float], w: int) -> list[float]:
    return [statistics.median(values[max(0, i - w + 1): i + 1]) for i in range(len(values))]


def plot_estimate_error(results: list[Result], path: str, sample_rate: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats: dict[str, list[Result]] = {}
    for r in results:
        if r.rel_error is not None and r.category:
            cats.setdefault(r.category, []).append(r)
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for cat, rs in sorted(cats.items()):
        rs.sort(key=lambda r: r.index)
        xs = [r.index for r in rs]
        ys = [max(abs(r.rel_error), 1e-4) for r in rs]
        color = _COLORS.get(cat)
        ax.scatter(xs, ys, s=8, alpha=0.25, color=color)
        ax.plot(xs, _rolling_median(ys, ROLLING_WINDOW), color=color, lw=2,
                label=f"{cat} (n={len(rs)})")
    ax.set_yscale("log")
    ax.set_xlabel("request index (send order)")
    ax.set_ylabel("|estimate - prompt_tokens| / prompt_tokens")
    ax.set_title(f"Router's prompt-token estimate error per category "
                 f"(rolling median of {ROLLING_WINDOW}; learns from {sample_rate:.0%} of responses)")
    ax.title.set_fontsize(10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_pools(results: list[Result], path: str, b_short: int, short: str = "short") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    for pool, color in ((short, "tab:blue"), ("long", "tab:orange")):
        rs = [r for r in results if r.pool == pool and r.true_budget and r.budget and not r.deliberate]
        ax.scatter([r.true_budget for r in rs], [r.budget for r in rs], s=12, alpha=0.7, color=color,
                   label=f"routed {pool} ({len(rs)})")
    bad = [r for r in results if r.true_budget and r.pool and r.budget and not r.deliberate
           and ((r.pool == short) != (r.true_budget <= b_short))]
    harmful = [r for r in bad if r.pool == short]
    benign = [r for r in bad if r.pool != short]
    if harmful:
        ax.scatter([r.true_budget for r in harmful], [r.budget for r in harmful], s=70, facecolors="none",
                   edgecolors="red", lw=1.5, label=f"harmful misroute ({len(harmful)})")
    if benign:
        ax.scatter([r.true_budget for r in benign], [r.budget for r in benign], s=60, facecolors="none",
                   edgecolors="dimgray", lw=1.0, label=f"benign misroute ({len(benign)})")
    ax.axhline(b_short, color="black", ls="--", lw=1, label=f"B_short = {b_short}")
    ax.axvline(b_short, color="black", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("true budget: usage.prompt_tokens + (max_tokens or completion_tokens)")
    ax.set_ylabel("router's budget: estimated prompt + output budget (tokens)")
    ax.text(0.98, 0.02, "long below the dashed line: the safety margin\n(estimate x (1 + margin) + output > B_short)",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="dimgray")
    ax.set_title("Where each request went")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- Report -----------------------------------------------------------------------------

def _pcts(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_report(rep: dict[str, Any]) -> str:
    a = rep["analysis"]
    c = rep["config"]
    pools_text = (f"real vLLM {c.get('vllm_version')} CPU servers, tiny Qwen2 with random weights"
                  if c.get("pools") == POOLS_VLLM else f"simulated vLLM at time scale {c['time_scale']}")
    lines = [
        "# budget-router demo report",
        "",
        f"traffic: {c['source']}; {a['requests']} requests, concurrency {c['concurrency']}, seed {c['seed']}, "
        f"{rep['wall_seconds']:.1f} s of traffic",
        f"router: B_short = {c['b_short']}, sample_rate = {c['sample_rate']} (demo setting: the router learns "
        f"from every response; deployments default to {c['default_sample_rate']}), fresh calibration state",
        f"pools: {pools_text} (short max_model_len {c['short_max_model_len']}, "
        f"long {c['long_max_model_len']})",
        "",
        "## Requests per pool",
        "",
        "  " + ", ".join(f"{k}: {v}" for k, v in sorted(a["pools"].items()))
        + "   (HTTP statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(a["statuses"].items())) + ")",
        "",
        f"  end-to-end latency of successful requests: p50 {a['request_latency_s']['p50']} s, "
        f"p99 {a['request_latency_s']['p99']} s ({pools_text})",
    ]
    if a.get("trace"):
        t = a["trace"]
        lines.append(f"  trace replay: start lag behind the trace's arrival times p50 {t['start_lag_p50_s']} s, "
                     f"p99 {t['start_lag_p99_s']} s (--concurrency full); prompt_tokens vs the trace's input "
                     f"length: p50 {_pcts(t['prompt_vs_trace_rel_diff_p50'])}, p90 {_pcts(t['prompt_vs_trace_rel_diff_p90'])} off")
    lines += [
        "",
        "| traffic kind | requests | short | long | errors |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, v in sorted(a["by_kind"].items()):
        lines.append(f"| {k} | {v['n']} | {v['short']} | {v['long']} | {v['errors']} |")
    lines += [
        "",
        f"## Prompt estimate |relative error| per category: first vs last {int(100 * PHASE_SHARE)}% of its requests",
        "",
        "| category | requests | p50 first | p50 last | p90 first | p90 last | bytes/token seen |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cat, e in a["estimate_error"].items():
        lines.append(f"| {cat} | {e['n']} | {_pcts(e['first_p50'])} | {_pcts(e['last_p50'])} | "
                     f"{_pcts(e['first_p90'])} | {_pcts(e['last_p90'])} | {e['bytes_per_token']} |")
    m = a["misroutes"]
    lines += [
        "",
        "## Misroutes (true budget = usage.prompt_tokens + (max_tokens if given else completion_tokens))",
        "",
        f"  harmful (true budget > B_short, sent short): {m['harmful']} ({m['harmful_pct']:.2f}%); "
        f"{m.get('harmful_truncated', 0)} of them answered 200 but cut short at the short pool's max_model_len "
        "(vLLM 0.32+ clips instead of refusing)",
        f"  benign  (true budget <= B_short, sent long): {m['benign']} ({m['benign_pct']:.2f}%)",
        f"  of {m['judged']} requests with a known true budget. Benign ones are the price of the safety margin "
        "(estimate x (1 + margin) + output budget is compared with B_short), paid by requests just under B_short; "
        "a harmful one is refused by the short pool when its prompt alone is too long, and otherwise cut short "
        "(vLLM 0.32+; vLLM 0.5-0.10 refused prompt + max_tokens > max_model_len).",
        "",
        "## Errors",
        "",
        f"  unexpected: {len(a['errors']['unexpected'])}",
    ]
    for e in a["errors"]["unexpected"][:10]:
        lines.append(f"    #{e['index']} {e['kind']}: status {e['status']} {e['error'][:160]}")
    lines.append(f"  deliberate (must fail): {len(a['errors']['deliberate'])}")
    for e in a["errors"]["deliberate"]:
        who = "router" if e["reason"] == "context_length_exceeded" else f"pool {e['pool']}"
        lines.append(f"    #{e['index']} {e['kind']}: status {e['status']} from {who}")
    lat = rep.get("latency") or {}
    if lat:
        lines += [
            "",
            f"## Latency added by Envoy + router ({lat['pairs']} identical request pairs, direct to the short pool vs through Envoy)",
            "",
            f"  direct:  p50 {lat['direct_p50_ms']:.2f} ms, p99 {lat['direct_p99_ms']:.2f} ms",
            f"  Envoy:   p50 {lat['envoy_p50_ms']:.2f} ms, p99 {lat['envoy_p99_ms']:.2f} ms",
            f"  added:   p50 {lat['added_p50_ms']:+.2f} ms, p99 {lat['added_p99_ms']:+.2f} ms "
            f"(median paired difference {lat['paired_diff_p50_ms']:+.2f} ms)",
        ]
    table = rep.get("calibration") or []
    if table:
        lines += [
            "",
            "## Calibration the router learned (its snapshot at shutdown)",
            "",
            "| model | category | samples | bytes/token | tokens/message | overhead | rel. error | long-prompt rms |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in table:
            lines.append(f"| {row['model']} | {row['category']} | {row['samples']} | {row['bytes_per_token']} | "
                         f"{row['tokens_per_message']} | {row['overhead']} | {_pcts(row['rel_error'])} | "
                         f"{_pcts(row['long_rms'])} |")
    lines += ["", "## Files", ""] + [f"  {k}: {v}" for k, v in rep["files"].items()]
    return "\n".join(lines) + "\n"


# --- Command ----------------------------------------------------------------------------

def _vllm_version(pools: str) -> str | None:
    if pools != POOLS_VLLM:
        return None
    from .vllm_pool import VLLM_VERSION
    return VLLM_VERSION


def build_requests(args: argparse.Namespace, b_short: int) -> tuple[list[T.DemoRequest], str]:
    reqs, source = _requests(args, b_short)
    if args.pools == POOLS_VLLM:
        from .vllm_pool import VLLM_MODEL
        for r in reqs:
            r.model = VLLM_MODEL  # real vLLM answers 404 to names it does not serve
    return reqs, source


def _requests(args: argparse.Namespace, b_short: int) -> tuple[list[T.DemoRequest], str]:
    if args.trace:
        reqs = T.from_trace(args.trace, args.requests, args.seed, rate=args.rate, duration=args.duration)
        return reqs, f"trace {args.trace} (arrivals x{args.rate})"
    if args.prompts:
        return T.from_prompt_files(args.prompts, args.requests, args.seed, b_short), f"prompt files {args.prompts}"
    real = args.pools == POOLS_VLLM
    scale = VLLM_MIX_SCALE if real else 1.0
    return (T.builtin_mix(args.requests, args.seed, b_short, scale=scale, capped_only=real),
            "built-in mix (stdlib prose/code, CJK, tools, chats, long)"
            + (f", sizes x{scale:g}, every request capped (random weights never stop)" if real else ""))


def _print_stack_failure(stack, err: Exception) -> None:
    print(f"budget-router demo: the stack did not start: {err}", file=sys.stderr)
    names = list(stack.logs)
    if names:
        failing = names[-1]  # components start in order; the last one started is the one that failed
        print(f"--- last lines of {failing} ({stack.logs[failing]}) ---", file=sys.stderr)
        print(stack.log_tail(failing), file=sys.stderr)
        others = [f"{n}: {stack.logs[n]}" for n in names[:-1]]
        if others:
            print("other logs: " + ", ".join(others), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from .. import defaults as D
    from .stack import Stack, demo_config, vllm_config

    if getattr(args, "scenario", "mix") == "burst":
        from .burst import run as run_burst
        return run_burst(args)
    if args.time_scale is None:
        args.time_scale = DEMO_TIME_SCALE

    if args.requests is None:
        args.requests = DEFAULT_REQUESTS_VLLM if args.pools == POOLS_VLLM else DEFAULT_REQUESTS
    if args.pools == POOLS_VLLM:
        from .vllm_pool import missing
        if missing():
            print(f"budget-router demo: {missing()}", file=sys.stderr)
            return 2
    if args.requests < 1 or args.concurrency < 1:
        print("budget-router demo: --requests and --concurrency must be >= 1", file=sys.stderr)
        return 2
    for opt in ("prompts", "trace"):
        p = getattr(args, opt)
        if p and not os.path.exists(p):
            print(f"budget-router demo: --{opt} {p}: no such file or directory", file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="budget-router-demo-")
    state_file = os.path.join(workdir, "state.json")
    base = C.load_config(args)
    try:
        cfg = demo_config(base, getattr(args, "port_base", None),
                          router={"sample_rate": args.sample_rate, "state_file": state_file})
    except ValueError as e:
        print(f"budget-router demo: {e}", file=sys.stderr)
        return 2
    if args.pools == POOLS_VLLM:
        cfg = vllm_config(cfg)
    b_short = cfg.b_short
    stack = Stack(cfg, workdir=workdir, time_scale=args.time_scale, pools=args.pools)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    t_start = time.perf_counter()
    what = ("real vLLM CPU pools (tiny Qwen2, random weights; ~1-2 min to start)" if args.pools == POOLS_VLLM
            else f"simulated pools (time scale {args.time_scale})")
    print(f"budget-router demo: starting Envoy + router + short and long {what} ...", flush=True)
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        building = pool.submit(build_requests, args, b_short)  # builds while the stack starts
        try:
            stack.start()
        except RuntimeError as e:
            _print_stack_failure(stack, e)
            return 1
        print(f"  Envoy (OpenAI API):  {stack.url}\n"
              f"  Envoy admin:         {stack.admin_url}\n"
              f"  short pool:          {stack.pool_url(cfg.short.name)}   long pool: {stack.pool_url(cfg.long.name)}\n"
              f"  router workers:      127.0.0.1:{cfg.router.port} ({cfg.router.workers})\n"
              f"  logs and config:     {workdir}\n"
              f"  ready in {time.perf_counter() - t_start:.1f} s", flush=True)
        try:
            reqs, source = building.result()
        except (OSError, ValueError, KeyError) as e:
            print(f"budget-router demo: cannot read the traffic: {e}", file=sys.stderr)
            return 2
        n_stream = sum(r.stream for r in reqs)
        print(f"traffic: {source}: {len(reqs)} requests ({n_stream} streamed), concurrency {args.concurrency}",
              flush=True)
        results, wall = asyncio.run(run_traffic(stack.url, reqs, args.concurrency, cfg.router.decision_header,
                                                args.deadline, progress=not args.no_progress))
        latency = {}
        if args.latency_pairs > 0:
            print(f"measuring added latency: {args.latency_pairs} request pairs, direct vs through Envoy ...",
                  flush=True)
            latency = asyncio.run(measure_latency(stack.url, stack.pool_url(cfg.short.name) + "/v1",
                                                  args.latency_pairs, args.seed))
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the stack ...", file=sys.stderr, flush=True)
        stack.stop()
        return 130
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        codes = stack.stop()
        signal.signal(signal.SIGTERM, old_term)
    if codes:
        print("stopped: " + ", ".join(f"{k}={v}" for k, v in codes.items()), flush=True)

    analysis = analyze(results, b_short, cfg.short.name)
    try:
        table = learned_table(cfg, state_file)
    except Exception as e:  # the report is still useful without it
        print(f"(could not read the router's calibration snapshot: {e})", file=sys.stderr)
        table = []
    files = {
        "report.json": os.path.join(args.out, "report.json"),
        "report.md": os.path.join(args.out, "report.md"),
        "estimate_error.png": os.path.join(args.out, "estimate_error.png"),
        "pools.png": os.path.join(args.out, "pools.png"),
        "requests.jsonl": os.path.join(args.out, "requests.jsonl"),
        "stack logs": workdir,
    }
    plot_estimate_error(results, files["estimate_error.png"], args.sample_rate)
    plot_pools(results, files["pools.png"], b_short, cfg.short.name)
    report = {
        "config": {
            "source": source, "pools": args.pools, "vllm_version": _vllm_version(args.pools),
            "requests": args.requests, "concurrency": args.concurrency, "seed": args.seed,
            "time_scale": args.time_scale, "sample_rate": args.sample_rate,
            "default_sample_rate": D.SAMPLE_RATE, "b_short": b_short,
            "short_max_model_len": cfg.short.max_model_len, "long_max_model_len": cfg.long.max_model_len,
        },
        "wall_seconds": round(wall, 2),
        "analysis": analysis,
        "latency": latency,
        "calibration": table,
        "files": files,
    }
    with open(files["report.json"], "w") as f:
        json.dump(report, f, indent=2)
    with open(files["requests.jsonl"], "w") as f:
        for r in results:
            f.write(json.dumps({**asdict(r), "true_budget": r.true_budget, "rel_error": r.rel_error}) + "\n")
    text = format_report(report)
    with open(files["report.md"], "w") as f:
        f.write(text)
    print()
    print(text)
    if analysis["ok"] == 0:
        print("budget-router demo: no request succeeded", file=sys.stderr)
        return 3
    if analysis["errors"]["unexpected"]:
        print(f"budget-router demo: {len(analysis['errors']['unexpected'])} unexpected errors "
              f"(see {files['requests.jsonl']} and the logs in {workdir})", file=sys.stderr)
        return 3
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="start the stack, replay real-looking traffic through Envoy, report and plot",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML config (B_short, pools, ...); ports are free loopback "
                                                    "ports unless --port-base is given")
    p.add_argument("--port-base", type=int, metavar="PORT",
                   help="use loopback ports PORT, PORT+1, ...: Envoy, Envoy admin, one per pool, the router "
                        "workers, their admin planes, their Prometheus endpoints (default: any free ports)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", metavar="DIR_OR_FILE",
                     help="real prompt files (.jsonl with turns/prompt; .json lists with instruction/input, "
                          "conversations or messages) instead of the built-in mix")
    src.add_argument("--trace", metavar="FILE",
                     help="Azure LLM inference CSV or Mooncake JSONL: replay its arrival times and sizes")
    p.add_argument("--pools", choices=POOL_KINDS, default=POOLS_SIM,
                   help="sim: simulated vLLM pools (default, fast); vllm: two real vLLM CPU servers "
                        "(needs `make vllm-env`; B_short 2048, contexts 2048/8192, mix sizes /16)")
    p.add_argument("--requests", type=int, default=None,
                   help=f"number of requests (default {DEFAULT_REQUESTS}; {DEFAULT_REQUESTS_VLLM} with --pools vllm)")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help="requests in flight at most (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="traffic seed (default %(default)s)")
    p.add_argument("--rate", type=float, default=1.0,
                   help="with --trace: speed-up of the trace's arrival rate (default %(default)s = as recorded)")
    p.add_argument("--duration", type=float, default=None,
                   help="with --trace: replay at most this many seconds of (scaled) arrivals")
    p.add_argument("--out", default=DEFAULT_OUT, help="report and plots directory (default %(default)s)")
    p.add_argument("--time-scale", type=float, default=None,
                   help=f"simulated pools' wall seconds per GPU second (default {DEMO_TIME_SCALE}; "
                        "1.0 for --scenario burst)")
    p.add_argument("--scenario", choices=["mix", "burst"], default="mix",
                   help="mix: realistic traffic, accuracy and overhead report (default); burst: a burst of "
                        "short traffic saturates the short pool, static vs closed-loop routing (burst.png)")
    p.add_argument("--sample-rate", type=float, default=DEMO_SAMPLE_RATE,
                   help="router's [router] sample_rate for the demo (default %(default)s)")
    p.add_argument("--latency-pairs", type=int, default=LATENCY_PAIRS,
                   help="request pairs for the added-latency measurement, 0 to skip (default %(default)s)")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                   help="seconds the traffic phase may take before the rest is cancelled (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p

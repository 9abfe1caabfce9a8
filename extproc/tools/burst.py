"""``budget-router demo --scenario burst``: closed-loop routing against a burst.

The whole stack (Envoy, router, a short and a long simulated vLLM pool at
modelled speed) runs twice on the same traffic: a steady trickle of short
chats and long-context requests, and mid-run a burst of short chats that
the short pool (few sequences, as a small-context pool packed for
throughput would still hit) cannot absorb. Once with static routing
(``[spillover] enabled = false``), once closed-loop (spillover and the
adaptive threshold on). Each request streams; its time to first token is
measured at the client, per class (short: its budget fits B_short; long).
While it runs, the router's admin API is polled for the tiers' load as the
monitor saw it and the boundary in use, and the pools' own /metrics for
their TTFT histograms; the report shows spillover counts, the threshold's
path and per-class TTFT over time (``burst.png``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

import aiohttp

from .. import config as C
from .. import defaults as D
from ..admin import cli as admin_cli
from ..admin.v1 import admin_pb2 as pb
from ..core.load import parse_metrics

#: The scenario, in seconds of wall time: steady traffic for the whole run,
#: the burst in its middle third.
RUN_S = 30.0
BURST_START_S, BURST_END_S = 10.0, 20.0
#: Steady rates (req/s) of the short and long classes, and the burst's rate of
#: short chats: 6x the steady short rate, ~3x what the short pool drains.
SHORT_RATE, LONG_RATE, BURST_RATE = 1.0, 0.3, 6.0
#: Outputs of 48 tokens take ~1 s at the simulator's 50 tokens/s decode rate.
OUTPUT_TOKENS = 48
#: Prompt words: ~300 tokens (short class) and ~11K tokens (long class, above
#: the default B_short of 8192 so it always routes long).
SHORT_WORDS, LONG_WORDS = 300, 11_000
#: The short pool's max_num_seqs in the scenario: small, so that the burst
#: saturates it within seconds (vLLM's default 256 would need a burst of
#: hundreds of requests per second, more than this machine can send).
SHORT_SEQS = 4
#: How often the router's status and the pools' metrics are polled.
POLL_S = 0.5
#: Monitor interval in the scenario: the router's default.
MONITOR_INTERVAL_S = D.MONITOR_INTERVAL_S
#: The pools run at modelled speed (the simulator's GPU timing, unscaled).
BURST_TIME_SCALE = 1.0


@dataclass
class Shot:
    cls: str        # short | long (by budget)
    t: float        # sent, seconds from the run's start
    ttft: float     # seconds to the first streamed chunk (nan: failed)
    pool: str       # x-pool-name of the pool that answered
    reason: str


def schedule(seed: int = 0) -> list[tuple[float, str]]:
    """(send time, class) of every request: Poisson arrivals, deterministic per seed."""
    import random
    rng = random.Random(seed)
    out: list[tuple[float, str]] = []
    for cls, rate, start, end in (("short", SHORT_RATE, 0.0, RUN_S), ("long", LONG_RATE, 0.0, RUN_S),
                                  ("short", BURST_RATE, BURST_START_S, BURST_END_S)):
        t = start + rng.expovariate(rate)
        while t < end:
            out.append((t, cls))
            t += rng.expovariate(rate)
    return sorted(out)


def _body(cls: str) -> bytes:
    words = SHORT_WORDS if cls == "short" else LONG_WORDS
    return json.dumps({"model": "demo", "stream": True, "max_tokens": OUTPUT_TOKENS,
                       "messages": [{"role": "user", "content": "lorem " * words}]}).encode()


async def _send(session: aiohttp.ClientSession, url: str, cls: str, t0: float, header: str) -> Shot:
    sent = time.perf_counter()
    try:
        async with session.post(url + "/chat/completions", data=_body(cls),
                                headers={"Content-Type": "application/json"}) as r:
            first = None
            async for _ in r.content.iter_any():
                if first is None:
                    first = time.perf_counter()
            decision = dict(kv.split("=", 1) for kv in r.headers.get(header, "").split("; ") if "=" in kv)
            ok = r.status == 200 and first is not None
            return Shot(cls, sent - t0, (first - sent) if ok else float("nan"),
                        r.headers.get("x-pool-name", "?"), decision.get("reason", "?"))
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return Shot(cls, sent - t0, float("nan"), "?", "error")


async def _traffic(url: str, plan: list[tuple[float, str]], header: str) -> list[Shot]:
    timeout = aiohttp.ClientTimeout(total=RUN_S * 4)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        t0 = time.perf_counter()
        tasks = []
        for at, cls in plan:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            tasks.append(asyncio.create_task(_send(s, url, cls, t0, header)))
        return list(await asyncio.gather(*tasks))


def _poll(stack, stop: threading.Event, rows: list[dict]) -> None:
    """Every POLL_S: the tiers as the router sees them, and the pools' queues."""
    t0 = time.perf_counter()
    while not stop.is_set():
        row: dict = {"t": time.perf_counter() - t0}
        res = admin_cli.call_all(stack.cfg, "GetCalibration", pb.GetCalibrationRequest())
        cal = res[0][1] if res and isinstance(res[0][1], pb.Calibration) else None
        if cal is not None:
            row["limits"] = [t.budget_limit for t in cal.tiers[:-1]]
            row["seen"] = {t.name: {"waiting": t.waiting, "known": t.known, "saturated": t.saturated,
                                    "spilled_out": t.spilled_out} for t in cal.tiers}
        for tier in stack.cfg.tiers:
            try:
                with urllib.request.urlopen(stack.pool_url(tier.name) + "/metrics", timeout=2) as r:
                    s = parse_metrics(r.read().decode(), row["t"])
                if s is not None:
                    row.setdefault("pools", {})[tier.name] = {"running": s.running, "waiting": s.waiting}
            except OSError:
                pass
        rows.append(row)
        stop.wait(POLL_S)


def run_once(base: C.Config, closed_loop: bool, time_scale: float, seed: int, workdir: str,
             port_base: int | None = None) -> dict:
    from .stack import Stack, demo_config
    cfg = demo_config(base, port_base,
                          router={"state_file": os.path.join(workdir, "state.json"), "sample_rate": 0.05},
                          monitor={"interval_s": MONITOR_INTERVAL_S},
                          spillover={"enabled": closed_loop}, adaptive={"enabled": closed_loop})
    stack = Stack(cfg, workdir=workdir, time_scale=time_scale, pool_seqs={cfg.short.name: SHORT_SEQS})
    rows: list[dict] = []
    stop = threading.Event()
    stack.start()
    try:
        poller = threading.Thread(target=_poll, args=(stack, stop, rows), daemon=True)
        poller.start()
        shots = asyncio.run(_traffic(stack.url, schedule(seed), cfg.router.decision_header))
        stop.set()
        poller.join(10)
    finally:
        stop.set()
        stack.stop()
    return {"closed_loop": closed_loop, "shots": [s.__dict__ for s in shots], "polls": rows}


def _pct(values: list[float], q: float) -> float | None:
    v = sorted(x for x in values if x == x)
    if not v:
        return None
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def summarize(run: dict) -> dict:
    out: dict = {"closed_loop": run["closed_loop"]}
    for cls in ("short", "long"):
        for phase, lo, hi in (("burst", BURST_START_S, BURST_END_S + 5), ("all", 0, 1e9)):
            v = [s["ttft"] for s in run["shots"] if s["cls"] == cls and lo <= s["t"] < hi]
            out[f"{cls}_{phase}"] = {"n": len(v), "ttft_p50_s": _pct(v, 50), "ttft_p99_s": _pct(v, 99),
                                     "failed": sum(1 for x in v if x != x)}
    out["spilled"] = sum(1 for s in run["shots"] if s["reason"] == "spillover")
    out["pools"] = {}
    for s in run["shots"]:
        key = f"{s['cls']}->{s['pool']}"
        out["pools"][key] = out["pools"].get(key, 0) + 1
    limits = [r["limits"][0] for r in run["polls"] if r.get("limits")]
    out["b_short_path"] = {"min": min(limits), "max": max(limits), "last": limits[-1]} if limits else None
    return out


def plot(runs: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    colors = {False: "tab:red", True: "tab:green"}
    for run in runs:
        label = "closed loop" if run["closed_loop"] else "static"
        for ax, cls in zip(axes[:2], ("short", "long")):
            pts = [(s["t"], s["ttft"]) for s in run["shots"] if s["cls"] == cls and s["ttft"] == s["ttft"]]
            if pts:
                ax.plot(*zip(*pts), ".", ms=4, alpha=0.7, color=colors[run["closed_loop"]], label=label)
        short = [(r["t"], r["pools"]["short"]["waiting"]) for r in run["polls"] if "short" in r.get("pools", {})]
        if short:
            axes[2].plot(*zip(*short), "-", color=colors[run["closed_loop"]], label=f"short pool waiting ({label})")
        if run["closed_loop"]:
            lim = [(r["t"], r["limits"][0]) for r in run["polls"] if r.get("limits")]
            if lim:
                ax2 = axes[2].twinx()
                ax2.plot(*zip(*lim), "--", color="tab:blue", label="B_short in use (closed loop)")
                ax2.set_ylabel("B_short (tokens)")
                ax2.legend(loc="upper right")
    for ax, title in zip(axes, ("short-class TTFT (s)", "long-class TTFT (s)", "short pool waiting requests")):
        ax.axvspan(BURST_START_S, BURST_END_S, color="0.9")
        ax.set_ylabel(title)
        ax.legend(loc="upper left")
    axes[0].set_yscale("log")
    axes[2].set_xlabel("seconds since the start (grey: the burst)")
    fig.suptitle("Burst of short traffic: static routing vs closed-loop (spillover + adaptive threshold)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(summaries: list[dict]) -> str:
    lines = ["# Burst scenario: static vs closed-loop routing", "",
             f"Steady {SHORT_RATE:g} short + {LONG_RATE:g} long req/s for {RUN_S:g} s; a burst of "
             f"{BURST_RATE:g} short req/s from {BURST_START_S:g} to {BURST_END_S:g} s; short pool "
             f"max_num_seqs {SHORT_SEQS}. TTFT measured at the client (streamed first chunk).", "",
             "| routing | short TTFT p50 / p99 (burst) | long TTFT p50 / p99 (burst) | spilled | B_short min-max |",
             "|---|---|---|---|---|"]

    def f(x):
        return "-" if x is None else f"{x:.2f} s"
    for s in summaries:
        b = s["b_short_path"]
        path = "-" if not b else f"{b['min']}-{b['max']}"
        lines.append(f"| {'closed loop' if s['closed_loop'] else 'static'} | {f(s['short_burst']['ttft_p50_s'])} / "
                     f"{f(s['short_burst']['ttft_p99_s'])} | {f(s['long_burst']['ttft_p50_s'])} / "
                     f"{f(s['long_burst']['ttft_p99_s'])} | {s['spilled']} | {path} |")
    lines += ["", "Requests per (class -> pool that answered):"]
    for s in summaries:
        lines.append(f"- {'closed loop' if s['closed_loop'] else 'static'}: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(s["pools"].items())))
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    base = C.load_config(args)
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for closed in (False, True):
        workdir = tempfile.mkdtemp(prefix="budget-router-burst-")
        print(f"burst scenario, {'closed-loop' if closed else 'static'} routing ({RUN_S:g} s) ...", flush=True)
        try:
            scale = BURST_TIME_SCALE if args.time_scale is None else args.time_scale
            runs.append(run_once(base, closed, scale, args.seed, workdir, getattr(args, "port_base", None)))
        except RuntimeError as e:
            print(f"budget-router demo: the stack did not start: {e} (logs in {workdir})", file=sys.stderr)
            return 1
    summaries = [summarize(r) for r in runs]
    png = os.path.join(args.out, "burst.png")
    plot(runs, png)
    with open(os.path.join(args.out, "burst.json"), "w") as f:
        json.dump({"summaries": summaries, "runs": runs}, f, indent=1)
    text = format_report(summaries)
    with open(os.path.join(args.out, "burst.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {png}, {os.path.join(args.out, 'burst.json')}, {os.path.join(args.out, 'burst.md')}")
    return 0

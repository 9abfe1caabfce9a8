"""`budget-router plan` and `budget-router simulate` (thin shell: parse, run, print, write)."""
from __future__ import annotations

import argparse
import os
import sys

import orjson

from .fleet import BALANCERS, ROUTERS, FleetSpec, PoolSpec, simulate
from .hardware import GPUS, MODELS, ConfigError, make_config
from .metrics import summarize
from .plan import (SEARCH_WINDOW_S, SEQS_CANDIDATES, SLO_PREEMPT_PER_1K, SLO_TTFT_P99_MS, AUTO_B_SHORT,
                   plan)
from .traces import TraceError, load_trace, scale_rate, tile, window


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="Azure CSV, Mooncake JSONL, replay JSONL or generic CSV/JSONL")
    p.add_argument("--format", default="auto", choices=["auto", "azure", "mooncake", "replay"])
    p.add_argument("--columns", help="generic file mapping: time=COL,prompt=COL,output=COL[,time_unit=s|ms|datetime]")
    p.add_argument("--rate", type=float, help="scale arrivals to this mean req/s (replay: Poisson rate)")
    p.add_argument("--duration", type=float, help="tile the trace to this many seconds (after --rate)")
    p.add_argument("--window", help="START:LEN seconds of the (scaled) trace to keep")
    p.add_argument("--gpu", default="a100", choices=sorted(GPUS))
    p.add_argument("--model", default="llama-3-70b", choices=sorted(MODELS))
    p.add_argument("--tp", type=int, help="tensor-parallel degree (default per GPU/model)")
    p.add_argument("--router", default="oracle", choices=ROUTERS,
                   help="oracle: true budget; noise: lognormal estimate error; estimator: replay 'pool' field")
    p.add_argument("--noise-p90", type=float, default=0.10, help="noise router: p90 relative error")
    p.add_argument("--price-per-gpu-hour", type=float, help="USD per GPU-hour (default per GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for JSON (and PNG plots for plan)")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")


def _load(args):
    tr = load_trace(args.trace, args.format, rate=args.rate, seed=args.seed, columns=args.columns)
    if tr.report and tr.report.bad:
        print(tr.report.summary(), file=sys.stderr)
    if args.rate and tr.est_budget is None:
        tr = scale_rate(tr, args.rate)
    if args.duration:
        tr = tile(tr, args.duration)
    if args.window:
        a, b = (float(x) for x in args.window.split(":"))
        tr = window(tr, a, b)
    return tr


def _fmt(v, d=0):
    return "-" if v is None or v != v else f"{v:,.{d}f}"


def _row(label, gpus, s):
    f = s["fleet"]
    return (f"{label:<22}{gpus:>7}{_fmt(f['ttft_p50_ms']):>10}{_fmt(f['ttft_p99_ms']):>11}"
            f"{_fmt(f['tpot_p50_ms']):>9}{_fmt(f['preemptions_per_1k'], 2):>11}{f['rejected']:>8}"
            f"{_fmt(f['usd_per_year'] / 1e6, 2):>10}")


HEADER = (f"{'fleet':<22}{'GPUs':>7}{'TTFT p50':>10}{'TTFT p99':>11}{'TPOT p50':>9}"
          f"{'preempt/1k':>11}{'reject':>8}{'M$/year':>10}")


def _write(out: str | None, name: str, obj) -> None:
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "wb") as f:
        f.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY,
                             default=lambda o: float(o) if hasattr(o, "__float__") else str(o)))


def cmd_plan(args) -> int:
    try:
        tr = _load(args)
        if args.b_short == "auto":
            bs = None
        else:
            bs = [int(x) for x in args.b_short.split(",") if x.strip()]
        seqs = tuple(x if x == "safe" else int(x) for x in args.max_num_seqs.split(","))
        res = plan(tr, args.gpu, args.model, args.slo_ttft_p99_ms, args.slo_preempt_per_1k, bs,
                   args.long_max_model_len, args.router, args.tp, seqs, args.search_window,
                   args.seed, not args.no_progress, noise_p90=args.noise_p90,
                   price=args.price_per_gpu_hour)
    except (TraceError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trace {res['trace']}: {res['requests']:,} requests over {res['duration_s']:.0f} s "
          f"({res['rate_rps']:.1f} req/s); {res['model']} TP{res['tp']} on {res['gpu']}; "
          f"SLO P99 TTFT <= {args.slo_ttft_p99_ms:.0f} ms, preemptions <= {args.slo_preempt_per_1k}/1k")
    print(HEADER)
    h = res["homogeneous"]
    print(_row(f"homog. len={h['pool']['max_model_len']}", h["gpus"], h["summary"]))
    for r in res["dual"]:
        if "error" in r:
            print(f"B_short={r['b_short']}: {r['error']}")
            continue
        print(_row(f"dual B_short={r['b_short']}", r["gpus"], r["summary"]))
    print()
    print(f"{'B_short':>8}{'alpha':>7}{'rho':>7}{'closed form':>13}{'simulated':>11}  pools")
    for r in res["dual"]:
        if "error" in r:
            continue
        pools = ", ".join(f"{p['name']} {p['count']}x(seqs {p['max_num_seqs']})" for p in r["pools"])
        print(f"{r['b_short']:>8}{r['alpha']:>7.3f}{r['rho']:>7.2f}{r['closed_form_savings']:>13.1%}"
              f"{r['savings']:>11.1%}  {pools}{'' if r['feasible'] else '  (SLO infeasible)'}")
    print(f"\nrecommendation: {res['recommendation']['reason']}")
    if args.out:
        _write(args.out, "plan.json", res)
        from .plots import plot_plan
        for p in plot_plan(res, tr.total, args.out):
            print(f"wrote {p}")
        print(f"wrote {os.path.join(args.out, 'plan.json')}")
    return 0


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} = {text!r}: expected comma-separated integers") from None


def _tiers_spec(args, long_cfg) -> FleetSpec:
    """``--tiers 8192,32768,131072``: one pool per tier, each configured for
    its context (the last for the last value), the first values as the
    budget limits; ``--counts`` instances per tier."""
    lens = _ints(args.tiers, "--tiers")
    counts = _ints(args.counts, "--counts") if args.counts else [args.short] * (len(lens) - 1) + [args.long]
    if len(lens) < 2 or len(counts) != len(lens):
        raise ValueError(f"--tiers needs 2+ context lengths and --counts one count per tier "
                         f"(got {len(lens)} and {len(counts)})")
    names = ["short", *(f"tier{i}" for i in range(1, len(lens) - 1)), "long"]
    pools = tuple(PoolSpec(n, long_cfg.with_(max_model_len=m, max_num_seqs=args.short_max_num_seqs).validate()
                           if i < len(lens) - 1 else long_cfg.with_(max_model_len=m).validate(), c)
                  for i, (n, m, c) in enumerate(zip(names, lens, counts)))
    return FleetSpec(pools, b_short=lens[0], router=args.router, noise_p90=args.noise_p90,
                     spillover=args.spillover, balancer=args.balancer, adaptive=args.adaptive,
                     limits=tuple(lens[:-1]))


def cmd_simulate(args) -> int:
    try:
        tr = _load(args)
        kw = {}
        if args.max_num_batched_tokens:
            kw["max_num_batched_tokens"] = args.max_num_batched_tokens
        long_cfg = make_config(args.gpu, args.model, args.long_max_model_len, args.tp,
                               max_num_seqs=args.long_max_num_seqs, **kw)
        if args.price_per_gpu_hour is not None:
            from dataclasses import replace
            long_cfg = long_cfg.with_(gpu=replace(long_cfg.gpu, price_per_hour=args.price_per_gpu_hour))
        if args.tiers:
            spec = _tiers_spec(args, long_cfg)
        elif args.b_short:
            short_cfg = long_cfg.with_(max_model_len=args.b_short, max_num_seqs=args.short_max_num_seqs)
            spec = FleetSpec((PoolSpec("short", short_cfg.validate(), args.short),
                              PoolSpec("long", long_cfg.validate(), args.long)),
                             b_short=args.b_short, router=args.router, noise_p90=args.noise_p90,
                             spillover=args.spillover, balancer=args.balancer, adaptive=args.adaptive)
        else:
            spec = FleetSpec((PoolSpec("all", long_cfg.validate(), args.instances),),
                             balancer=args.balancer)
        r = simulate(tr, spec, seed=args.seed, progress=not args.no_progress)
    except (TraceError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = summarize(r)
    print(f"{spec.describe()}\n{len(tr):,} requests, {s['duration_s']:.0f} s, simulated in "
          f"{r.wall_s:.2f} s ({s['sim_req_per_s']:,.0f} req/s)")
    print(HEADER)
    print(_row("fleet", spec.gpus, s))
    for name, m in s["pools"].items():
        print(_row(f"  pool {name}", m["gpus"], {"fleet": m}))
    f = s["fleet"]
    print(f"KV utilisation {f['kv_util']:.1%} (busy {f['kv_util_busy']:.1%}), GPU busy {f['gpu_busy']:.1%}, "
          f"spilled {s['spilled']}, GPU-hours {f['gpu_hours']:.2f}")
    if r.loop is not None and spec.adaptive:
        path = [lim for _, lim in r.loop.limits_path]
        print(f"adaptive tier limits: {list(spec.tier_limits)} at the start, {list(path[-1]) if path else '-'} "
              f"at the end, {sum(r.loop.router.threshold.moves)} moves")
    _write(args.out, "simulate.json", s)
    return 0


def add_parsers(subparsers) -> None:
    """Register `plan` and `simulate` on the project CLI's subparsers."""
    p = subparsers.add_parser("plan", help="size homogeneous vs short/long pools for a trace and SLO",
                              description="Find the smallest fleet meeting the SLO: one pool configured "
                                          "for the worst-case context vs two pools per B_short.")
    _common(p)
    p.add_argument("--slo-ttft-p99-ms", type=float, default=SLO_TTFT_P99_MS)
    p.add_argument("--slo-preempt-per-1k", type=float, default=SLO_PREEMPT_PER_1K)
    p.add_argument("--b-short", default="auto", help=f"auto ({','.join(map(str, AUTO_B_SHORT))}) or N,N,...")
    p.add_argument("--long-max-model-len", type=int, help="long/homogeneous max_model_len (default: model context)")
    p.add_argument("--max-num-seqs", default=",".join(map(str, SEQS_CANDIDATES)),
                   help="candidates per pool, e.g. 256,64,safe (safe = never preempts)")
    p.add_argument("--search-window", type=float, default=SEARCH_WINDOW_S)
    p.set_defaults(func=cmd_plan)

    s = subparsers.add_parser("simulate", help="simulate one fleet configuration on a trace")
    _common(s)
    s.add_argument("--b-short", type=int, help="split at this budget (omit: one homogeneous pool)")
    s.add_argument("--instances", type=int, default=8, help="homogeneous pool size")
    s.add_argument("--short", type=int, default=4, help="short pool size")
    s.add_argument("--long", type=int, default=4, help="long pool size")
    s.add_argument("--long-max-model-len", type=int)
    s.add_argument("--short-max-num-seqs", type=int, default=256)
    s.add_argument("--long-max-num-seqs", type=int, default=256)
    s.add_argument("--max-num-batched-tokens", type=int)
    s.add_argument("--tiers", help="N context tiers, e.g. 8192,32768,131072: the first N-1 are the budget "
                                   "limits and max_model_lens, the last the last tier's max_model_len")
    s.add_argument("--counts", help="instances per tier with --tiers, e.g. 4,2,2 (default: --short ... --long)")
    s.add_argument("--spillover", action="store_true",
                   help="the router's spillover: a request whose tier is saturated goes up (core.spillover)")
    s.add_argument("--adaptive", action="store_true",
                   help="the router's adaptive tier boundaries (core.threshold)")
    s.add_argument("--balancer", default="least-work", choices=BALANCERS)
    s.set_defaults(func=cmd_simulate)


def main(argv=None) -> int:  # standalone: python -m extproc.planner.cli plan ...
    ap = argparse.ArgumentParser(prog="budget-router")
    add_parsers(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

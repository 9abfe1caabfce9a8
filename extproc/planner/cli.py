"""`budget-router plan` and `budget-router simulate` (thin shell: parse, run, print, write)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from .report.plan_json import balancer_view, matrix_json, plan_json, write_json
from .report.text import print_plan, print_simulate
from .sim.balancers import BALANCERS, DEFAULT_BALANCER, REALISTIC_BALANCERS
from .sim.fleet import ROUTERS, FleetSpec, PoolSpec, simulate
from .sim.hardware import GPUS, MODELS, ConfigError, make_config
from .sim.metrics import summarize
from .sim.traces import TraceError, cover, load_trace, scale_rate, tile, window
from .sizing.plan import SEARCH_WINDOW_S, SEEDS, plan
from .sizing.slo import (CLASS_BOUNDARY, SLO, SLO_PREEMPT_PER_1K, SLO_TPOT_P99_MS, SLO_TTFT_P99_MS,
                         parse_classes)
from .sizing.horizon import VERIFY_HORIZON_S, horizons
from .sizing.steady import p99_horizon_s
from .sizing.space import AUTO_B_SHORT, SEARCH_MBTS, SEARCH_SEQS, Space, parse_baseline, tier_names


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="Azure CSV, Mooncake JSONL, replay JSONL or generic CSV/JSONL")
    p.add_argument("--format", default="auto", choices=["auto", "azure", "mooncake", "replay"])
    p.add_argument("--columns", help="generic file mapping: time=COL,prompt=COL,output=COL[,time_unit=s|ms|datetime]")
    p.add_argument("--rate", type=float, help="scale arrivals to this mean req/s (replay: Poisson rate)")
    p.add_argument("--duration", type=float, help="tile the trace to this many seconds (after --rate)")
    p.add_argument("--window", help="START:LEN seconds of the (scaled) trace to keep")
    p.add_argument("--gpu", default="a100", choices=sorted(GPUS), help="GPU (plan: the baseline's)")
    p.add_argument("--model", default="llama-3-70b", choices=sorted(MODELS))
    p.add_argument("--tp", type=int, help="tensor-parallel degree (default per GPU/model)")
    p.add_argument("--router", default="oracle", choices=ROUTERS,
                   help="oracle: true budget; noise: lognormal estimate error; estimator: replay 'pool' field")
    p.add_argument("--noise-p90", type=float, default=0.10, help="noise router: p90 relative error")
    p.add_argument("--price-per-gpu-hour", type=float, help="USD per GPU-hour (default per GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for JSON (and PNG plots for plan)")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    p.add_argument("--p99-horizon", type=float,
                   help="tile a shorter trace to this many seconds, with a notice (default: what a P99 needs, "
                        "max(10 min, 20 x the largest TTFT target); 0: off; --duration wins)")


def _horizon(args, tr, ttft_ms) -> tuple:
    """(trace, notice): `tr` tiled to the P99 horizon (issue 16 item 3) unless
    --duration set the length or --p99-horizon 0 turns it off."""
    if args.duration:
        return tr, None
    h = p99_horizon_s(ttft_ms.values()) if args.p99_horizon is None else args.p99_horizon
    tr, note = cover(tr, h) if h > 0 else (tr, None)
    if note:
        print(note, file=sys.stderr)
    return tr, note


def _load(args, whole: bool = False):
    """The trace as the options shape it; ``whole``: (it before --window, it)."""
    tr = load_trace(args.trace, args.format, rate=args.rate, seed=args.seed, columns=args.columns)
    if tr.report and tr.report.bad:
        print(tr.report.summary(), file=sys.stderr)
    if args.rate and tr.est_budget is None:
        tr = scale_rate(tr, args.rate)
    if args.duration:
        tr = tile(tr, args.duration)
    full = tr
    if args.window:
        a, b = (float(x) for x in args.window.split(":"))
        tr = window(tr, a, b)
    return (full, tr) if whole else tr


def cmd_plan(args) -> int:
    try:
        full, tr = _load(args, whole=True)
        bs = None if args.b_short == "auto" else [int(x) for x in args.b_short.split(",") if x.strip()]
        baseline = parse_baseline(args.baseline, gpu=args.gpu)
        if args.tp and baseline.tp is None:
            baseline = replace(baseline, tp=args.tp)
        if args.long_max_model_len and baseline.max_model_len is None:
            baseline = replace(baseline, max_model_len=args.long_max_model_len)
        slo = SLO(parse_classes(args.slo_ttft_p99_ms, SLO_TTFT_P99_MS),
                  parse_classes(args.slo_tpot_p99_ms, SLO_TPOT_P99_MS),
                  args.slo_preempt_per_1k, args.class_boundary)
        space = Space(tuple(x for x in args.search_gpus.split(",") if x) if args.search_gpus else (),
                      _ints(args.search_tp) if args.search_tp else (None,),
                      _ints(args.max_num_seqs), _ints(args.max_num_batched_tokens))
        for g in space.gpus:
            if g not in GPUS:
                raise ConfigError(f"--search-gpus {g!r}: known {', '.join(GPUS)}")
        tr, _ = _horizon(args, tr, slo.ttft_ms)
        extra = horizons(full, tr, args.verify_horizon)
        if extra and not args.no_progress:
            print("final check: the cheapest designs must also hold on "
                  + " and ".join(f"the {h.role} trace ({len(h.trace):,} requests, {h.trace.duration:.0f} s)"
                                 for h in extra),
                  file=sys.stderr)
        bals = REALISTIC_BALANCERS if args.balancer == "realistic" else (args.balancer,)
        runs = [plan_json(plan(tr, args.model, baseline, slo, bs, space, args.router, b, args.seeds,
                               args.search_window, args.workers, args.noise_p90, args.price_per_gpu_hour,
                               not args.no_progress, tiers=_ints(args.tiers, "--tiers") if args.tiers else None,
                               spillover=args.spillover, adaptive=args.adaptive, horizon=extra)) for b in bals]
        res = matrix_json(runs) if len(runs) > 1 else runs[0]
        res["slo_realism"] = _slo_realism(args, tr, res, baseline, slo, space)
    except (TraceError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_plan(res)
    if args.out:
        write_json(args.out, "plan.json", res)
        from .report.plots import plot_plan
        for p in plot_plan(res, args.out):
            print(f"wrote {p}")
        print(f"wrote {os.path.join(args.out, 'plan.json')}")
    if args.emit:
        from .report.emit import emit
        for p in emit(res, args.emit):
            print(f"wrote {p}")
    return 0


def _ints(text: str, what: str = "value") -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what} = {text!r}: expected comma-separated integers") from None


def _tiers_spec(args, long_cfg) -> FleetSpec:
    """``--tiers 8192,32768,131072``: one pool per tier, each configured for
    its context (the last for the last value), the first values as the
    budget limits; ``--counts`` instances per tier."""
    lens = _ints(args.tiers, "--tiers")
    counts = _ints(args.counts, "--counts") if args.counts else (args.short,) * (len(lens) - 1) + (args.long,)
    if len(lens) < 2 or len(counts) != len(lens):
        raise ValueError(f"--tiers needs 2+ context lengths and --counts one count per tier "
                         f"(got {len(lens)} and {len(counts)})")
    names = tier_names(len(lens))
    pools = tuple(PoolSpec(n, long_cfg.with_(max_model_len=m, max_num_seqs=args.short_max_num_seqs).validate()
                           if i < len(lens) - 1 else long_cfg.with_(max_model_len=m).validate(), c)
                  for i, (n, m, c) in enumerate(zip(names, lens, counts)))
    return FleetSpec(pools, b_short=lens[0], router=args.router, noise_p90=args.noise_p90,
                     spillover=args.spillover, balancer=args.balancer, adaptive=args.adaptive,
                     limits=tuple(lens[:-1]))


def cmd_simulate_deployment(args) -> int:
    """`simulate --deployment`: the emitted plan on this trace and horizon; simulate.json."""
    from .simulate import load_deployment, simulate_deployment, targets
    try:
        dep = load_deployment(args.deployment)
        tr = _load(args)
        tt = parse_classes(args.slo_ttft_p99_ms, {}) if args.slo_ttft_p99_ms else None
        tp = parse_classes(args.slo_tpot_p99_ms, {}) if args.slo_tpot_p99_ms else None
        tr, note = _horizon(args, tr, {c: t for c, (t, _) in targets(dep, tt, tp).items()})
        res, spec, r = simulate_deployment(dep, tr, args.seed, tt, tp,
                                           router=args.router if args.router != "oracle" else None,
                                           balancer=args.balancer, notice=note, progress=not args.no_progress)
    except (TraceError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_simulate(spec, tr, r, res["summary"])
    for c, m in res["classes"].items():
        print(f"class {c}: TTFT P99 {m['ttft_p99_ms']:.0f} / {m['ttft_slo_ms']:.0f} ms, TPOT P99 "
              f"{m['tpot_p99_ms']:.1f} / {m['tpot_slo_ms']:.0f} ms: {'meets' if m['meets'] else 'MISSES'}")
    for n, p in res["steady"]["pools"].items():
        print(f"pool {n}: utilization {p['utilization']:.2f} (max {res['steady']['max_utilization']}), mean wait "
              f"{p['wait_first_s']:.2f} s -> {p['wait_last_s']:.2f} s: "
              f"{'steady' if p['ok'] else 'NOT STEADY (over capacity or queue grows)'}")
    print(f"deployment {res['deployment']}: {'meets' if res['meets'] else 'does NOT meet'} on {tr.name}")
    write_json(args.out or os.path.dirname(os.path.abspath(args.deployment)), "simulate.json", res)
    return 0


def cmd_simulate(args) -> int:
    if args.deployment:
        return cmd_simulate_deployment(args)
    args.balancer = args.balancer or DEFAULT_BALANCER
    try:
        tr = _load(args)
        kw = {}
        if args.max_num_batched_tokens:
            kw["max_num_batched_tokens"] = args.max_num_batched_tokens
        long_cfg = make_config(args.gpu, args.model, args.long_max_model_len, args.tp,
                               max_num_seqs=args.long_max_num_seqs, **kw)
        if args.price_per_gpu_hour is not None:
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
    print_simulate(spec, tr, r, s)
    write_json(args.out, "simulate.json", s)
    return 0


def _closed_loop_args(p: argparse.ArgumentParser, tiers_note: str) -> None:
    """--tiers / --spillover / --adaptive, shared by simulate and plan."""
    p.add_argument("--tiers", help="N context tiers, e.g. 8192,32768,131072: the first N-1 are the budget "
                                   "limits and max_model_lens, the last the last tier's max_model_len" + tiers_note)
    p.add_argument("--spillover", action="store_true",
                   help="the router's spillover: a request whose tier is saturated goes up (core.spillover)"
                        + (" (plan: each split design again, sized with it on)" if tiers_note else ""))
    p.add_argument("--adaptive", action="store_true",
                   help="the router's adaptive tier boundaries (core.threshold)"
                        + (" (plan: each split design again, sized with it on)" if tiers_note else ""))


def _slo_realism(args, tr, res, baseline, slo, space) -> dict:
    """plan.json's `slo_realism` (sizing/slo_sweep.py); with --slo-sweep the
    bounded re-plans (targets x2, short-TTFT sweep, identical-config split)."""
    from .sizing.slo_sweep import realism
    # under --balancer realistic the re-plans use the recommended design's
    # balancer (the default one when nothing meets) and are compared with that
    # balancer's own designs only
    bal = res["recommendation"].get("balancer") or (DEFAULT_BALANCER if args.balancer == "realistic"
                                                    else args.balancer)

    def replan(slo, b_shorts, pinned=False):
        sp = (Space((baseline.gpu,), (baseline.tp,), (baseline.max_num_seqs,), (baseline.max_num_batched_tokens,))
              if pinned else space)
        return plan_json(plan(tr, args.model, baseline, slo, b_shorts, sp, args.router, bal, args.seeds,
                              args.search_window, args.workers, args.noise_p90, args.price_per_gpu_hour, False,
                              verify=False))
    log = None if args.no_progress else (lambda m: print(m, file=sys.stderr, flush=True))
    return realism(balancer_view(res, bal), slo, replan,
                   sweep=args.slo_sweep, log=log)


def add_parsers(subparsers) -> None:
    """Register `plan` and `simulate` on the project CLI's subparsers."""
    p = subparsers.add_parser("plan", help="cost of one pool vs short/long pools at equal per-class SLOs",
                              description="For the operator's baseline, the best single pool and a split per "
                                          "B_short: the cheapest fleet meeting the same per-class SLOs.")
    _common(p)
    p.add_argument("--baseline", help="the fleet run today: 'gpu=a100,tp=4,max_num_seqs=256,"
                   "max_num_batched_tokens=8192,gpu_memory_utilization=0.9[,max_model_len=N][,instances=N]' "
                   "or a TOML file; without instances it is sized")
    p.add_argument("--slo-ttft-p99-ms", help="per class, e.g. short=2000,long=60000 (default "
                   + ",".join(f"{k}={v:g}" for k, v in SLO_TTFT_P99_MS.items()) + ")")
    p.add_argument("--slo-tpot-p99-ms", help="per class, e.g. short=100,long=200 (default "
                   + ",".join(f"{k}={v:g}" for k, v in SLO_TPOT_P99_MS.items()) + ")")
    p.add_argument("--slo-preempt-per-1k", type=float, default=SLO_PREEMPT_PER_1K)
    p.add_argument("--class-boundary", type=int, default=CLASS_BOUNDARY,
                   help="true budget (tokens) separating the short and long classes, fixed for the run")
    p.add_argument("--b-short", default="auto", help=f"auto ({','.join(map(str, AUTO_B_SHORT))}) or N,N,...")
    p.add_argument("--long-max-model-len", type=int, help="baseline/long max_model_len (default: model context)")
    p.add_argument("--search-gpus", help="GPU types searched per pool (default: the baseline's)")
    p.add_argument("--search-tp", help="TP degrees searched, e.g. 2,4 (default: the model's default per GPU)")
    p.add_argument("--max-num-seqs", default=",".join(map(str, SEARCH_SEQS)), help="candidates per pool")
    p.add_argument("--max-num-batched-tokens", default=",".join(map(str, SEARCH_MBTS)),
                   help="candidates per pool")
    p.add_argument("--balancer", default=DEFAULT_BALANCER, choices=(*BALANCERS, "realistic"),
                   help="in-pool balancer; 'realistic': size every design under each of "
                        f"{', '.join(REALISTIC_BALANCERS)} and judge against the best single pool of all")
    p.add_argument("--seeds", type=int, default=SEEDS, help="seeds per design (arrival jitter, sampling)")
    p.add_argument("--workers", type=int, help="processes (default: every core)")
    p.add_argument("--search-window", type=float, default=SEARCH_WINDOW_S)
    p.add_argument("--verify-horizon", type=float, default=VERIFY_HORIZON_S, metavar="S",
                   help="final check: the cheapest designs of each kind must also meet on the whole trace "
                        "(before --window) and on it tiled to S seconds, grown until they do "
                        f"(default {VERIFY_HORIZON_S:.0f}; 0: off)")
    p.add_argument("--slo-sweep", action="store_true",
                   help="re-size the best split at targets x2, at a few short TTFT targets and with both pools "
                        "on the baseline's config (isolation vs configuration); one bounded plan per point")
    p.add_argument("--emit", help="directory for the deployable plan: router TOML, vLLM args, Envoy config")
    _closed_loop_args(p, " (plan: one more design, each tier's pool sized)")
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
    _closed_loop_args(s, "")
    s.add_argument("--counts", help="instances per tier with --tiers, e.g. 4,2,2 (default: --short ... --long)")
    s.add_argument("--balancer", choices=BALANCERS,
                   help=f"in-pool balancer (default {DEFAULT_BALANCER}; with --deployment: the deployment's)")
    s.add_argument("--deployment", help="re-simulate `plan --emit`'s DIR/deployment.json (its pools, limits, "
                                        "balancer and class targets); writes simulate.json to --out or DIR")
    s.add_argument("--slo-ttft-p99-ms", help="with --deployment: override its TTFT targets, e.g. short=2000")
    s.add_argument("--slo-tpot-p99-ms", help="with --deployment: override its TPOT targets, e.g. short=100")
    s.set_defaults(func=cmd_simulate)


def main(argv=None) -> int:  # standalone: python -m extproc.planner.cli plan ...
    ap = argparse.ArgumentParser(prog="budget-router")
    add_parsers(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

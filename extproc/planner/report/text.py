"""The plan and a simulation as text (what `budget-router plan|simulate` print)."""
from __future__ import annotations

from ..sim.fleet import FleetSpec, SimResult
from ..sim.traces import Trace
from ..sizing.slo import TIGHT_IDLE_RATIO


def _fmt(v, d=0):
    return "-" if v is None or v != v else f"{v:,.{d}f}"


def _row(label, gpus, s):
    f = s["fleet"]
    return (f"{label:<22}{gpus:>7}{_fmt(f['ttft_p50_ms']):>10}{_fmt(f['ttft_p99_ms']):>11}"
            f"{_fmt(f['tpot_p50_ms']):>9}{_fmt(f['preemptions_per_1k'], 2):>11}{f['rejected']:>8}"
            f"{_fmt(f['usd_per_year'] / 1e6, 2):>10}")


HEADER = (f"{'fleet':<22}{'GPUs':>7}{'TTFT p50':>10}{'TTFT p99':>11}{'TPOT p50':>9}"
          f"{'preempt/1k':>11}{'reject':>8}{'M$/year':>10}")


def print_plan(res: dict) -> None:
    slo = res["slo"]
    print(f"trace {res['trace']}: {res['requests']:,} requests over {res['duration_s']:.0f} s "
          f"({res['rate_rps']:.1f} req/s); {res['model']}; router {res['router']}, balancer "
          f"{res['balancer']}; {len(res['seeds'])} seeds (a design meets only if it meets on every seed)")
    tg = slo["targets"]
    print(f"per-class SLO (class boundary {slo['class_boundary']} tokens, same for every design): "
          + "; ".join(f"{c} ({t['requests']:,} req) P99 TTFT <= {t['ttft_slo_ms']:.0f} ms, TPOT <= "
                      f"{t['tpot_slo_ms']:.0f} ms" for c, t in tg.items())
          + f"; preemptions <= {slo['preempt_per_1k']:g}/1K")
    for c, t in tg.items():
        if t["infeasible"]:
            print(f"  INFEASIBLE: class {c} on an idle baseline instance has P99 TTFT "
                  f"{t['idle_ttft_p99_ms']:,.0f} ms, TPOT {t['idle_tpot_p99_ms']:.1f} ms; every design is "
                  f"held to {t['ttft_target_ms']:,.0f} / {t['tpot_target_ms']:.1f} ms instead")
    cls = list(tg)
    matrix = bool(res.get("balancer_matrix"))  # every design once per balancer: say which
    head = f"{'design':<18}" + (f"{'balancer':<15}" if matrix else "") + f"{'GPUs':>7}{'$/h':>9}{'spread':>7}"
    for c in cls:
        head += f"{c + ' TTFT99':>14}{c + ' TPOT99':>13}"
    head += f"{'pre/1K':>8}{'rej':>6}{'busy':>6}  meets"
    print(head)
    for d in res["designs"]:
        row = (f"{d['name']:<18}" + (f"{d.get('balancer', ''):<15}" if matrix else "")
               + f"{d['gpus']:>7}{_fmt(d['usd_per_hour'], 0):>9}{d['seed_spread_gpus']:>7}")
        for c in cls:
            m = d["classes"][c]
            row += f"{_fmt(m['ttft_p99_ms']):>14}{_fmt(m['tpot_p99_ms'], 1):>13}"
        row += (f"{_fmt(d['preempt_per_1k'], 2):>8}{d['rejected']:>6}{d['gpu_busy']:>6.0%}  "
                f"{'yes' if d['meets'] else ('effective' if d['meets_effective'] else 'NO')}")
        print(row)
    for d in res["designs"]:
        if d["prefix_hit_rate"] > 0:
            print(f"  {d['name']}" + (f" [{d.get('balancer')}]" if matrix else "")
                  + f": prefix cache hit rate {d['prefix_hit_rate']:.1%} of prompt blocks")
    for d in res["designs"]:
        print(f"  {d['name']}" + (f" [{d.get('balancer')}]" if matrix else "") + f": {d['what']}"
              + (f"; alpha {d['alpha']:.3f} rho {d['rho']:.2f} closed form {d['closed_form_savings']:.1%}"
                 if d["kind"] == "split" and d["rho"] == d["rho"] else ""))
    print_horizon(res)
    print_matrix(res)
    r = res["recommendation"]
    sv = r["savings_vs_baseline"]
    b = r.get("best_single_pool")
    if b is not None and r.get("saving_vs_best_single_pool") is not None:
        print(f"best single pool: {b['design']} under {b['balancer']}, {b['gpus']} GPUs; recommended design "
              f"saves {r['saving_vs_best_single_pool']:.1%} against it")
    print(f"\nrecommendation: {r['design']}"
          + (f" ({sv:+.1%} vs baseline)" if sv is not None else "") + f": {r['why']}")
    if "slo_realism" in res:
        print_slo_realism(res)


def _pct_or_dash(v) -> str:
    return "-" if v is None or v != v else f"{v:+.1%}"


def _verdict_row(label: str, v: dict) -> str:
    sp, sg = v["best_split"], v["best_single"]
    return (f"  {label:<28}{v['baseline_gpus']:>9}{(sg['gpus'] if sg else '-'):>8}"
            f"{(sp['gpus'] if sp else '-'):>8}{_pct_or_dash(v['saving_vs_baseline']):>10}"
            f"{_pct_or_dash(v['saving_vs_best_single']):>10}")


def print_slo_realism(res: dict) -> None:
    """SLO realism (issue 16 item 5): idle slack per class, TPOT/ITL, what kind
    of saving it is, and with --slo-sweep how it moves with the targets."""
    x = res["slo_realism"]
    print("\nSLO realism: what an idle instance of the baseline needs per class (cost model) and the slack left")
    for c, t in x["idle_slack"].items():
        print(f"  {c:<6} idle P99 TTFT {t['idle_ttft_p99_ms']:>9,.0f} ms: target = {t['idle_ttft_ratio']:.2f}x idle "
              f"({t['idle_ttft_slack_ms']:+,.0f} ms); idle TPOT {t['idle_tpot_p99_ms']:.1f} ms: "
              f"{t['idle_tpot_ratio']:.2f}x" + (f"   TIGHT: under {TIGHT_IDLE_RATIO:g}x idle, the target sets the size"
                                               if t["tight"]
                                               else ""))
    print("  TPOT as `vllm bench serve` computes it: requests with >= 2 output tokens, (e2e - TTFT)/(tokens - 1); "
          "ITL P99 over every token gap: "
          + "; ".join(f"{d['name']}" + (f" [{d.get('balancer')}]" if res.get("balancer_matrix") else "")
                      + f" {_fmt(d['summary']['fleet'].get('itl_p99_ms'), 1)} ms" for d in res["designs"]))
    if x.get("saving_kind"):
        print(f"  the recommended split has rho {x['recommended_rho']:.2f}: its saving is {x['saving_kind']}"
              + (" (the short pool does no more work per instance; the saving is keeping long prefills out of "
                 "short requests' steps)" if x["saving_kind"] == "latency isolation" else ""))
    if "sensitivity" in x:
        s = x["sensitivity"]
        print(f"  re-sized at B_short={x['b_short']} (seeds as above):{'baseline':>9}{'single':>8}{'split':>8}"
              f"{'vs base':>10}{'vs single':>10}")
        print(_verdict_row("targets as given", s["at_targets"]))
        print(_verdict_row(f"targets x{s['factor']:g} (sensitivity)", s["at_scaled_targets"]))
        for p in x["short_ttft_sweep"]:
            print(_verdict_row(f"short TTFT {p['short_ttft_ms']:,.0f} ms", p))
        d = x["decomposition"]
        print(f"  decomposition: saving vs baseline {_pct_or_dash(d['saving_vs_baseline'])} = isolation "
              f"{_pct_or_dash(d['isolation'])} + pool configuration {_pct_or_dash(d['configuration'])} ({d['how']})")


def print_horizon(res: dict) -> None:
    """The final check (`sizing.horizon`): what each checked design was verified on and how it went."""
    h = res.get("horizon") or {}
    if not h.get("traces"):
        return
    print("\nfinal check on " + " and ".join(f"the {t['role']} trace ({t['requests']:,} requests, "
                                             f"{t['duration_s']:.0f} s)" for t in h["traces"])
          + ", every seed (the cheapest designs of each kind; the others cost at least as much as one that holds):")
    matrix = bool(res.get("balancer_matrix"))
    for d in res["designs"]:
        if d.get("horizon") in ("held", "missed"):
            planned = d["verified_on"][0]
            grown = planned.get("grown_from_gpus")
            p99 = ", ".join(f"{v['role']} short TTFT P99 {_fmt(v['classes']['short']['ttft_p99_ms'])} ms"
                            for v in d["verified_on"])
            print(f"  {d['name']}" + (f" [{d.get('balancer')}]" if matrix else "")
                  + f": {d['horizon']} at {d['gpus']} GPUs" + (f" (grown from {grown})" if grown else "")
                  + f"; {p99}")


def print_matrix(res: dict) -> None:
    """GPUs per design (rows) under each balancer (columns), '-' where it misses."""
    m = res.get("balancer_matrix")
    if not m:
        return
    bals = list(m)
    names = list(dict.fromkeys(n for b in bals for n in m[b]))
    print("\nGPUs by balancer ('-': misses the targets)")
    print(f"{'design':<18}" + "".join(f"{b:>16}" for b in bals))
    for n in names:
        print(f"{n:<18}" + "".join(f"{_fmt(m[b].get(n)):>16}" for b in bals))


def print_simulate(spec: FleetSpec, tr: Trace, r: SimResult, s: dict) -> None:
    """A simulation's table: the fleet, each pool, utilisation, prefix cache, adaptive limits."""
    print(f"{spec.describe()}\n{len(tr):,} requests, {s['duration_s']:.0f} s, simulated in "
          f"{r.wall_s:.2f} s ({s['sim_req_per_s']:,.0f} req/s)")
    print(HEADER)
    print(_row("fleet", spec.gpus, s))
    for name, m in s["pools"].items():
        print(_row(f"  pool {name}", m["gpus"], {"fleet": m}))
    f = s["fleet"]
    print(f"over the trace window: KV utilisation {f['kv_util']:.1%} (busy {f['kv_util_busy']:.1%}), "
          f"GPU busy {f['gpu_busy']:.1%}, drain {f['drain_s']:.0f} s, "
          f"spilled {s['spilled']}, GPU-hours {f['gpu_hours']:.2f}")
    if tr.hashes is not None:
        print(f"prefix cache: {f['prefix_hit_rate']:.1%} of prompt blocks hit, "
              f"{f['prefix_skipped_tokens']:,} prefill tokens skipped")
    if r.loop is not None and spec.adaptive:
        path = [lim for _, lim in r.loop.limits_path]
        print(f"adaptive tier limits: {list(spec.tier_limits)} at the start, {list(path[-1]) if path else '-'} "
              f"at the end, {sum(r.loop.router.threshold.moves)} moves")

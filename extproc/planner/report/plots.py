"""PNG plots of a plan (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..sizing.slo import TIGHT_IDLE_RATIO  # noqa: E402


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(d: dict, matrix: bool = False) -> str:
    """What a design really is, in a few words (and its balancer in a balancer matrix)."""
    p = d["pools"]
    bal = f" [{d['balancer']}]" if matrix and d.get("balancer") else ""
    if d["kind"] == "split":
        return f"split B={d['b_short']}{bal}\n" + " + ".join(
            f"{x['count']}x{x['config']['gpu']} TP{x['config']['tp']}" for x in p)
    c = p[0]["config"]
    extra = f" lpt{c['long_prefill_token_threshold']}" if c["long_prefill_token_threshold"] else ""
    return (f"{d['name']}{bal}\n{p[0]['count']}x{c['gpu']} TP{c['tp']} seqs{c['max_num_seqs']} "
            f"mbt{c['max_num_batched_tokens']}{extra}")


def plot_plan(res: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    designs = res["designs"]
    name = res["trace"]
    matrix = bool(res.get("balancer_matrix"))
    labels = [_label(d, matrix) for d in designs]
    classes = list(res["slo"]["targets"])

    # per-class P99 TTFT / TPOT with the SLO lines
    w = max(4.8, 0.42 * len(designs))  # a balancer matrix holds every design once per balancer
    fig, axes = plt.subplots(2, len(classes), figsize=(w * len(classes), 7.5), squeeze=False)
    for j, c in enumerate(classes):
        tg = res["slo"]["targets"][c]
        for i, (metric, slo_key, eff_key, unit) in enumerate(
                (("ttft_p99_ms", "ttft_slo_ms", "ttft_target_ms", "P99 TTFT (ms)"),
                 ("tpot_p99_ms", "tpot_slo_ms", "tpot_target_ms", "P99 TPOT (ms)"))):
            ax = axes[i][j]
            vals = [d["classes"][c][metric] for d in designs]
            colors = ["tab:green" if d["classes"][c]["meets_effective"] else "tab:red" for d in designs]
            ax.bar(range(len(designs)), vals, color=colors)
            ax.axhline(tg[slo_key], color="k", ls="--", label=f"SLO {tg[slo_key]:,.0f} ms")
            if tg[eff_key] != tg[slo_key]:
                ax.axhline(tg[eff_key], color="tab:orange", ls=":",
                           label=f"infeasible: held to {tg[eff_key]:,.0f} ms")
            ax.set_xticks(range(len(designs)), labels, fontsize=6, rotation=20)
            ax.set_ylabel(unit)
            ax.set_title(f"class {c} ({tg['requests']:,} requests)", fontsize=9)
            ax.legend(fontsize=7)
    # the summary a design is judged by is its worst seed's (steady.worst: every seed must meet)
    fig.suptitle(f"{name}: per-class P99 at the planned sizes (worst of {len(res['seeds'])} seeds)")
    paths.append(_save(fig, os.path.join(out_dir, "class_latency.png")))

    # cost vs B_short with the seed band, one line per balancer in a balancer matrix
    fig, ax = plt.subplots(figsize=(6.4, 4))
    bals = list(dict.fromkeys(d.get("balancer") for d in designs))
    for bal in bals:
        mine = [d for d in designs if d.get("balancer") == bal]
        sp = sorted((d for d in mine if d["kind"] == "split" and d["b_short"]),
                    key=lambda d: d["b_short"])
        tag = f" [{bal}]" if matrix else ""
        if sp:
            b = [d["b_short"] for d in sp]
            line, = ax.plot(b, [d["gpus"] for d in sp], "o-", label=f"split (simulated){tag}")
            ax.fill_between(b, [d["seed_band_gpus"][0] for d in sp], [d["seed_band_gpus"][1] for d in sp],
                            alpha=0.2, color=line.get_color(), label=None if matrix else "per-seed minimal sizes")
            base = mine[0]["gpus"]
            cf = [(x, base * (1 - d["closed_form_savings"])) for x, d in zip(b, sp)
                  if d["closed_form_savings"] == d["closed_form_savings"]]
            if cf and not matrix:
                ax.plot(*zip(*cf), "s--", label="closed form: baseline x (1 - alpha(1-1/rho))")
            ax.set_xscale("log", base=2)
    best = res["recommendation"].get("best_single_pool")
    if matrix and best:
        ax.axhline(best["gpus"], color="k", ls=":", label=f"best single pool: {best['design']} "
                                                          f"[{best['balancer']}] ({best['gpus']} GPUs)")
    elif not matrix:
        for d, ls in zip([d for d in designs if d["kind"] == "homogeneous"], (":", "-.")):
            ax.axhline(d["gpus"], color="k", ls=ls, label=f"{d['name']} ({d['gpus']} GPUs)")
    ax.set_xlabel("B_short (tokens)")
    ax.set_ylabel("GPUs")
    ax.set_title(f"{name}: GPUs at equal per-class SLOs vs B_short", fontsize=9)
    ax.legend(fontsize=7)
    paths.append(_save(fig, os.path.join(out_dir, "cost_vs_b_short.png")))

    # preemptions, only when there are any
    if any(d["preempt_per_1k"] > 0 for d in designs):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ax.bar(range(len(designs)), [d["preempt_per_1k"] for d in designs], color="tab:red")
        ax.axhline(res["slo"]["preempt_per_1k"], color="k", ls="--", label="SLO")
        ax.set_xticks(range(len(designs)), labels, fontsize=6, rotation=20)
        ax.set_ylabel("preemptions per 1,000 requests")
        ax.legend(fontsize=7)
        ax.set_title(f"{name}: preemptions at the planned sizes")
        paths.append(_save(fig, os.path.join(out_dir, "preemptions.png")))
    sw = res.get("slo_realism", {}).get("short_ttft_sweep")
    if sw:
        paths.append(plot_short_ttft_sweep(res, sw, out_dir))
    if res.get("balancer_matrix"):
        paths.append(plot_balancer_matrix(res, out_dir))
    return paths


def plot_short_ttft_sweep(res: dict, sweep: list[dict], out_dir: str) -> str:
    """Saving of the split vs the short class's P99 TTFT target (slo_sweep.py)."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    x = [p["short_ttft_ms"] for p in sweep]
    for key, lab, m in (("saving_vs_baseline", "split vs baseline", "o-"),
                        ("saving_vs_best_single", "split vs best single pool", "s--")):
        y = [100 * p[key] if p[key] is not None else float("nan") for p in sweep]
        ax.plot(x, y, m, label=lab)
    idle = res["slo"]["targets"]["short"]["idle_ttft_p99_ms"]
    ax.axvline(idle, color="tab:red", ls=":", label=f"idle P99 {idle:,.0f} ms")
    ax.axvline(TIGHT_IDLE_RATIO * idle, color="tab:orange", ls=":", label=f"{TIGHT_IDLE_RATIO:g}x idle (tight below)")
    ax.axvline(res["slo"]["targets"]["short"]["ttft_slo_ms"], color="k", ls="--", label="plan's target")
    ax.set_xscale("log")
    ax.set_xlabel("short class P99 TTFT target (ms)")
    ax.set_ylabel("saving (%)")
    ax.set_title(f"{res['trace']}: saving vs the short TTFT target", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, os.path.join(out_dir, "saving_vs_short_ttft.png"))


def plot_balancer_matrix(res: dict, out_dir: str) -> str:
    """GPUs per design x balancer (blank where the design misses the targets)."""
    import numpy as np
    m = res["balancer_matrix"]
    bals = list(m)
    names = list(dict.fromkeys(n for b in bals for n in m[b]))
    g = np.array([[np.nan if m[b].get(n) is None else m[b][n] for b in bals] for n in names], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 * len(bals) + 2.5, 0.45 * len(names) + 1.6))
    ax.imshow(np.ma.masked_invalid(g), cmap="viridis_r", aspect="auto")
    lo, hi = (float(np.nanmin(g)), float(np.nanmax(g))) if np.isfinite(g).any() else (0.0, 1.0)
    for i in range(len(names)):
        for j in range(len(bals)):
            dark = g[i, j] == g[i, j] and (g[i, j] - lo) > 0.5 * (hi - lo)  # viridis_r: large = dark
            ax.text(j, i, "miss" if g[i, j] != g[i, j] else f"{g[i, j]:.0f}", ha="center", va="center",
                    fontsize=8, color="w" if dark else "k")
    ax.set_xticks(range(len(bals)), bals, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    r = res["recommendation"]
    sv, bs = r.get("saving_vs_best_single_pool"), r.get("best_split")
    if r.get("split") and sv is not None:
        sub = f"\n{r['design']} ({r.get('balancer')}) saves {sv:.0%} vs the best single pool"
    elif r.get("design") and bs:
        sub = (f"\nkeep one pool: {r['design']} ({r.get('balancer')}); the best split saves "
               f"{bs['saving_vs_best_single_pool']:.0%}, noise {bs['noise']:.0%}")
    else:
        sub = f"\nrecommended: {r.get('design')} ({r.get('balancer')})"
    ax.set_title(f"{res['trace']}: GPUs by design x balancer" + sub, fontsize=9)
    return _save(fig, os.path.join(out_dir, "balancer_matrix.png"))

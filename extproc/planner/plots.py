"""PNG plots of a plan (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_plan(result: dict, totals: np.ndarray, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    rows = [r for r in result["dual"] if "error" not in r]
    homo = result["homogeneous"]
    name = result["trace"]

    # cost vs B_short, with the closed form
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if rows:
        b = [r["b_short"] for r in rows]
        ax.plot(b, [r["gpus"] for r in rows], "o-", label="dual pools (simulated)")
        ax.plot(b, [homo["gpus"] * (1 - r["closed_form_savings"]) for r in rows], "s--",
                label="closed form  alpha(1-1/rho)")
        ax.set_xscale("log", base=2)
    ax.axhline(homo["gpus"], color="k", ls=":", label="homogeneous (worst-case config)")
    ax.set_xlabel("B_short (tokens)")
    ax.set_ylabel("GPUs")
    ax.set_title(f"{name}: fleet size vs B_short")
    ax.legend(fontsize=8)
    paths.append(_save(fig, os.path.join(out_dir, "cost_vs_b_short.png")))

    # budget CDF with thresholds
    fig, ax = plt.subplots(figsize=(6.4, 4))
    t = np.sort(totals)
    ax.plot(t, np.arange(1, len(t) + 1) / len(t))
    for r in rows:
        ax.axvline(r["b_short"], ls="--", alpha=0.6)
        ax.text(r["b_short"], 0.02, f" {r['b_short']}\n alpha={r['alpha']:.2f}", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("request budget: prompt + output tokens")
    ax.set_ylabel("CDF")
    ax.set_title(f"{name}: token budget CDF")
    paths.append(_save(fig, os.path.join(out_dir, "budget_cdf.png")))

    # TTFT and preemptions, homogeneous vs each split
    labels = ["homog."] + [f"B={r['b_short']}" for r in rows]
    sums = [homo["summary"]] + [r["summary"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    axes[0].bar(labels, [s["fleet"]["ttft_p99_ms"] for s in sums], color="tab:blue", label="P99")
    axes[0].bar(labels, [s["fleet"]["ttft_p50_ms"] for s in sums], color="tab:orange", label="P50")
    axes[0].set_ylabel("TTFT (ms)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[1].bar(labels, [s["fleet"]["preemptions_per_1k"] for s in sums], color="tab:red")
    axes[1].set_ylabel("preemptions per 1,000 requests")
    for a in axes:
        a.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"{name}: latency and preemptions at the planned sizes")
    paths.append(_save(fig, os.path.join(out_dir, "ttft_preemptions.png")))
    return paths

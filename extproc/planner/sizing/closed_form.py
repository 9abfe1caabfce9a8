"""The paper's closed-form cost model and the throughput measurement behind rho.

savings = alpha * (1 - 1/rho)

alpha: share of traffic whose budget <= B_short (what the short pool serves);
rho:   throughput of a short-pool instance over a worst-case-configured one on
       that same short traffic. The derivation assumes per-request cost is the
       same for short and long requests and that both pools run at the same
       utilisation; the planner prints it beside the simulated savings so the
       reader sees where those assumptions hold.
"""
from __future__ import annotations

import numpy as np

from ..sim.fleet import FleetSpec, PoolSpec, simulate
from ..sim.hardware import InstanceConfig
from ..sim.traces import Trace

#: Requests used to measure an instance's sustainable throughput: enough to keep
#: a max_num_seqs=256 batch full for several turnovers (vLLM's own
#: benchmark_throughput uses 1,000 ShareGPT prompts).
THROUGHPUT_SAMPLE = 1500

#: Completion quantiles between which throughput is measured, so the ramp-up
#: and the drain of the last long requests do not count.
STEADY_LO, STEADY_HI = 0.1, 0.9


def alpha(budget: np.ndarray, b_short: float) -> float:
    """Share of requests whose budget fits the short pool."""
    budget = np.asarray(budget)
    return float((budget <= b_short).mean()) if budget.size else 0.0


def savings(alpha_: float, rho: float) -> float:
    """Fraction of GPUs saved by splitting: alpha * (1 - 1/rho)."""
    if rho <= 0:
        raise ValueError("rho must be > 0")
    return alpha_ * (1.0 - 1.0 / rho)


def sample(trace: Trace, n: int = THROUGHPUT_SAMPLE, seed: int = 0) -> Trace:
    """n requests drawn (with replacement, seeded) from the trace, all at t=0."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(trace), n) if len(trace) else np.zeros(0, dtype=np.int64)
    s = trace.take(np.sort(idx))
    s.arrival = np.zeros(len(s))
    return s


def throughput(cfg: InstanceConfig, trace: Trace, n: int = THROUGHPUT_SAMPLE, seed: int = 0) -> float:
    """Sustainable requests/s of one instance on the trace's request mix.

    Offline like vLLM's benchmark_throughput (all requests queued at t=0);
    measured between the 10th and 90th percentile completion.
    """
    s = sample(trace, n, seed)
    fits = (s.prompt + s.output) <= cfg.max_model_len
    if not fits.any():
        return 0.0
    s = s.take(np.nonzero(fits)[0])
    r = simulate(s, FleetSpec((PoolSpec("m", cfg, 1),)), seed=seed)
    done = np.sort(r.finish[~r.rejected])
    lo, hi = int(STEADY_LO * len(done)), max(int(STEADY_HI * len(done)) - 1, 0)
    span = done[hi] - done[lo]
    if hi <= lo or span <= 0:
        return len(done) / done[-1] if done[-1] > 0 else 0.0
    return (hi - lo) / span

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

from ..sim.hardware import InstanceConfig
from ..sim.traces import Trace
from .steady import busy_seconds

#: Requests sampled for an instance's throughput estimate: the mix of the
#: trace (vLLM's own benchmark_throughput uses 1,000 ShareGPT prompts).
THROUGHPUT_SAMPLE = 1500


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
    """Sustainable requests/s of one instance on the trace's request mix: the
    cost model's busy seconds for a sample of its requests (`steady.busy_seconds`:
    prompts prefilled in full steps of max_num_batched_tokens, outputs decoded
    at the largest batch the KV cache and max_num_seqs hold at once, so no
    request is ever preempted), the requests over max_model_len left out.

    Issue 16 item 2: an offline run with every request queued at t=0 thrashed
    on long-prompt traces (vLLM V1 admits a request by its first chunk's KV
    blocks, so hundreds of partial prefills preempt each other: Mooncake at
    mbt 8192, 1,937 preemptions and 89M recomputed tokens for 22M prompt
    tokens), and ranked the larger step budgets *lower*, backwards. The
    estimate is a best case (the same bound `steady.MAX_UTILIZATION` holds
    pools to): it ranks configs and starts the SLO search, which decides.
    """
    s = sample(trace, n, seed)
    fits = (s.prompt + s.output) <= cfg.max_model_len
    if not fits.any():
        return 0.0
    pre, dec = busy_seconds(cfg, s.prompt[fits], s.output[fits])
    return float(fits.sum()) / (pre + dec) if pre + dec > 0 else 0.0

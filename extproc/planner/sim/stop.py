"""Early exit of a fleet simulation once its verdict is already known to be
"misses" (issue 16 item 8: the sizing search simulates many counts that fail;
a failing count need not be simulated to the end to know it fails).

A `MissRule` is checked by `fleet.simulate` every CHECK_EVERY arrivals and
during the drain. It stops the run only when the miss is *certain*, never on
a guess, so the search takes the same path and finds the same sizes:

* **P99 TTFT.** After the fleet has been advanced to arrival time t, a request
  without a first token gets it at t or later (every instance has run every
  step starting before t, or is inside a pure-decode run that prefills
  nothing until after t), so its TTFT is at least t - arrival. A class's P99
  (`metrics._pct`: numpy's linear percentile over its n completed measured
  requests) is at least the order statistic x[floor(0.99 (n - 1))]; once
  n - floor(0.99 (n - 1)) + 1 requests are surely over the target, that order
  statistic is over it, and so is the P99, whatever the rest of the run does.
  n is known up front: every request the pool does not reject on arrival
  (prompt + output > max_model_len) completes.
* **P99 TPOT**, the same way over the requests with >= 2 output tokens: a
  request not finished at t finishes at t or later, so its TPOT is at least
  (t - first token) / (output - 1).
* **Preemptions.** Preemptions only accumulate: once the measured requests'
  preemptions per 1,000 exceed the SLO, the run misses.
* **Capacity.** `steady.utilization` depends only on the requests and the
  config, so a pool over capacity misses before its first step (`over_capacity`).

The result of a stopped run is partial (`SimResult.stopped` names the rule):
its figures are lower bounds, and the caller treats the run as a miss.
"""
from __future__ import annotations

import numpy as np

#: Arrivals between two checks: a check is a few vector operations over the
#: run's requests (~1 ms at 25K requests), so every 500 arrivals costs well
#: under 1% of a run while a failing run stops within half a second of
#: simulated time at 1,000 req/s.
CHECK_EVERY = 500

#: Instances drained between two checks after the last arrival.
DRAIN_CHECK_EVERY = 32

#: Extra requests over the target beyond the order-statistic bound before a
#: class counts as surely missed: a guard against a tie at the percentile's
#: interpolation point, not a tolerance (the bound is already exact).
MARGIN = 1

#: The percentile a class target is judged at (slo.class_ok: P99 TTFT).
QUANTILE = 99.0


class MissRule:
    """Stop a run once a class's P99 TTFT or the fleet's preemptions per 1K
    surely miss. Built from per-request arrays of the (perturbed) trace the
    run simulates."""

    def __init__(self, arrival: np.ndarray, cls: np.ndarray, measured: np.ndarray,
                 rejected: np.ndarray, ttft_target_ms: list[float], preempt_per_1k: float,
                 output: np.ndarray | None = None, tpot_target_ms: list[float] | None = None):
        self.arrival = np.asarray(arrival, dtype=np.float64)
        self.measured = np.asarray(measured, dtype=bool)
        served = self.measured & ~np.asarray(rejected, dtype=bool)
        cls = np.asarray(cls)
        self.classes = [r for k, target in enumerate(ttft_target_ms)
                        if (r := _rule(served & (cls == k), target, k)) is not None]
        # TPOT as `metrics._latency` has it: requests with >= 2 output tokens
        self.tpot = []
        if output is not None and tpot_target_ms is not None:
            out = np.asarray(output)
            self.per_gap = np.maximum(out - 1, 1)
            self.tpot = [r for k, target in enumerate(tpot_target_ms)
                         if (r := _rule(served & (cls == k) & (out > 1), target, k)) is not None]
        self.n_measured = int(self.measured.sum())
        self.preempt_per_1k = float(preempt_per_1k)
        self.every = CHECK_EVERY
        self.drain_every = DRAIN_CHECK_EVERY
        self.pre: str | None = None  # a miss known before the run (`over_capacity`): stops it at once

    def check(self, t: float, first_token: list, preempts: list, finish: list | None = None) -> str | None:
        """The rule that surely misses at fleet time t, or None. first_token,
        preempts, finish: the run's per-request records so far (`instance.Records`)."""
        if self.pre is not None:
            return self.pre
        if self.n_measured:
            pre = int(np.asarray(preempts, dtype=np.int64)[self.measured].sum())
            if 1000.0 * pre / max(self.n_measured, 1) > self.preempt_per_1k:
                return "preemptions"
        ft = np.asarray(first_token, dtype=np.float64)
        # TTFT so far: the first token's time, or t for one still to come (a lower bound)
        ttft = np.where(np.isfinite(ft), ft, t) - self.arrival
        for m, target, need, k in self.classes:
            if int(np.count_nonzero(1e3 * ttft[m] > target)) >= need:
                return f"ttft class {k}"
        if self.tpot and finish is not None:
            # a request not finished by t finishes at t or later (as for the first
            # token); one without a first token has no TPOT bound yet (NaN: not counted)
            fin = np.asarray(finish, dtype=np.float64)
            tpot = (np.where(np.isfinite(fin), fin, t) - ft) / self.per_gap
            for m, target, need, k in self.tpot:
                if int(np.count_nonzero(1e3 * tpot[m] > target)) >= need:
                    return f"tpot class {k}"
        return None


def _rule(mask: np.ndarray, target: float, k: int) -> tuple | None:
    """(mask, target ms, requests over it that make the P99 surely over, class)
    for the n requests of mask (None: no request, nothing to miss)."""
    n = int(mask.sum())
    if n == 0:
        return None
    f = int(np.floor(QUANTILE / 100.0 * (n - 1)))
    return mask, float(target), n - f + MARGIN, k


def over_capacity(utilization: dict) -> str | None:
    """The capacity rule (`steady.utilization`'s verdict): a reason, or None."""
    return None if utilization["under_capacity"] else f"over capacity (utilization {utilization['utilization']:.2f})"

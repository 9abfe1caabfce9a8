"""Output-token budget: the request's own cap, or a learned high quantile.

When a request gives ``max_completion_tokens``/``max_tokens`` that is its
output budget (vLLM reserves context for it and rejects prompt + cap above
max_model_len). Otherwise we use a high quantile of ``usage.completion_tokens``
learned per (model, category), with a configured default until learned.

The quantile comes from a decayed histogram on a log scale: fixed memory per
key, O(1) update, and old traffic fades out like the estimator's EMAs.
Pure; memory bounded by the caller's key space.
"""

from __future__ import annotations

import math
from typing import Any

#: Histogram resolution: 8 buckets per doubling, so a bucket edge is at most
#: 9% above the value it stands for (the quantile errs on the high side).
BUCKETS_PER_DOUBLING = 8

#: Largest output we keep apart: 2^20 = 1M tokens, beyond any context.
MAX_DOUBLINGS = 20
N_BUCKETS = BUCKETS_PER_DOUBLING * MAX_DOUBLINGS + 1

#: Per-sample decay of old counts: memory of ~1,000 completions, long enough
#: for a stable p95, short enough to follow a change of prompt style.
DECAY = 0.999


def _bucket(tokens: int) -> int:
    if tokens <= 1:
        return 0
    return min(N_BUCKETS - 1, int(math.ceil(math.log2(tokens) * BUCKETS_PER_DOUBLING)))


def _edge(bucket: int) -> int:
    return int(math.ceil(2.0 ** (bucket / BUCKETS_PER_DOUBLING)))


class QuantileSketch:
    __slots__ = ("counts", "total", "samples", "_memo")

    def __init__(self) -> None:
        self.counts = [0.0] * N_BUCKETS
        self.total = 0.0
        self.samples = 0
        self._memo: tuple[int, float, int] | None = None  # (samples, q, quantile)

    def add(self, tokens: int) -> None:
        if self.samples and self.samples % 64 == 0:
            # Decay lazily every 64 samples with the equivalent factor.
            f = DECAY ** 64
            self.counts = [c * f for c in self.counts]
            self.total *= f
        self.counts[_bucket(tokens)] += 1.0
        self.total += 1.0
        self.samples += 1

    def quantile(self, q: float) -> int:
        # Asked on every routed request, changed only by add(): the last
        # answer holds while the sample count (which every add() moves) does.
        memo = self._memo
        if memo is not None and memo[0] == self.samples and memo[1] == q:
            return memo[2]
        value = self._quantile(q)
        self._memo = (self.samples, q, value)
        return value

    def _quantile(self, q: float) -> int:
        target = q * self.total
        acc = 0.0
        for i, c in enumerate(self.counts):
            acc += c
            if acc >= target and c > 0:
                return _edge(i)
        return _edge(N_BUCKETS - 1)


class OutputBudget:
    def __init__(self, default_tokens: int, quantile: float, min_samples: int):
        self.default_tokens = default_tokens
        self.q = quantile
        self.min_samples = min_samples
        self.sketches: dict[tuple[str, str], QuantileSketch] = {}

    def reconfigure(self, default_tokens: int, quantile: float) -> None:
        """Take a new default and quantile; what was learned stays."""
        self.default_tokens = default_tokens
        self.q = quantile

    def budget(self, key: tuple[str, str], max_output: int | None) -> tuple[int, str]:
        """(output tokens, source) where source is "request", "learned" or "default"."""
        if max_output is not None:
            return max_output, "request"
        sk = self.sketches.get(key)
        if sk is not None and sk.samples >= self.min_samples:
            return sk.quantile(self.q), "learned"
        return self.default_tokens, "default"

    def learn(self, key: tuple[str, str], completion_tokens: int, capped: bool) -> None:
        """Learn from an uncapped request's completion length (a capped one
        says more about the client's cap than about natural lengths)."""
        if capped or not isinstance(completion_tokens, int) or completion_tokens < 0:
            return
        sk = self.sketches.get(key)
        if sk is None:
            sk = self.sketches[key] = QuantileSketch()
        sk.add(completion_tokens)

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"model": m, "category": c, "counts": s.counts, "total": s.total, "samples": s.samples}
                for (m, c), s in self.sketches.items()]

    def restore(self, rows: list[dict[str, Any]], keep: Any) -> list[str]:
        """Load ``rows``; rows whose key ``keep`` refuses are skipped, rows
        that are not a possible sketch dropped (one line each in the list
        returned: a bad row costs only itself)."""
        if not isinstance(rows, list):
            return ["output budgets: not a list"]
        sketches, dropped = {}, []
        for d in rows:
            try:
                key = (d["model"], d["category"])
                if not keep(key) or len(d["counts"]) != N_BUCKETS:
                    continue
                sk = QuantileSketch()
                sk.counts = [float(c) for c in d["counts"]]
                sk.total = float(d["total"])
                sk.samples = int(d["samples"])
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                dropped.append(f"a malformed output-length sketch: {e!r}")
                continue
            # Decayed counts: non-negative, finite, summing to the total, and
            # never more than the completions seen.
            if not (all(math.isfinite(c) and c >= 0 for c in sk.counts) and math.isfinite(sk.total)
                    and 0 <= sk.total <= sk.samples + 1e-6 and abs(sum(sk.counts) - sk.total) <= 1e-6 * max(1.0, sk.total)
                    and sk.samples >= 0):
                dropped.append(f"an implausible output-length sketch for {key!r}")
                continue
            sketches[key] = sk
        self.sketches.update(sketches)
        return dropped

    def drop_model(self, model: str) -> None:
        """Forget the budgets of ``model`` (its estimator slot was freed)."""
        for key in [k for k in self.sketches if k[0] == model]:
            del self.sketches[key]

"""Adaptive tier boundaries (opt-in): each budget limit between tier *b* and
tier *b+1* moves to balance their pressure. Pure: loads and ``now`` in.

Pressure of a tier = (waiting requests + preemptions per second) per
instance (``TierLoad.pressure``), the runtime signals the split-pool paper
names for adaptive thresholding. When the smaller tier's pressure exceeds
the larger one's by more than ``dead_band`` the boundary steps down by
``step_fraction`` (fewer requests fit the smaller tier); the other way round
it steps up. A boundary moves at most once per ``dwell_s``, stays within
``[min_fraction x configured (and MIN_B_SHORT for the first), its tier's
max_model_len x (1 - min_margin)]``
and between its neighbours, and never moves while either tier's signals are
unknown or while it is pinned (admin API). Every move is returned and kept
in ``history`` for the log, the metrics and ``status``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from .. import defaults as D
from .load import TierLoad

#: Moves kept in ``history`` (the log has them all; status shows the latest).
HISTORY_LIMIT = 256


@dataclass(frozen=True, slots=True)
class Move:
    t: float
    boundary: int
    old: int
    new: int
    why: str


@dataclass
class Threshold:
    base: tuple[int, ...]          # configured limits
    caps: tuple[int, ...]          # max_model_len x (1 - min_margin) per boundary
    enabled: bool = False
    step_fraction: float = 0.05
    dwell_s: float = 10.0
    dead_band: float = 0.5
    min_fraction: float = 0.5
    limits: list[int] = field(default_factory=list)
    pinned: list[bool] = field(default_factory=list)
    last_move: list[float] = field(default_factory=list)
    history: list[Move] = field(default_factory=list)
    moves: list[int] = field(default_factory=list)  # moves per boundary since start

    def __post_init__(self) -> None:
        n = len(self.base)
        self.limits = self.limits or list(self.base)
        self.pinned = self.pinned or [False] * n
        self.last_move = self.last_move or [-math.inf] * n
        self.moves = self.moves or [0] * n

    @classmethod
    def from_config(cls, cfg) -> "Threshold":
        a = cfg.adaptive
        caps = tuple(int(t.max_model_len * (1.0 - cfg.policy.min_margin)) for t in cfg.tiers[:-1])
        return cls(cfg.limits, caps, a.enabled, a.step_fraction, a.dwell_s, a.dead_band, a.min_fraction)

    def reconfigured(self, cfg) -> "Threshold":
        """These boundaries under a new config with the same tiers: pins,
        history and move counts kept; where the boundaries moved kept too,
        unless the config sets them anew (then they start from there)."""
        new = Threshold.from_config(cfg)
        kept = dict(pinned=self.pinned, history=self.history, moves=self.moves)
        if new.base == self.base:
            kept.update(limits=self.limits, last_move=self.last_move)
        return replace(new, **kept)

    def bounds(self, b: int) -> tuple[int, int]:
        """Where boundary ``b`` may move: its own bounds within its neighbours."""
        lo = max(D.MIN_B_SHORT if b == 0 else 1, int(self.base[b] * self.min_fraction))
        hi = max(self.caps[b], lo)
        if b > 0:
            lo = max(lo, self.limits[b - 1] + 1)
        if b + 1 < len(self.limits):
            hi = min(hi, self.limits[b + 1] - 1)
        return lo, hi

    def observe(self, loads: Sequence[TierLoad], now: float) -> list[Move]:
        """Move the boundaries the new loads call for; returns the moves."""
        moves: list[Move] = []
        if not self.enabled:
            return moves
        for b in range(len(self.limits)):
            small, large = loads[b], loads[b + 1]
            if self.pinned[b] or not (small.known and large.known) or now - self.last_move[b] < self.dwell_s:
                continue
            diff = small.pressure - large.pressure
            if abs(diff) <= self.dead_band:
                continue
            old = self.limits[b]
            step = max(1, int(round(old * self.step_fraction)))
            lo, hi = self.bounds(b)
            new = max(lo, old - step) if diff > 0 else min(hi, old + step)
            if (new >= old) if diff > 0 else (new <= old):
                continue  # at its bound (or outside it after a pin): never move the wrong way
            why = (f"{small.name} pressure {small.pressure:.2f} vs {large.name} {large.pressure:.2f}")
            moves.append(self._move(now, b, new, why))
        return moves

    def _move(self, now: float, b: int, new: int, why: str) -> Move:
        m = Move(now, b, self.limits[b], new, why)
        self.limits[b] = new
        self.last_move[b] = now
        self.moves[b] += 1
        self.history.append(m)
        del self.history[:-HISTORY_LIMIT]
        return m

    def pin(self, b: int, value: int | None, now: float) -> Move | None:
        """Pin boundary ``b`` at ``value`` (or unpin it with None: the adaptive
        loop moves it again from there; without it, back to the configured value). The value
        is not bounded by the adaptive range (an operator's word), only by the
        neighbours and the cap; callers validate it with the config."""
        if value is None:
            self.pinned[b] = False
            if not self.enabled and self.limits[b] != self.base[b]:  # nothing will move it: back to the config
                return self._move(now, b, self.base[b], "unpinned by admin")
            return None
        self.pinned[b] = True
        if value == self.limits[b]:
            return None
        return self._move(now, b, int(value), "pinned by admin")

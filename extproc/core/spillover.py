"""Spillover: a request whose own tier is saturated goes up to a larger tier
that is not. Pure: loads in (``observe``), a target tier out (``target``).

* A tier is *saturated* when its waiting requests per instance reach
  ``waiting_per_instance`` or its mean KV usage reaches ``kv_usage``; it is
  clear again only when both fall to ``waiting_clear`` / ``kv_clear``
  (hysteresis: a Schmitt trigger, so decisions do not flap between scrapes).
* A request goes up to the nearest larger tier that is known and clear;
  never down (a smaller tier may not fit its budget), never to a tier whose
  signals are unknown or stale, and not at all when its own tier is unknown:
  no signals means static routing, exactly as without the closed loop.
* The state changes only on ``observe`` (once per scrape interval), so every
  request between two scrapes is decided alike, online and in the planner.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from .load import TierLoad


@dataclass
class Spillover:
    n_tiers: int
    waiting_per_instance: float
    waiting_clear: float
    kv_usage: float
    kv_clear: float
    #: per tier: True saturated, False clear, None unknown
    saturated: list[bool | None] = field(default_factory=list)
    #: requests sent up, per (from tier index, to tier index)
    spilled: dict[tuple[int, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.saturated:
            self.saturated = [None] * self.n_tiers

    @classmethod
    def from_config(cls, cfg) -> "Spillover":
        s = cfg.spillover
        return cls(len(cfg.tiers), s.waiting_per_instance, s.waiting_clear, s.kv_usage, s.kv_clear)

    def reconfigured(self, cfg) -> "Spillover":
        """This spillover under a new config with the same tiers: the new
        thresholds, what it has seen (saturation) and counted (spills) kept."""
        return replace(Spillover.from_config(cfg), saturated=self.saturated, spilled=self.spilled)

    def _hot(self, load: TierLoad) -> bool:
        return load.waiting_per_instance >= self.waiting_per_instance or load.kv_usage >= self.kv_usage

    def _cool(self, load: TierLoad) -> bool:
        return load.waiting_per_instance <= self.waiting_clear and load.kv_usage <= self.kv_clear

    def observe(self, loads: Sequence[TierLoad]) -> None:
        """Take a new load state (one per tier, in tier order)."""
        for i, load in enumerate(loads[: self.n_tiers]):
            was = self.saturated[i]
            if not load.known:
                self.saturated[i] = None
            elif was:
                self.saturated[i] = not self._cool(load)
            else:
                self.saturated[i] = self._hot(load)

    def target(self, tier: int) -> int:
        """The tier a request chosen for ``tier`` goes to now (``tier`` or larger)."""
        if tier >= self.n_tiers - 1 or self.saturated[tier] is not True:
            return tier
        for j in range(tier + 1, self.n_tiers):
            if self.saturated[j] is False:
                self.spilled[(tier, j)] = self.spilled.get((tier, j), 0) + 1
                return j
        return tier

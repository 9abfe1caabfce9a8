"""Which requests each pool of a design gets: the search window, and the
routing of the search window by every B_short candidate and by the tiers."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import closed_form
from ..sim.fleet import FleetSpec, PoolSpec, route
from ..sim.traces import Trace, window
from .design import Inputs
from .space import tier_names

#: Traces over SEARCH_MAX_REQUESTS requests are searched on a window of
#: SEARCH_WARMUP_S + SEARCH_WINDOW_S seconds (x SEEDS runs per count) whose
#: first SEARCH_WARMUP_S are simulated but not measured (the fleet starts
#: empty, so an unmeasured warm-up keeps the window from being optimistic),
#: then verified on the whole trace. 20 s at 1,000 req/s is 20K measured
#: requests: dozens of batch turnovers per instance.
SEARCH_WINDOW_S = 20.0
SEARCH_WARMUP_S = 5.0
SEARCH_MAX_REQUESTS = 20000

@dataclass(frozen=True)
class Tier:
    """One pool's share of a split's traffic on the search window."""

    name: str
    max_model_len: int
    trace: Trace = field(compare=False, repr=False)


@dataclass(frozen=True)
class SplitTraffic:
    """A split design before sizing: its tier limits and each tier's requests."""

    name: str
    b: int
    limits: tuple
    tiers: tuple  # of Tier
    alpha: float  # closed form: share of the whole trace's requests within b


def search_trace(trace: Trace, length: float) -> tuple[Trace, float]:
    """(the trace the search runs on, its unmeasured warm-up seconds)."""
    if len(trace) > SEARCH_MAX_REQUESTS and trace.duration > length + SEARCH_WARMUP_S:
        return window(trace, 0.0, length + SEARCH_WARMUP_S), SEARCH_WARMUP_S
    return trace, 0.0


def _tier_traffic(search: Trace, pool_of: np.ndarray, names, lengths) -> tuple:
    return tuple(Tier(n, int(m), search.take(np.nonzero(pool_of == k)[0], n))
                 for k, (n, m) in enumerate(zip(names, lengths)))


def route_splits(trace: Trace, search: Trace, inp: Inputs, b_shorts, tiers, log) -> list[SplitTraffic]:
    """Routes per B_short (search window and whole trace); identical routings
    collapse. ``tiers``: one more design, a pool per context tier."""
    base_cfg, mml = inp.base_cfg, inp.base_cfg.max_model_len
    splits, seen = [], {}
    for b in b_shorts:
        spec0 = FleetSpec((PoolSpec("short", base_cfg, 1), PoolSpec("long", base_cfg, 1)), b_short=b,
                          router=inp.router, noise_p90=inp.noise_p90)
        pool_of, _ = route(search, spec0, 0)
        full_pool, full_budget = route(trace, spec0, 0)
        key = full_pool.tobytes()
        if key in seen:
            if log:
                log(f"B_short={b}: same routing as B_short={seen[key]}; skipped")
            continue
        seen[key] = b
        splits.append(SplitTraffic(f"split-{b}", b, (b,), _tier_traffic(search, pool_of, ("short", "long"), (b, mml)),
                                   closed_form.alpha(full_budget, b)))
    if tiers:
        names = tier_names(len(tiers))
        spec0 = FleetSpec(tuple(PoolSpec(n, base_cfg, 1) for n in names), b_short=tiers[0],
                          limits=tuple(tiers[:-1]), router=inp.router, noise_p90=inp.noise_p90)
        pool_of, _ = route(search, spec0, 0)
        splits.append(SplitTraffic("tiers-" + "-".join(map(str, tiers)), tiers[0], tuple(tiers[:-1]),
                                   _tier_traffic(search, pool_of, names, tiers), float("nan")))
    return splits

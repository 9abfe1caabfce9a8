"""The router's closed loop inside the fleet simulator.

``LoopHook`` holds a real ``extproc.core.router.Router`` built from the
planner's tiers and calls the very methods the service calls: every
``interval_s`` of simulated time it samples each simulated instance the way the
monitor scrapes vLLM (running, waiting, KV usage, the preemption counter),
turns the samples into tier loads with ``core.load.tier_loads`` (so samples
are as stale as online) and feeds ``Router.observe`` (spillover saturation,
adaptive boundaries); each request is placed with ``Router.place`` (smallest
fitting tier, then spillover). One policy object, three drivers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ... import defaults as D
from ...config import Config
from ...core.load import Instance as Signals
from ...core.load import Sample, tier_loads
from ...core.router import Router

#: Endpoint written into the planner's tier configs: never contacted, the
#: config only needs a valid host:port.
SIMULATED_ENDPOINT = "simulated:1"


def loop_config(names: list[str], max_model_lens: list[int], limits: list[int], spillover: bool,
                adaptive: bool, interval_s: float = D.MONITOR_INTERVAL_S) -> Config:
    """A router Config for the planner's tiers (validated like the service's)."""
    tiers = [{"name": n, "max_model_len": m, "endpoints": [SIMULATED_ENDPOINT],
              **({"budget_limit": b} if b is not None else {})}
             for n, m, b in zip(names, max_model_lens, list(limits) + [None])]
    return Config().replace(tiers=tiers, spillover={"enabled": spillover}, adaptive={"enabled": adaptive},
                            monitor={"interval_s": interval_s})


@dataclass
class LoopHook:
    cfg: Config
    router: Router = field(init=False)
    signals: dict[str, dict[str, Signals]] = field(default_factory=dict)
    next_scrape: float = 0.0
    #: (time, tier the budget chose, tier placed) of every decision, when ``log`` is set
    log: list[tuple[float, int, int]] | None = None
    #: (time, limits) after every scrape
    limits_path: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    #: (time, tier loads) of every scrape, when ``log`` is set
    observed: list[tuple[float, tuple]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.router = Router(self.cfg)

    def scrape(self, t: float, pools: list) -> None:
        """Sample every simulated instance at ``t`` (``pools``: per tier, the
        planner's Instances, already advanced to ``t``) and feed the router."""
        for tier, row in zip(self.cfg.tiers, pools):
            per = self.signals.setdefault(tier.name, {})
            for inst in row:
                s = Sample(t, float(len(inst.running)), float(len(inst.waiting)),
                           1.0 - inst.free / inst.total_blocks, float(inst.preemptions))
                old = per.get(str(inst.iid))
                per[str(inst.iid)] = old.then(s) if old else Signals(s)
        m = self.cfg.monitor
        loads = tier_loads([t_.name for t_ in self.cfg.tiers], self.signals, t, m.interval_s, m.stale_intervals)
        self.router.observe(loads, t)
        if self.log is not None:
            self.observed.append((t, loads))
        self.limits_path.append((t, self.router.limits()))

    def place(self, t: float, budget: float, pools: list) -> int:
        """The tier a request arriving at ``t`` with ``budget`` goes to."""
        interval = self.cfg.monitor.interval_s
        if t >= self.next_scrape:
            self.scrape(t, pools)
            self.next_scrape = t + interval
        j, i = self.router.place(budget)
        if self.log is not None:
            self.log.append((t, i, j))
        return j

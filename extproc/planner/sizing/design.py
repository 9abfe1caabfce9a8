"""The planner's data, typed and frozen: a sizing job, a sized pool, a design,
a verified design and a judged one. A step of the search returns a new value
instead of adding keys to a shared dict; plan.json is written from these in
one place (`report.plan_json`)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..sim.fleet import FleetSpec, PoolSpec
from ..sim.hardware import InstanceConfig
from ..sim.traces import Trace
from .slo import SLO, judge, ok
from .space import Baseline, Space, cost
from .steady import steady_ok


@dataclass(frozen=True)
class SizingContext:
    """What every sizing job of one plan shares: the class targets it must
    meet, the seeds it is judged on, the in-pool balancer and the unmeasured
    warm-up of the search window."""

    tg: dict
    slo: SLO
    seeds: tuple
    balancer: str
    warmup: float = 0.0


@dataclass(frozen=True)
class Inputs:
    """The fixed inputs of one plan."""

    model: str
    baseline: Baseline
    base_cfg: InstanceConfig
    space: Space
    router: str
    noise_p90: float
    ctx: SizingContext


@dataclass(frozen=True)
class SizingJob:
    """Find the smallest count of `cfg` serving `trace` within the targets."""

    pool: str  # the name the sized pool gets ("all", "short", "tier1", "long")
    traffic: str  # "all" (the whole search window) or "<split>/<pool>"
    cfg: InstanceConfig
    mu: float  # analytic throughput of one instance (req/s): the search starts at rate / mu
    trace: Trace = field(compare=False, repr=False)
    start: int = 0  # a count known to meet on every seed (`presize.screen`): the search starts there
    seeded: tuple = field(default=(), compare=False, repr=False)  # ((count, seed), summary) runs already made


@dataclass(frozen=True)
class SizedPool:
    """One pool of a design: its config and the instance count the search found."""

    name: str
    cfg: InstanceConfig
    count: int
    feasible: bool
    mu: float
    rate: float
    per_seed: tuple = ()  # minimal count per seed (None: not found)
    tried: tuple = ()  # one dict per count tried: its seed-averaged P99s
    cliff: int | None = None  # largest count tried whose preemptions exceed the SLO

    @property
    def cost(self) -> float:
        return cost(self.cfg, self.count)

    @property
    def gpus(self) -> int:
        return self.count * self.cfg.tp


@dataclass(frozen=True)
class Design:
    """A fleet the planner compares: one pool (`homogeneous`) or one per context tier (`split`)."""

    name: str
    kind: str  # "homogeneous" | "split"
    pools: tuple  # of SizedPool, the first tier first
    what: str
    b_short: int | None = None
    limits: tuple = ()  # split: the budget limit of every pool but the last
    pinned: bool = False  # the operator's instance count: evaluated, never grown
    spillover: bool = False  # the router's closed loop, on as sized
    adaptive: bool = False
    alpha: float | None = None  # closed form: share of requests the short pool takes
    rho: float | None = None  # closed form: short-pool throughput over the baseline config's
    closed_form: float | None = None  # alpha * (1 - 1/rho)

    @property
    def cost(self) -> float:
        return sum(p.cost for p in self.pools)

    @property
    def gpus(self) -> int:
        return sum(p.gpus for p in self.pools)

    @property
    def tier_limits(self) -> tuple:
        """One limit fewer than pools (a split whose short pool got no traffic is one pool)."""
        return tuple(self.limits or (self.b_short,))[:len(self.pools) - 1]

    def with_count(self, k: int, n: int) -> Design:
        """This design with pool k at n instances."""
        pools = list(self.pools)
        pools[k] = replace(pools[k], count=n)
        return replace(self, pools=tuple(pools))

    def spec(self, router: str, noise_p90: float, balancer: str) -> FleetSpec:
        """The fleet to simulate: the sized pools, the tier limits and the
        router's closed loop when the design has it on."""
        limits = self.tier_limits
        return FleetSpec(tuple(PoolSpec(p.name, p.cfg, p.count) for p in self.pools),
                         b_short=limits[0] if limits else None, limits=limits or None, router=router,
                         noise_p90=noise_p90, balancer=balancer, spillover=self.spillover,
                         adaptive=self.adaptive)


@dataclass(frozen=True)
class Verified:
    """A design simulated on the whole trace for every seed."""

    design: Design
    summary: dict  # `steady.worst` of the per-seed summaries: it meets only if every seed does
    per_seed: tuple  # per seed: its class P99s and preemptions
    runs: tuple = field(default=(), compare=False, repr=False)  # per trace verified on: per seed, its summary
    #: what it was verified on (`horizon.hold`): one entry per trace, the plan's first
    verified_on: tuple = ()
    #: the final check (`horizon.hold`): "off" (none asked for), "held" (meets
    #: on every horizon trace and seed), "missed" (does not, even grown),
    #: "not checked" (it costs at least as much as a design of its kind that holds)
    horizon: str = "off"


@dataclass(frozen=True)
class Judged:
    """A verified design against the class targets: what plan.json and the
    recommendation read."""

    design: Design
    summary: dict
    per_seed: tuple
    classes: dict  # `slo.judge`
    meets: bool  # every class within the user's targets and preemptions within the SLO
    meets_effective: bool  # within the targets sized to (the user's, or idle x slack where infeasible)
    savings_vs_baseline: float
    seed_spread_gpus: int  # GPUs between the per-seed minimal sizes
    seed_band_gpus: tuple  # (lowest, highest) GPUs over the per-seed minimal sizes
    verified_on: tuple = ()  # `Verified.verified_on`
    horizon: str = "off"  # `Verified.horizon`: only "off" or "held" may be recommended

    @property
    def recommendable(self) -> bool:
        """Meets what it was sized to, every pool's search found a count, and
        it holds on the final check's horizon when there is one."""
        return self.meets_effective and self.feasible and self.horizon in ("off", "held")

    @classmethod
    def of(cls, v: Verified, tg: dict, slo: SLO, base_cost: float) -> Judged:
        d, f = v.design, v.summary["fleet"]
        classes = judge(v.summary, tg, slo)
        spread, lo, hi = _seed_band(d)
        return cls(d, v.summary, v.per_seed, classes,
                   meets=bool(all(c["meets"] for c in classes.values())
                              and f["preemptions_per_1k"] <= slo.preempt_per_1k
                              and steady_ok(v.summary) and v.horizon != "missed"),
                   meets_effective=bool(ok(v.summary, tg, slo) and v.horizon != "missed"),
                   savings_vs_baseline=1.0 - d.cost / base_cost if base_cost else float("nan"),
                   seed_spread_gpus=spread, seed_band_gpus=(lo, hi), verified_on=v.verified_on, horizon=v.horizon)

    @property
    def name(self) -> str:
        return self.design.name

    @property
    def kind(self) -> str:
        return self.design.kind

    @property
    def gpus(self) -> int:
        return self.design.gpus

    @property
    def usd_per_hour(self) -> float:
        return self.design.cost

    @property
    def feasible(self) -> bool:
        """Every pool's search found a count that meets (none hit the growth limit)."""
        return all(p.feasible for p in self.design.pools)

    @property
    def preempt_per_1k(self) -> float:
        return self.summary["fleet"]["preemptions_per_1k"]


def _seed_band(d: Design) -> tuple[int, int, int]:
    """(spread, lowest, highest) GPUs over the pools' per-seed minimal sizes;
    a pinned pool, or one without per-seed sizes, counts at its size."""
    spread = lo = hi = 0
    for p in d.pools:
        ks = [k for k in p.per_seed if k is not None]
        if ks and not d.pinned:
            spread += (max(ks) - min(ks)) * p.cfg.tp
            lo += min(ks) * p.cfg.tp
            hi += max(ks) * p.cfg.tp
        else:
            lo += p.count * p.cfg.tp
            hi += p.count * p.cfg.tp
    return spread, lo, hi

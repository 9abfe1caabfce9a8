"""Pool sizing: the smallest homogeneous fleet and the smallest dual fleet per
candidate B_short that meet an SLO, with the closed form beside the result.

Method (docs/planner.md):
1. Search on a window of the trace (``search_window`` s); each pool is sized
   alone on the requests the router sends it (pools are independent without
   spillover), starting from rate / sustainable-throughput and moving up
   geometrically, then bisecting down.
2. Per pool, a few ``max_num_seqs`` values are tried (vLLM's 256 default down
   to the "safe" value that can never preempt); the cheapest that meets the
   SLO wins, ties to fewer preemptions.
3. The winners are verified on the whole trace; a pool that misses the SLO
   there is grown until it meets it.
"""
from __future__ import annotations

import dataclasses

import math
import sys
from dataclasses import dataclass, field

import numpy as np

from . import closed_form
from .fleet import FleetSpec, PoolSpec, route, simulate
from .hardware import ConfigError, InstanceConfig, make_config, safe_max_num_seqs
from .metrics import meets, summarize
from .traces import Trace, window

#: Default SLO: P99 time to first token. 2 s is a common interactive-chat
#: target (a user sees the answer start within ~2 s); raise it for long-context
#: work whose prefill alone takes longer (see ttft_floor).
SLO_TTFT_P99_MS = 2000.0

#: Default SLO on preemptions per 1,000 requests: 10 (1%) keeps recompute waste
#: small; the paper counts preemptions as a failure mode worth 5x reductions.
SLO_PREEMPT_PER_1K = 10.0

#: Candidate B_short values for `--b-short auto`: the 8K-16K range production
#: splits use, plus 4K and 32K to show the trend on both sides.
AUTO_B_SHORT = (4096, 8192, 16384, 32768)

#: max_num_seqs candidates tried per pool ("safe" = never preempts).
SEQS_CANDIDATES = (256, "safe")

#: Seconds of the trace the search simulates when the trace is larger than
#: SEARCH_MAX_REQUESTS (the verification uses all of it). 60 s at 1,000 req/s
#: is 60K requests: many turnovers of every instance's batch, ~3-4 s a run.
SEARCH_WINDOW_S = 60.0

#: Traces up to this many requests are searched whole: a window's P99 TTFT
#: misses the rare longest prompts that dominate the full trace's P99.
SEARCH_MAX_REQUESTS = 40000

#: When the effective TTFT target has to be relaxed because even an idle
#: instance cannot prefill the pool's P99 prompt in time, the target becomes
#: this multiple of that floor (queueing allowance on top of the bare prefill).
TTFT_FLOOR_SLACK = 1.5

#: Cap of the upward search (x the start size) before a pool is infeasible.
MAX_GROWTH = 64

#: The bisection stops when the bracket is within 2% of the count (or 1): the
#: P99 of a 30 s window is itself noisier than that.
SIZE_TOLERANCE = 0.02

#: Verification rounds on the full trace before giving up growing a pool.
VERIFY_ROUNDS = 6


@dataclass
class PoolPlan:
    name: str
    cfg: InstanceConfig
    count: int
    mu: float  # sustainable req/s per instance on this pool's mix
    rate: float  # offered req/s
    ttft_target_ms: float
    metrics: dict = field(default_factory=dict)
    feasible: bool = True
    tried: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "config": self.cfg.label(), "count": self.count,
                "tp": self.cfg.tp, "gpus": self.count * self.cfg.tp,
                "max_model_len": self.cfg.max_model_len, "max_num_seqs": self.cfg.max_num_seqs,
                "max_num_batched_tokens": self.cfg.max_num_batched_tokens,
                "kv_tokens": self.cfg.kv_tokens, "mu_rps": self.mu, "rate_rps": self.rate,
                "ttft_target_ms": self.ttft_target_ms, "feasible": self.feasible,
                "tried": self.tried, "metrics": self.metrics}


def ttft_floor_ms(cfg: InstanceConfig, prompts: np.ndarray) -> float:
    """P99 TTFT of the pool's requests on an idle instance (chunked prefill alone)."""
    if prompts.size == 0:
        return 0.0
    c = cfg.step_coeffs()
    p = np.asarray(prompts, dtype=np.float64)
    chunks = np.ceil(p / cfg.max_num_batched_tokens)
    flops = c.flops_per_token * p + c.attn_flops_per_ctx * p * p / 2
    t = chunks * c.overhead + np.maximum(flops * c.inv_flops,
                                         chunks * c.model.weight_bytes * c.inv_bw)
    return 1e3 * float(np.percentile(t, 99))


def _pool_metrics(trace: Trace, cfg: InstanceConfig, n: int, seed: int) -> dict:
    r = simulate(trace, FleetSpec((PoolSpec("p", cfg, n),)), seed=seed)
    return summarize(r)["fleet"]


def size_pool(name: str, trace: Trace, cfg: InstanceConfig, slo_ttft_ms: float,
              slo_preempt: float, seed: int = 0, log=None,
              floor_prompts: np.ndarray | None = None) -> PoolPlan:
    """Smallest instance count of `cfg` serving `trace` within the SLO.

    `floor_prompts` (default: the trace's) are the prompts whose idle-instance
    P99 TTFT floors the TTFT target: pass the full trace's so the search and the
    verification use the same target.
    """
    rate = len(trace) / max(trace.duration, 1e-9)
    fp = trace.prompt if floor_prompts is None else floor_prompts
    target = max(slo_ttft_ms, TTFT_FLOOR_SLACK * ttft_floor_ms(cfg, fp))
    mu = closed_form.throughput(cfg, trace, seed=seed) if len(trace) else 0.0
    plan = PoolPlan(name, cfg, 0, mu, rate, target)
    if len(trace) == 0:
        return plan
    cache: dict[int, dict] = {}

    def ok(n: int) -> bool:
        if n not in cache:
            cache[n] = _pool_metrics(trace, cfg, n, seed)
            m = cache[n]
            plan.tried.append({"count": n, "ttft_p99_ms": m["ttft_p99_ms"],
                               "preemptions_per_1k": m["preemptions_per_1k"]})
            if log:
                log(f"  {name:5} seqs={cfg.max_num_seqs:<4} x{n:<5} ttft_p99={m['ttft_p99_ms']:.0f}ms "
                    f"(target {target:.0f}) preempt/1k={m['preemptions_per_1k']:.1f}")
        return meets(cache[n], target, slo_preempt)

    cap = max(1, len(trace))  # never more instances than requests
    start = min(cap, max(1, math.ceil(rate / mu))) if mu > 0 else 1
    if ok(start):  # halve until it fails
        hi, lo = start, 0
        while hi > 1:
            n = max(1, hi // 2)
            if ok(n):
                hi = n
            else:
                lo = n
                break
    else:  # double until it meets
        lo, n = start, start * 2
        while not ok(n):
            lo = n
            if n >= start * MAX_GROWTH or n >= cap:
                plan.feasible = False
                plan.count, plan.metrics = n, cache[n]
                return plan
            n = min(n * 2, cap)
        hi = n
    while hi - lo > max(1, int(SIZE_TOLERANCE * hi)):
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    plan.count, plan.metrics = hi, cache[hi]
    return plan


def _seqs_values(cfg: InstanceConfig, cands) -> list[int]:
    out = []
    for c in cands:
        v = safe_max_num_seqs(cfg.with_(max_num_seqs=256)) if c == "safe" else int(c)
        v = max(1, min(v, cfg.max_num_batched_tokens))
        if v not in out:
            out.append(v)
    return out


def best_pool(name: str, trace: Trace, base: InstanceConfig, slo_ttft_ms: float,
              slo_preempt: float, seqs=SEQS_CANDIDATES, seed: int = 0, log=None,
              floor_prompts: np.ndarray | None = None) -> PoolPlan:
    best = None
    for s in _seqs_values(base, seqs):
        p = size_pool(name, trace, base.with_(max_num_seqs=s), slo_ttft_ms, slo_preempt, seed, log,
                      floor_prompts)
        key = (not p.feasible, p.count * p.cfg.tp, p.metrics.get("preemptions_per_1k", 0))
        if best is None or key < best[0]:
            best = (key, p)
    return best[1]


def _verify(trace: Trace, spec: FleetSpec, plans: list[PoolPlan], slo_preempt: float,
            seed: int, progress: bool, log=None) -> tuple[FleetSpec, dict]:
    """Simulate the fleet on the full trace; grow pools that miss their target."""
    for _ in range(VERIFY_ROUNDS):
        r = simulate(trace, spec, seed=seed, progress=progress)
        s = summarize(r)
        bad = [k for k, p in enumerate(plans)
               if p.feasible and s["pools"][p.name]["requests"]
               and not meets(s["pools"][p.name], p.ttft_target_ms, slo_preempt)]
        if not bad:
            return spec, s
        pools = list(spec.pools)
        for k in bad:
            grown = max(pools[k].count + 1, math.ceil(pools[k].count * 1.1))
            if log:
                log(f"  verify: pool {pools[k].name} misses its SLO on the full trace; "
                    f"{pools[k].count} -> {grown}")
            pools[k] = PoolSpec(pools[k].name, pools[k].cfg, grown)
            plans[k].count = grown
        spec = dataclasses.replace(spec, pools=tuple(pools))
    return spec, s


def plan(trace: Trace, gpu: str = "a100", model: str = "llama-3-70b",
         slo_ttft_ms: float = SLO_TTFT_P99_MS, slo_preempt: float = SLO_PREEMPT_PER_1K,
         b_shorts=None, long_max_len: int | None = None, router: str = "oracle",
         tp: int | None = None, seqs=SEQS_CANDIDATES, search_window: float = SEARCH_WINDOW_S,
         seed: int = 0, progress: bool = False, verify: bool = True, noise_p90: float = 0.10,
         price: float | None = None) -> dict:
    log = (lambda m: print(m, file=sys.stderr)) if progress else None
    long_cfg = make_config(gpu, model, max_model_len=long_max_len, tp=tp).validate()
    if price is not None:
        from dataclasses import replace
        long_cfg = long_cfg.with_(gpu=replace(long_cfg.gpu, price_per_hour=price))
    search = trace
    if len(trace) > SEARCH_MAX_REQUESTS and trace.duration > search_window:
        search = window(trace, 0.0, search_window)
    verify = verify and search is not trace
    max_total = int(trace.total.max())
    if b_shorts is None:
        b_shorts = [b for b in AUTO_B_SHORT if b < long_cfg.max_model_len]
    b_shorts = sorted({int(b) for b in b_shorts if int(b) < long_cfg.max_model_len})

    # (a) homogeneous, configured for the worst-case context
    if log:
        log(f"homogeneous pool, max_model_len={long_cfg.max_model_len}")
    homo = best_pool("all", search, long_cfg, slo_ttft_ms, slo_preempt, seqs, seed, log,
                     trace.prompt)
    homo_spec = FleetSpec((PoolSpec("all", homo.cfg, homo.count),))

    # rho: short-pool config vs the worst-case config on the same short traffic
    duals = []
    for b in b_shorts:
        if log:
            log(f"dual pools, B_short={b}")
        spec0 = FleetSpec((PoolSpec("short", long_cfg, 1), PoolSpec("long", long_cfg, 1)),
                          b_short=b, router=router, noise_p90=noise_p90)
        pool_of, budget = route(search, spec0, seed)
        short_tr = search.take(np.nonzero(pool_of == 0)[0], "short")
        long_tr = search.take(np.nonzero(pool_of == 1)[0], "long")
        full_pool, full_budget = route(trace, spec0, seed)
        try:
            short_cfg = long_cfg.with_(max_model_len=b).validate()
        except ConfigError as e:
            duals.append({"b_short": b, "error": str(e)})
            continue
        sp = best_pool("short", short_tr, short_cfg, slo_ttft_ms, slo_preempt, seqs, seed, log,
                       trace.prompt[full_pool == 0]) if len(short_tr) else None
        lp = best_pool("long", long_tr, long_cfg, slo_ttft_ms, slo_preempt, seqs, seed, log,
                       trace.prompt[full_pool == 1]) if len(long_tr) else None
        plans = [p for p in (sp, lp) if p is not None and p.count > 0]
        mu_s = sp.mu if sp else float("nan")
        mu_h_short = closed_form.throughput(homo.cfg, short_tr, seed=seed) if len(short_tr) else float("nan")
        rho = mu_s / mu_h_short if mu_h_short and mu_h_short > 0 else float("nan")
        a = closed_form.alpha(full_budget, b)
        duals.append({"b_short": b, "plans": plans, "alpha": a, "rho": rho,
                      "mu_short": mu_s, "mu_homog_on_short": mu_h_short,
                      "closed_form_savings": closed_form.savings(a, rho) if rho == rho and rho > 0 else float("nan")})

    # verify on the full trace
    if log:
        log("verifying on the full trace")
    if verify:
        homo_spec, homo_sum = _verify(trace, homo_spec, [homo], slo_preempt, seed, progress, log)
    else:
        homo_sum = summarize(simulate(trace, homo_spec, seed=seed))
    homo_gpus = homo_spec.gpus
    rows = []
    for d in duals:
        if "error" in d:
            rows.append(d)
            continue
        plans = d["plans"]
        if not plans:
            continue
        spec = FleetSpec(tuple(PoolSpec(p.name, p.cfg, p.count) for p in plans),
                         b_short=d["b_short"] if len(plans) == 2 else None, router=router,
                         noise_p90=noise_p90)
        if len(plans) == 1:
            # everything routed to one pool: keep the routing (B_short) semantics
            spec = FleetSpec(spec.pools, None, router, noise_p90)
        if verify:
            spec, s = _verify(trace, spec, plans, slo_preempt, seed, progress, log)
        else:
            s = summarize(simulate(trace, spec, seed=seed))
        gpus = spec.gpus
        rows.append({
            "b_short": d["b_short"], "alpha": d["alpha"], "rho": d["rho"],
            "mu_short": d["mu_short"], "mu_homog_on_short": d["mu_homog_on_short"],
            "closed_form_savings": d["closed_form_savings"],
            "gpus": gpus, "instances": spec.instances,
            "savings": 1.0 - gpus / homo_gpus if homo_gpus else float("nan"),
            "feasible": all(p.feasible for p in plans),
            "pools": [p.to_json() for p in plans], "summary": s, "spec": spec.describe(),
        })
    ok_rows = [r for r in rows if "error" not in r and r["feasible"]]
    best = min(ok_rows, key=lambda r: (r["gpus"], r["summary"]["fleet"]["preemptions_per_1k"]),
               default=None)
    if best is not None and best["gpus"] < homo_gpus:
        rec = {"split": True, "b_short": best["b_short"],
               "reason": f"B_short={best['b_short']} saves {best['savings']:.1%} of GPUs "
                         f"({homo_gpus} -> {best['gpus']}) within the SLO"}
    else:
        rec = {"split": False, "b_short": None,
               "reason": "no split is cheaper than one pool at this SLO: keep one pool"}
    return {
        "trace": trace.name, "requests": len(trace), "duration_s": trace.duration,
        "rate_rps": len(trace) / max(trace.duration, 1e-9), "gpu": long_cfg.gpu.name,
        "model": long_cfg.model.name, "tp": long_cfg.tp, "router": router,
        "slo": {"ttft_p99_ms": slo_ttft_ms, "preemptions_per_1k": slo_preempt},
        "search_requests": len(search), "max_total_tokens": max_total,
        "homogeneous": {"gpus": homo_gpus, "instances": homo_spec.instances,
                        "pool": homo.to_json(), "summary": homo_sum, "spec": homo_spec.describe()},
        "dual": rows, "recommendation": rec,
    }

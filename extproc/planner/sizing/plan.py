"""Planner v2: what each design costs at the latency each class of request gets.

Designs compared (docs/planner.md):

* ``baseline`` -- the operator's homogeneous fleet as they run it today
  (``--baseline``): evaluated as is with ``instances=N``, else sized.
* ``homogeneous-best`` -- the cheapest single pool the config search finds
  (GPU, TP, max_num_seqs, max_num_batched_tokens, and vLLM's long-prefill
  mitigations), so a split is never compared with a strawman only.
* ``split-B`` -- a short pool (max_model_len = B) and a long pool per candidate
  B_short, each pool's config searched the same way.

Every design is sized and judged by the same per-class targets (`slo.py`).
Method:
1. Analytic pre-sizing: each candidate config's sustainable throughput on its
   pool's traffic (`closed_form.throughput`); rate / throughput starts the
   search, and the cheapest candidates by that estimate are simulated.
2. Monotone bisection on a *seed-averaged* criterion: every instance count
   tried is simulated over all seeds (`traces.perturb`) and the mean per-class
   P99s decide. Long traces are searched on a window.
3. Each final design is simulated on the whole trace for every seed and grown
   until the seed-averaged criterion holds; the per-seed minimal sizes from the
   search give ``seed_spread_gpus``.
4. A split is recommended only when its saving over the best homogeneous
   design exceeds the seed spread plus the search tolerance.

Work runs on a process pool over all cores (``workers``).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import closed_form
from ..sim.balancers import DEFAULT_BALANCER
from ..sim.fleet import FleetSpec, PoolSpec, route, simulate
from ..sim.hardware import (GPUS, LONG_PREFILL_FRACTION, MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS,
                       ConfigError, InstanceConfig, GPU_MEMORY_UTILIZATION, make_config)
from ..sim.metrics import average, summarize
from .slo import SLO, judge, ok, targets
from ..sim.traces import Trace, perturb, window

#: Candidate B_short values for `--b-short auto`: the 8K-16K range production
#: splits use, plus 4K and 32K to show the trend on both sides.
AUTO_B_SHORT = (4096, 8192, 16384, 32768)

#: Seeds per design (arrival jitter + sampling, `traces.perturb`); the issue's
#: floor of 3 is what gives a spread at all.
SEEDS = 3

#: Search grid per pool. max_num_seqs: vLLM's 256 default and half of it (less
#: KV pressure, fewer preemptions). max_num_batched_tokens: vLLM's 8192 default
#: and 2048 (vLLM's pre-V1 chunked-prefill default: shorter steps, lower TPOT).
SEARCH_SEQS = (MAX_NUM_SEQS, 128)
SEARCH_MBTS = (MAX_NUM_BATCHED_TOKENS, 2048)

#: The homogeneous alternative's long-prefill mitigation: a threshold of 4% of
#: max_model_len (vLLM's suggestion) with 4 concurrent partial prefills.
MITIGATION_PARTIAL_PREFILLS = 4

#: Candidates per pool simulated after analytic pre-sizing (cheapest first).
TOP_K = 1

#: Traces over SEARCH_MAX_REQUESTS requests are searched on a window of
#: SEARCH_WARMUP_S + SEARCH_WINDOW_S seconds (x SEEDS runs per count) whose
#: first SEARCH_WARMUP_S are simulated but not measured (the fleet starts
#: empty, so an unmeasured warm-up keeps the window from being optimistic),
#: then verified on the whole trace. 20 s at 1,000 req/s is 20K measured
#: requests: dozens of batch turnovers per instance.
SEARCH_WINDOW_S = 20.0
SEARCH_WARMUP_S = 5.0
SEARCH_MAX_REQUESTS = 20000

#: The bisection stops when the bracket is within 2% of the count (or 1): a
#: seed-averaged P99 is still noisier than that.
SIZE_TOLERANCE = 0.02

#: Steps of the search from the analytic start: down by DOWN, up by UP, at most
#: MAX_GROWTH x the start before a pool is declared infeasible.
DOWN, UP, MAX_GROWTH = 0.8, 1.25, 64

#: Shrink steps (x DOWN each) of the first tier when the router's closed loop
#: is on: spillover lends it the larger tiers' headroom, so it may need fewer
#: instances than sized alone; a few steps of 20% cover the 47-53%
#: multiplexing loss the planner measured on Mooncake (issue 10).
CLOSED_LOOP_SHRINK_STEPS = 4

#: Verification rounds on the full trace (each grows failing pools by 5%).
VERIFY_ROUNDS = 6
VERIFY_GROWTH = 0.05


# --- inputs ---------------------------------------------------------------------

@dataclass(frozen=True)
class Baseline:
    """The operator's homogeneous fleet as it runs today."""

    gpu: str = "a100"
    tp: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int = MAX_NUM_SEQS
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    instances: int | None = None

    def config(self, model: str) -> InstanceConfig:
        return make_config(self.gpu, model, self.max_model_len, self.tp,
                           max_num_seqs=self.max_num_seqs,
                           max_num_batched_tokens=self.max_num_batched_tokens,
                           gpu_memory_utilization=self.gpu_memory_utilization).validate()


_BASELINE_KEYS = {"gpu": str, "tp": int, "max_model_len": int, "max_num_seqs": int,
                  "max_num_batched_tokens": int, "gpu_memory_utilization": float, "instances": int}


def parse_baseline(text: str | None, gpu: str = "a100") -> Baseline:
    """'gpu=a100,tp=4,...,instances=N' or the path of a TOML file with those keys
    (top level or under [baseline])."""
    raw: dict = {}
    if text and os.path.isfile(text):
        with open(text, "rb") as f:
            doc = tomllib.load(f)
        raw = dict(doc.get("baseline", doc))
    elif text:
        for part in text.split(","):
            if part.strip():
                k, sep, v = part.partition("=")
                if not sep:
                    raise ValueError(f"--baseline {part!r}: expected KEY=VALUE")
                raw[k.strip()] = v.strip()
    unknown = sorted(set(raw) - set(_BASELINE_KEYS))
    if unknown:
        raise ValueError(f"--baseline: unknown key(s) {', '.join(unknown)}; known: {', '.join(_BASELINE_KEYS)}")
    kw = {"gpu": gpu}
    for k, v in raw.items():
        try:
            kw[k] = _BASELINE_KEYS[k](v)
        except ValueError:
            raise ValueError(f"--baseline {k}={v!r}: expected {_BASELINE_KEYS[k].__name__}") from None
    if kw["gpu"] not in GPUS:
        raise ValueError(f"--baseline gpu={kw['gpu']!r}: known {', '.join(GPUS)}")
    if kw.get("instances") is not None and kw["instances"] < 1:
        raise ValueError("--baseline instances must be >= 1")
    return Baseline(**kw)


@dataclass(frozen=True)
class Space:
    """The per-pool config search space."""

    gpus: tuple = ()  # () = the baseline's GPU
    tps: tuple = (None,)  # None = the model's default TP for the GPU
    seqs: tuple = SEARCH_SEQS
    mbts: tuple = SEARCH_MBTS

    def configs(self, model: str, base: InstanceConfig, max_model_len: int,
                mitigation: bool = False) -> list[InstanceConfig]:
        out = []
        for g in self.gpus or (base.gpu_key(),):
            for tp in self.tps:
                for s in self.seqs:
                    for m in self.mbts:
                        try:
                            c = make_config(g, model, max_model_len, tp, max_num_seqs=int(s),
                                            max_num_batched_tokens=int(m),
                                            gpu_memory_utilization=base.gpu_memory_utilization)
                            if base.gpu.name == c.gpu.name:  # keep a custom price
                                c = c.with_(gpu=base.gpu)
                            if mitigation:
                                c = c.with_(long_prefill_token_threshold=max(
                                    base.block_size, int(LONG_PREFILL_FRACTION * max_model_len)),
                                    max_num_partial_prefills=MITIGATION_PARTIAL_PREFILLS)
                            out.append(c.validate())
                        except ConfigError:
                            continue
        return out


def _cost(cfg: InstanceConfig, n: int) -> float:
    return n * cfg.tp * cfg.gpu.price_per_hour


# --- process pool ------------------------------------------------------------------

class _Pool:
    """map() over a process pool (fork) when workers > 1, else in process."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.ex = None
        if self.workers > 1:
            self.ex = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"))

    def map(self, fn, items: list, cost=None) -> list:
        """[fn(x) for x in items], in parallel. ``cost(x)``: an estimate of the
        work of x; the costliest items are submitted first (longest processing
        time first), so a long job does not start last and leave a core idle.
        The results come back in the order of ``items`` whatever the order run."""
        if self.ex is None or len(items) <= 1:
            return [fn(x) for x in items]
        order = list(range(len(items)))
        if cost is not None:
            order.sort(key=lambda k: -cost(items[k]))
        out = [None] * len(items)
        for k, r in zip(order, self.ex.map(fn, [items[k] for k in order])):
            out[k] = r
        return out

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown()


def _mu_job(a) -> float:
    cfg, tr, seed = a
    return closed_form.throughput(cfg, tr, seed=seed) if len(tr) else 0.0


def _eval(tr: Trace, spec: FleetSpec, seed: int, boundary: int, measure_from: float = 0.0) -> dict:
    return summarize(simulate(perturb(tr, seed), spec, seed=seed), boundary, measure_from)


def _eval_job(a) -> dict:
    return _eval(*a)


@dataclass
class Sized:
    name: str
    cfg: InstanceConfig
    count: int
    feasible: bool
    mu: float
    rate: float
    per_seed: list = field(default_factory=list)  # minimal count per seed (None: not found)
    tried: list = field(default_factory=list)
    cliff: int | None = None  # largest count tried whose preemptions exceed the SLO

    def to_json(self) -> dict:
        return {"name": self.name, "count": self.count, "config": self.cfg.to_json(),
                "label": self.cfg.label(), "vllm_args": self.cfg.vllm_args(),
                "mu_rps": self.mu, "rate_rps": self.rate, "feasible": self.feasible,
                "per_seed_counts": self.per_seed, "preemption_cliff_instances": self.cliff,
                "tried": self.tried}


def _size_job(a) -> Sized:
    name, tr, cfg, tg, slo, seeds, mu, balancer, warmup = a
    return size_pool(name, tr, cfg, tg, slo, seeds, mu, balancer, warmup)


def size_pool(name: str, tr: Trace, cfg: InstanceConfig, tg: dict, slo: SLO, seeds, mu: float,
              balancer: str = DEFAULT_BALANCER, warmup: float = 0.0) -> Sized:
    """Smallest count of `cfg` whose seed-averaged per-class P99s meet `tg`.

    Phase 1 brackets and bisects on the first seed alone (cheap); phase 2
    bisects on the mean over all seeds around that point, so the seed average
    decides the answer while the other seeds run only near the boundary.
    """
    rate = len(tr) / max(tr.duration, 1e-9)
    runs: dict[tuple[int, int], dict] = {}  # (count, seed) -> summary
    tried: dict[int, dict] = {}

    def run(n: int, ss) -> dict:
        spec = FleetSpec((PoolSpec(name, cfg, n),), balancer=balancer)
        for x in ss:
            if (n, x) not in runs:
                runs[n, x] = _eval(tr, spec, x, slo.boundary, warmup)
        avg = average([runs[n, x] for x in ss])
        f = avg["fleet"]
        tried[n] = {"count": n, "seeds": len(ss), "ok": ok(avg, tg, slo),
                    "preempt_per_1k": f["preemptions_per_1k"],
                    **{f"{c}_ttft_p99_ms": avg["classes"][c]["ttft_p99_ms"] for c in tg},
                    **{f"{c}_tpot_p99_ms": avg["classes"][c]["tpot_p99_ms"] for c in tg}}
        return avg

    def search(good, start: int, cap: int, limit: int) -> tuple[int, int, bool]:
        """(lo failing, hi meeting, feasible) for a monotone criterion."""
        if good(start):
            hi, lo = start, 0
            while hi > 1:
                m = max(1, min(hi - 1, int(hi * DOWN)))
                if good(m):
                    hi = m
                else:
                    lo = m
                    break
        else:
            lo, hi = start, None
            while hi is None:
                m = min(cap, max(lo + 1, math.ceil(lo * UP)))
                if good(m):
                    hi = m
                elif m >= cap or m >= limit:
                    return m, m, False
                else:
                    lo = m
        while hi - lo > max(1, SIZE_TOLERANCE * hi):
            mid = (lo + hi) // 2
            if good(mid):
                hi = mid
            else:
                lo = mid
        return lo, hi, True

    cap = max(1, len(tr))
    start = min(cap, max(1, math.ceil(rate / mu))) if mu > 0 else 1
    limit = start * MAX_GROWTH
    lo, hi, feasible = search(lambda n: ok(run(n, seeds[:1]), tg, slo), start, cap, limit)
    if feasible and len(seeds) > 1:
        lo, hi, feasible = search(lambda n: ok(run(n, seeds), tg, slo), hi, cap, limit)
    per_seed = []
    counts = sorted({n for n, _ in runs})
    for x in seeds:
        best = None
        for n in reversed(counts):  # smallest n from which every larger run of this seed meets
            if (n, x) not in runs:
                continue
            if ok(runs[n, x], tg, slo):
                best = n
            else:
                break
        per_seed.append(best)
    bad = [n for n in counts if runs[n, seeds[0]]["fleet"]["preemptions_per_1k"] > slo.preempt_per_1k]
    return Sized(name, cfg, hi, feasible, mu, rate, per_seed, [tried[n] for n in sorted(tried)],
                 max(bad) if bad else None)


# --- designs ----------------------------------------------------------------------

def _spec(d: dict, router: str, noise_p90: float, balancer: str) -> FleetSpec:
    """The fleet of a design: its sized pools, its tier limits (one fewer than
    its pools; a split whose short pool got no traffic is one pool) and the
    router's closed loop when the design has it on."""
    pools = d["sized"]
    limits = tuple(d.get("limits") or (d["b_short"],))[:len(pools) - 1]
    return FleetSpec(tuple(PoolSpec(p.name, p.cfg, p.count) for p in pools),
                     b_short=limits[0] if limits else None, limits=limits or None, router=router,
                     noise_p90=noise_p90, balancer=balancer,
                     spillover=bool(d.get("spillover")), adaptive=bool(d.get("adaptive")))


def _check_tiers(tiers, mml: int) -> tuple | None:
    if not tiers:
        return None
    tiers = tuple(int(t) for t in tiers)
    if len(tiers) < 2 or list(tiers) != sorted(set(tiers)) or tiers[-1] > mml:
        raise ValueError(f"--tiers {','.join(map(str, tiers))}: 2+ increasing context lengths, "
                         f"the last <= the baseline's max_model_len {mml}")
    return tiers


def _eval_unique(ex: _Pool, jobs: list, cache: dict) -> list:
    """`_eval_job` over jobs, each distinct (fleet, seed) simulated once: designs
    that come out the same (the sized baseline is often the best homogeneous
    pool) share their runs, and a design not grown in a round is not rerun.
    Results are the same as simulating every job: `simulate` is pure."""
    keys = [(repr(j[1]), *j[2:]) for j in jobs]
    todo = {}
    for k, j in zip(keys, jobs):
        if k not in cache and k not in todo:
            todo[k] = j
    for k, r in zip(todo, ex.map(_eval_job, list(todo.values()), cost=lambda j: j[1].instances)):
        cache[k] = r
    return [cache[k] for k in keys]


def _verify(ex: _Pool, trace: Trace, designs: list[dict], tg: dict, slo: SLO, seeds,
            router: str, noise_p90: float, balancer: str, log) -> None:
    """Simulate every design on the whole trace for every seed (in parallel);
    grow the pools that miss their class targets until the seed average holds."""
    todo = [d for d in designs if d.get("pinned") is not True]
    pinned = [d for d in designs if d.get("pinned") is True]
    cache: dict = {}
    for rnd in range(VERIFY_ROUNDS + 1):
        batch = todo + (pinned if rnd == 0 else [])
        jobs = [(trace, _spec(d, router, noise_p90, balancer), s, slo.boundary)
                for d in batch for s in seeds]
        res = _eval_unique(ex, jobs, cache)
        again = []
        for k, d in enumerate(batch):
            sums = res[k * len(seeds):(k + 1) * len(seeds)]
            d["summary"] = average(sums)
            d["per_seed_fleet"] = [dict(seed=s, **{c: {"ttft_p99_ms": x["classes"][c]["ttft_p99_ms"],
                                                       "tpot_p99_ms": x["classes"][c]["tpot_p99_ms"]}
                                                   for c in tg},
                                        preempt_per_1k=x["fleet"]["preemptions_per_1k"])
                                   for s, x in zip(seeds, sums)]
            if d.get("pinned") is True or ok(d["summary"], tg, slo) or rnd == VERIFY_ROUNDS:
                continue
            grew = False
            for p in d["sized"]:
                ps = d["summary"]["pools"][p.name]
                pool_view = {"fleet": ps, "classes": ps["classes"]}
                if not ok(pool_view, tg, slo):
                    new = max(p.count + 1, math.ceil(p.count * (1 + VERIFY_GROWTH)))
                    if log:
                        log(f"  verify {d['name']}: pool {p.name} misses on the whole trace; "
                            f"{p.count} -> {new}")
                    p.count = new
                    grew = True
            if grew:
                again.append(d)
        todo = again
        if not todo:
            break


def _design_json(d: dict, tg: dict, slo: SLO, base_cost: float) -> dict:
    sized: list[Sized] = d["sized"]
    s = d["summary"]
    cls = judge(s, tg, slo)
    gpus = sum(p.count * p.cfg.tp for p in sized)
    cost = sum(_cost(p.cfg, p.count) for p in sized)
    spread = 0
    band = [0, 0]
    for p in sized:
        ks = [k for k in p.per_seed if k is not None]
        if ks and not d.get("pinned"):
            spread += (max(ks) - min(ks)) * p.cfg.tp
            band[0] += min(ks) * p.cfg.tp
            band[1] += max(ks) * p.cfg.tp
        else:
            band[0] += p.count * p.cfg.tp
            band[1] += p.count * p.cfg.tp
    f = s["fleet"]
    return {
        "name": d["name"], "kind": d["kind"], "b_short": d["b_short"],
        "limits": list(_spec(d, "oracle", 0.0, DEFAULT_BALANCER).tier_limits) if len(sized) > 1 else [],
        "spillover": bool(d.get("spillover")), "adaptive": bool(d.get("adaptive")),
        "what": d["what"], "gpus": gpus, "usd_per_hour": cost,
        "savings_vs_baseline": 1.0 - cost / base_cost if base_cost else float("nan"),
        "instances": {p.name: p.count for p in sized},
        "pools": [p.to_json() for p in sized],
        "classes": cls,
        "meets": bool(all(c["meets"] for c in cls.values()) and f["preemptions_per_1k"] <= slo.preempt_per_1k),
        "meets_effective": bool(ok(s, tg, slo)),
        "feasible": all(p.feasible for p in sized),
        "preempt_per_1k": f["preemptions_per_1k"], "rejected": int(round(f["rejected"])),
        "seed_spread_gpus": spread, "seed_band_gpus": band,
        "gpu_busy": f["gpu_busy"], "kv_util": f["kv_util"], "prefix_hit_rate": f["prefix_hit_rate"],
        "preemption_cliff_instances": {p.name: p.cliff for p in sized},
        "per_seed": d["per_seed_fleet"],
        "alpha": d.get("alpha"), "rho": d.get("rho"),
        "closed_form_savings": d.get("closed_form"),
        "summary": s,
    }


def plan(trace: Trace, model: str = "llama-3-70b", baseline: Baseline | None = None,
         slo: SLO | None = None, b_shorts=None, space: Space | None = None,
         router: str = "oracle", balancer: str = DEFAULT_BALANCER, seeds: int = SEEDS,
         search_window: float = SEARCH_WINDOW_S, workers: int | None = None,
         noise_p90: float = 0.10, price: float | None = None, progress: bool = False,
         verify: bool = True, tiers=None, spillover: bool = False, adaptive: bool = False) -> dict:
    """Size and compare the designs (module doc). ``tiers`` (context lengths,
    e.g. (8192, 32768, 131072)) adds an N-tier design; ``spillover`` /
    ``adaptive`` add each split design again with the router's closed loop on."""
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else None
    baseline = baseline or Baseline()
    slo = slo or SLO()
    space = space or Space()
    base_cfg = baseline.config(model)
    if price is not None:
        from dataclasses import replace
        base_cfg = base_cfg.with_(gpu=replace(base_cfg.gpu, price_per_hour=price))
    mml = base_cfg.max_model_len
    seed_list = list(range(max(1, seeds)))
    search, warmup = trace, 0.0
    if len(trace) > SEARCH_MAX_REQUESTS and trace.duration > search_window + SEARCH_WARMUP_S:
        search, warmup = window(trace, 0.0, search_window + SEARCH_WARMUP_S), SEARCH_WARMUP_S
    tg = targets(slo, base_cfg, trace.prompt, trace.total)
    if log:
        for c, t in tg.items():
            if t["infeasible"]:
                log(f"class {c}: target TTFT {t['ttft_slo_ms']:.0f} ms / TPOT {t['tpot_slo_ms']:.0f} ms "
                    f"is INFEASIBLE on an idle {base_cfg.label()} (idle P99 TTFT "
                    f"{t['idle_ttft_p99_ms']:.0f} ms, TPOT {t['idle_tpot_p99_ms']:.1f} ms): every design "
                    f"is held to {t['ttft_target_ms']:.0f} / {t['tpot_target_ms']:.1f} ms instead")
    if b_shorts is None:
        b_shorts = AUTO_B_SHORT
    b_shorts = sorted({int(b) for b in b_shorts if int(b) < mml})
    ex = _Pool(workers if workers is not None else (os.cpu_count() or 1))
    try:
        return _plan(ex, trace, search, warmup, model, baseline, base_cfg, slo, tg, b_shorts, space,
                     router, balancer, seed_list, noise_p90, verify, log, _check_tiers(tiers, mml),
                     {k: True for k, v in (("spillover", spillover), ("adaptive", adaptive)) if v})
    finally:
        ex.close()


def tier_names(n: int) -> list[str]:
    """Pool names of n context tiers: short, tier1 ... tier(n-2), long (as
    `budget-router simulate --tiers` names them)."""
    return ["short", *(f"tier{i}" for i in range(1, n - 1)), "long"]


def _tier_traffic(search: Trace, pool_of: np.ndarray, names, lengths) -> list:
    """(name, max_model_len, the requests routed to it) per tier."""
    return [(n, int(m), search.take(np.nonzero(pool_of == k)[0], n))
            for k, (n, m) in enumerate(zip(names, lengths))]


def _closed_loop_designs(ex, search, warmup, splits: list[dict], flags: dict, tg, slo, seeds, router,
                         noise_p90, balancer, log) -> list[dict]:
    """Each split design again with the router's closed loop (``flags``:
    spillover, adaptive) on, as `fleet.loop_hook` runs it. Starting from the
    statically sized pools, the first tier -- the one spillover relieves -- is
    shrunk by DOWN while the whole fleet, closed loop on, still meets every
    class target (seed average) on the search window, then bisected to
    SIZE_TOLERANCE; `_verify` then checks the whole trace and grows any pool
    that misses."""
    tag = "+".join(k for k in ("spillover", "adaptive") if flags.get(k))
    out = []

    def meets(nd: dict, n: int) -> bool:  # the fleet, its first tier at n instances
        nd["sized"][0].count = n
        spec = _spec(nd, router, noise_p90, balancer)
        return ok(average(_eval_unique(ex, [(search, spec, x, slo.boundary, warmup) for x in seeds], {})),
                  tg, slo)

    for d in splits:
        if len(d["sized"]) < 2:
            continue
        pools = [Sized(p.name, p.cfg, p.count, p.feasible, p.mu, p.rate, list(p.per_seed), p.tried, p.cliff)
                 for p in d["sized"]]
        nd = {**d, "name": f"{d['name']}+{tag}", "sized": pools, **flags,
              "what": d["what"] + f"; router {tag} on"}
        first = pools[0]
        hi, lo = first.count, 0  # hi meets (the static sizing), lo fails
        for _ in range(CLOSED_LOOP_SHRINK_STEPS):
            n = max(1, int(hi * DOWN))
            if n == hi:
                break
            if not meets(nd, n):
                lo = n
                break
            hi = n
        while lo and hi - lo > max(1, SIZE_TOLERANCE * hi):
            mid = (lo + hi) // 2
            if meets(nd, mid):
                hi = mid
            else:
                lo = mid
        if log and hi != d["sized"][0].count:
            log(f"  {nd['name']}: pool {first.name} {d['sized'][0].count} -> {hi} meets with the closed loop")
        first.count = hi
        out.append(nd)
    return out


def _plan(ex, trace, search, warmup, model, baseline, base_cfg, slo, tg, b_shorts, space, router,
          balancer, seeds, noise_p90, verify, log, tiers=None, closed_loop=None) -> dict:
    mml = base_cfg.max_model_len
    # routes per B_short (search window and whole trace); identical routings collapse
    splits = []
    seen = {}
    for b in b_shorts:
        spec0 = FleetSpec((PoolSpec("short", base_cfg, 1), PoolSpec("long", base_cfg, 1)), b_short=b,
                          router=router, noise_p90=noise_p90)
        pool_of, _ = route(search, spec0, 0)
        full_pool, full_budget = route(trace, spec0, 0)
        key = full_pool.tobytes()
        if key in seen:
            if log:
                log(f"B_short={b}: same routing as B_short={seen[key]}; skipped")
            continue
        seen[key] = b
        splits.append({"b": b, "limits": (b,), "name": f"split-{b}",
                       "tiers": _tier_traffic(search, pool_of, ("short", "long"), (b, mml)),
                       "alpha": closed_form.alpha(full_budget, b)})
    if tiers:  # --tiers: one more design, a pool per context tier
        names = tier_names(len(tiers))
        spec0 = FleetSpec(tuple(PoolSpec(n, base_cfg, 1) for n in names), b_short=tiers[0],
                          limits=tuple(tiers[:-1]), router=router, noise_p90=noise_p90)
        pool_of, _ = route(search, spec0, 0)
        splits.append({"b": tiers[0], "limits": tuple(tiers[:-1]),
                       "name": "tiers-" + "-".join(map(str, tiers)),
                       "tiers": _tier_traffic(search, pool_of, names, tiers),
                       "alpha": float("nan")})

    # 1) analytic pre-sizing: throughput of every candidate config on its traffic
    cands = []  # (role, split index or None, cfg, trace)
    homog = space.configs(model, base_cfg, mml) + space.configs(model, base_cfg, mml, mitigation=True)
    cands += [("homogeneous", None, c, search) for c in homog]
    if baseline.instances is None:
        cands.append(("baseline", None, base_cfg, search))
    for k, sp in enumerate(splits):
        for role, length, tr in sp["tiers"]:
            if len(tr) == 0:
                continue
            for c in space.configs(model, base_cfg, length):
                cands.append((role, k, c, tr))
        short = sp["tiers"][0][2]
        if len(sp["tiers"]) == 2 and len(short):  # rho's denominator: the baseline config on short traffic
            cands.append(("rho", k, base_cfg, short))
    if log:
        log(f"pre-sizing {len(cands)} candidate configs (throughput runs, {ex.workers} workers)")
    mus = ex.map(_mu_job, [(c, tr, 0) for _, _, c, tr in cands])

    def best(role, k, n=TOP_K):
        xs = [(c, tr, mu) for (r, kk, c, tr), mu in zip(cands, mus) if r == role and kk == k and mu > 0]
        rate = lambda tr: len(tr) / max(tr.duration, 1e-9)  # noqa: E731
        xs.sort(key=lambda x: _cost(x[0], math.ceil(rate(x[1]) / x[2])))
        return xs[:n]

    # 2) sizing jobs (monotone bisection on the seed-averaged criterion), in parallel
    jobs, owners = [], []
    if baseline.instances is None:
        for c, tr, mu in best("baseline", None):
            jobs.append(("all", tr, c, tg, slo, seeds, mu, balancer, warmup))
            owners.append(("baseline", None))
    plain = best("homogeneous", None, len(homog))
    chosen = [x for x in plain if not x[0].long_prefill_token_threshold][:TOP_K]
    chosen += [x for x in plain if x[0].long_prefill_token_threshold][:TOP_K]
    for c, tr, mu in chosen:
        jobs.append(("all", tr, c, tg, slo, seeds, mu, balancer, warmup))
        owners.append(("homogeneous", None))
    for k, sp in enumerate(splits):
        for role, _, _ in sp["tiers"]:
            for c, tr, mu in best(role, k):
                jobs.append((role, tr, c, tg, slo, seeds, mu, balancer, warmup))
                owners.append((role, k))
    key = lambda j: (id(j[1]), repr(j[2]))  # noqa: E731  same traffic, same config: one job
    uniq: dict[tuple, int] = {}
    ujobs = []
    for j in jobs:
        if key(j) not in uniq:
            uniq[key(j)] = len(ujobs)
            ujobs.append(j)
    if log:
        log(f"sizing {len(ujobs)} pools (of {len(jobs)} roles) x {len(seeds)} seeds on "
            f"{len(search):,} requests")
    done = ex.map(_size_job, ujobs, cost=lambda j: len(j[1]))
    sized = []
    for j in jobs:
        s0 = done[uniq[key(j)]]
        sized.append(Sized(j[0], s0.cfg, s0.count, s0.feasible, s0.mu, s0.rate, list(s0.per_seed),
                           s0.tried, s0.cliff))

    def pick(role, k):
        xs = [s for s, o in zip(sized, owners) if o == (role, k)]
        xs.sort(key=lambda s: (not s.feasible, _cost(s.cfg, s.count)))
        return xs[0] if xs else None

    designs = []
    if baseline.instances is None:
        b0 = pick("baseline", None)
    else:
        b0 = Sized("all", base_cfg, baseline.instances, True, 0.0, len(trace) / max(trace.duration, 1e-9))
    designs.append({"name": "baseline", "kind": "homogeneous", "b_short": None, "sized": [b0],
                    "pinned": baseline.instances is not None,
                    "what": f"the operator's fleet: {base_cfg.label()}"
                            + (" (pinned)" if baseline.instances is not None else " (sized)")})
    h = pick("homogeneous", None)
    if h is not None:
        designs.append({"name": "homogeneous-best", "kind": "homogeneous", "b_short": None, "sized": [h],
                        "what": f"best single pool found: {h.cfg.label()}"})
    rho_mu = {kk: mu for (r, kk, _, _), mu in zip(cands, mus) if r == "rho"}
    for k, sp in enumerate(splits):
        kept = [(pick(role, k), length) for role, length, _ in sp["tiers"]]
        kept = [(p, length) for p, length in kept if p is not None]
        pools = [p for p, _ in kept]
        if not pools:
            continue
        s = pools[0] if pools[0].name == "short" else None
        rho = (s.mu / rho_mu[k]) if s is not None and rho_mu.get(k) else float("nan")
        cf = closed_form.savings(sp["alpha"], rho) if rho == rho and rho > 0 else float("nan")
        what = (f"short pool max_model_len={sp['b']} + long pool {mml}: " if len(sp["tiers"]) == 2 else
                f"{len(sp['tiers'])} context tiers {'/'.join(str(t[1]) for t in sp['tiers'])}: ")
        designs.append({"name": sp["name"], "kind": "split", "b_short": sp["b"], "sized": pools,
                        "limits": tuple(length for _, length in kept[:-1]),
                        "alpha": sp["alpha"], "rho": rho, "closed_form": cf,
                        "what": what + " + ".join(f"{p.name} {p.cfg.label()}" for p in pools)})
    if closed_loop:  # --spillover / --adaptive: each split again with the router's closed loop on
        designs += _closed_loop_designs(ex, search, warmup, [d for d in designs if d["kind"] == "split"],
                                        closed_loop, tg, slo, seeds, router, noise_p90, balancer, log)

    # 3) every design on the whole trace, every seed
    if log:
        log(f"verifying {len(designs)} designs x {len(seeds)} seeds on {len(trace):,} requests")
    _verify(ex, trace, designs, tg, slo, seeds, router, noise_p90, balancer, log if verify else None)
    base_cost = sum(_cost(p.cfg, p.count) for p in designs[0]["sized"])
    out = [_design_json(d, tg, slo, base_cost) for d in designs]
    return {
        "version": 2, "trace": trace.name, "requests": len(trace), "duration_s": trace.duration,
        "rate_rps": len(trace) / max(trace.duration, 1e-9), "model": base_cfg.model.name,
        "router": router, "balancer": balancer, "seeds": seeds,
        "slo": {"class_boundary": slo.boundary, "ttft_p99_ms": slo.ttft_ms, "tpot_p99_ms": slo.tpot_ms,
                "preempt_per_1k": slo.preempt_per_1k, "targets": tg,
                "infeasible": any(t["infeasible"] for t in tg.values())},
        "baseline": {**baseline.__dict__, "config": base_cfg.to_json()},
        "search": {"requests": len(search), "window_s": search.duration, "warmup_s": warmup,
                   "tolerance": SIZE_TOLERANCE,
                   "gpus": list(space.gpus) or [base_cfg.gpu_key()], "tps": list(space.tps),
                   "max_num_seqs": list(space.seqs), "max_num_batched_tokens": list(space.mbts),
                   "b_short": [sp["b"] for sp in splits if len(sp["tiers"]) == 2],
                   "tiers": list(tiers) if tiers else None, "closed_loop": sorted(closed_loop or {}),
                   "candidates": len(cands)},
        "designs": out,
        "recommendation": recommend(out),
    }


def recommend(designs: list[dict]) -> dict:
    """The cheapest design meeting the (effective) targets; a split only when it
    beats the best homogeneous design by more than seed spread + tolerance."""
    good = [d for d in designs if d["meets_effective"] and d["feasible"]]
    homs = [d for d in good if d["kind"] == "homogeneous"]
    sps = [d for d in good if d["kind"] == "split"]
    best_h = min(homs, key=lambda d: d["usd_per_hour"], default=None)
    best_s = min(sps, key=lambda d: (d["usd_per_hour"], d["preempt_per_1k"]), default=None)
    cf_src = best_s or min((d for d in designs if d["kind"] == "split"),
                           key=lambda d: d["usd_per_hour"], default=None)
    closed = {"alpha": cf_src["alpha"] if cf_src else None, "rho": cf_src["rho"] if cf_src else None,
              "predicted": cf_src["closed_form_savings"] if cf_src else None,
              "b_short": cf_src["b_short"] if cf_src else None}
    if best_h is None and best_s is None:
        return {"design": None, "savings_vs_baseline": None, "closed_form": closed, "split": False,
                "margin": None,
                "why": "no design meets the per-class targets within the search bounds"}
    if best_s is not None and best_h is not None:
        saving = 1.0 - best_s["usd_per_hour"] / best_h["usd_per_hour"]
        noise = ((best_s["seed_spread_gpus"] + best_h["seed_spread_gpus"]) / max(best_h["gpus"], 1)
                 + 2 * SIZE_TOLERANCE)
        margin = saving - noise
        if margin > 0:
            d = best_s
            why = (f"{d['name']} costs {saving:.1%} less than the best single pool ({best_h['name']}) at "
                   f"equal per-class SLOs, {margin:.1%} above seed spread + search tolerance ({noise:.1%})")
        elif saving <= 0:
            d = best_h
            why = (f"the best split ({best_s['name']}) costs {-saving:.1%} more than {best_h['name']} at "
                   f"equal per-class SLOs: keep one pool")
        else:
            d = best_h
            why = (f"the best split ({best_s['name']}) saves {saving:.1%} over {best_h['name']}, within "
                   f"seed spread + search tolerance ({noise:.1%}): keep one pool")
    elif best_h is not None:
        d, margin = best_h, None
        why = f"no split meets the per-class targets; {best_h['name']} is the cheapest that does"
    else:
        d, margin = best_s, None
        why = f"only splits meet the per-class targets; {best_s['name']} is the cheapest"
    base = designs[0]
    if base["name"] == "baseline" and not base["meets_effective"]:
        why += "; note: the baseline as pinned misses the per-class targets"
    return {"design": d["name"], "savings_vs_baseline": d["savings_vs_baseline"], "closed_form": closed,
            "split": d["kind"] == "split", "margin": margin, "why": why}

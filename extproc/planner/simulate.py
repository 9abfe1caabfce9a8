"""`budget-router simulate --deployment DIR/deployment.json`: re-simulate an
emitted plan (`report.emit`) on any trace and horizon, and say whether each
class still meets its targets and each pool holds in steady state (issue 16
item 3: "will last month's plan hold next month")."""
from __future__ import annotations

import math

import orjson

from .sim.balancers import DEFAULT_BALANCER
from .sim.fleet import FleetSpec, PoolSpec, SimResult, simulate
from .sim.hardware import GPUS, MODELS, ConfigError, InstanceConfig, make_config
from .sim.metrics import CLASSES, summarize
from .sim.traces import Trace, perturb
from .sizing.slo import CLASS_BOUNDARY, SLO_PREEMPT_PER_1K, SLO_TPOT_P99_MS, SLO_TTFT_P99_MS, class_ok
from .sizing.steady import verdict

#: The scheduler knobs of an emitted pool's `config` rebuilt as they were planned.
_KNOBS = ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization",
          "long_prefill_token_threshold", "max_num_partial_prefills")


def load_deployment(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            dep = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError) as e:
        raise ConfigError(f"--deployment {path}: {e}") from None
    if not isinstance(dep, dict) or not dep.get("pools"):
        raise ConfigError(f"--deployment {path}: no pools (expected `plan --emit`'s deployment.json)")
    if any("config" not in p for p in dep["pools"]):
        raise ConfigError(f"--deployment {path}: pools carry no `config`; re-emit it with this version's "
                          f"`plan --emit`")
    return dep


def _model_key(name: str) -> str:
    for k, m in MODELS.items():
        if name in (k, m.name):
            return k
    raise ConfigError(f"deployment model {name!r}: known {', '.join(MODELS)}")


def pool_config(c: dict) -> InstanceConfig:
    """An emitted pool's `config` (`InstanceConfig.to_json`) as the config it was planned with."""
    if c["gpu"] not in GPUS:
        raise ConfigError(f"deployment gpu {c['gpu']!r}: known {', '.join(GPUS)}")
    return make_config(c["gpu"], _model_key(c["model"]), c["max_model_len"], c["tp"],
                       **{k: c[k] for k in _KNOBS if k in c}).validate()


def fleet_spec(dep: dict, router: str | None = None, balancer: str | None = None) -> FleetSpec:
    """The deployment's fleet: its pools at their instance counts, its tier limits and closed loop."""
    pools = tuple(PoolSpec(p["name"], pool_config(p["config"]), int(p["instances"])) for p in dep["pools"])
    limits = tuple(dep.get("limits") or ()) or ((dep["b_short"],) if len(pools) == 2 else ())
    return FleetSpec(pools, b_short=limits[0] if limits else None, limits=limits or None,
                     router=router or dep.get("router") or "oracle",
                     balancer=balancer or dep.get("balancer") or DEFAULT_BALANCER,
                     spillover=bool(dep.get("spillover")), adaptive=bool(dep.get("adaptive")))


def targets(dep: dict, ttft_ms: dict | None = None, tpot_ms: dict | None = None) -> dict:
    """Per class (TTFT, TPOT) P99 targets: the deployment's unless overridden."""
    t = {**SLO_TTFT_P99_MS, **(dep.get("ttft_p99_ms") or {}), **(ttft_ms or {})}
    p = {**SLO_TPOT_P99_MS, **(dep.get("tpot_p99_ms") or {}), **(tpot_ms or {})}
    return {c: (float(t[c]), float(p[c])) for c in CLASSES}


def report(dep: dict, tr: Trace, r: SimResult, tg: dict, boundary: int, preempt_per_1k: float,
           notice: str | None = None) -> dict:
    """simulate.json: per class the P99s against the targets, per pool the steady-state verdict."""
    s = summarize(r, boundary)
    st = verdict(r)
    classes = {}
    for c in CLASSES:
        m, (ttft, tpot) = s["classes"][c], tg[c]
        lat = class_ok(m, {"ttft_target_ms": ttft, "tpot_target_ms": tpot})
        classes[c] = {"requests": m["requests"], "ttft_p99_ms": m["ttft_p99_ms"], "tpot_p99_ms": m["tpot_p99_ms"],
                      "ttft_slo_ms": ttft, "tpot_slo_ms": tpot, "meets_latency": bool(lat),
                      "meets": bool(lat and st["ok"])}
    preempt_ok = s["fleet"]["preemptions_per_1k"] <= preempt_per_1k
    return {"deployment": dep.get("design"), "trace": tr.name, "requests": len(tr), "duration_s": tr.duration,
            "rate_rps": len(tr) / max(tr.duration, 1e-9), "notice": notice,
            "classes": classes, "steady": st, "preempt_per_1k": s["fleet"]["preemptions_per_1k"],
            "meets": bool(all(c["meets"] for c in classes.values()) and preempt_ok),
            "summary": s}


def simulate_deployment(dep: dict, tr: Trace, seed: int = 0, ttft_ms: dict | None = None,
                        tpot_ms: dict | None = None, router: str | None = None, balancer: str | None = None,
                        notice: str | None = None, progress: bool = False) -> tuple[dict, FleetSpec, SimResult]:
    """(simulate.json, the fleet, the run) for the deployment on `tr` as the
    planner's seed `seed` sees it (`traces.perturb`: seed 0 is the trace as
    recorded, others jitter arrivals and shuffle within blocks), so seed N
    here is the plan's seed N."""
    spec = fleet_spec(dep, router, balancer)
    r = simulate(perturb(tr, seed), spec, seed=seed, progress=progress)
    boundary = int(dep.get("class_boundary") or CLASS_BOUNDARY)
    pre = dep.get("preempt_per_1k")
    pre = SLO_PREEMPT_PER_1K if pre is None or (isinstance(pre, float) and math.isnan(pre)) else float(pre)
    return report(dep, tr, r, targets(dep, ttft_ms, tpot_ms), boundary, pre, notice), spec, r

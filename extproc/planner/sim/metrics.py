"""Per-pool and fleet metrics of a simulation (pure functions of a SimResult)."""
from __future__ import annotations

import math

import numpy as np

from .fleet import SimResult
from .instance import ITL_BINS_PER_E

HOURS_PER_YEAR = 8760


def _pct(a: np.ndarray, q: float) -> float:
    a = a[np.isfinite(a)]
    return float(np.percentile(a, q)) if a.size else float("nan")


def _latency(r: SimResult, mask: np.ndarray) -> dict:
    """Request-level figures of the requests in `mask`."""
    n = int(mask.sum())
    rej = r.rejected & mask
    ok = mask & ~r.rejected
    ttft = (r.first_token - r.arrival)[ok]
    e2e = (r.finish - r.arrival)[ok]
    queue = (r.first_sched - r.arrival)[ok]
    # TPOT as vLLM's benchmark computes it (`vllm bench serve`): over requests
    # with >= 2 output tokens, (e2e - TTFT) / (output tokens - 1); one-token
    # requests have no TPOT.
    multi = ok & (r.output > 1)
    tpot = ((r.finish - r.first_token) / np.maximum(r.output - 1, 1))[multi]
    pre = int(r.preempts[mask].sum())
    return {
        "requests": n,
        "completed": int(ok.sum()),
        "rejected": int(rej.sum()),
        "rejected_per_1k": 1000.0 * rej.sum() / max(n, 1),
        "ttft_p50_ms": 1e3 * _pct(ttft, 50), "ttft_p99_ms": 1e3 * _pct(ttft, 99),
        "tpot_p50_ms": 1e3 * _pct(tpot, 50), "tpot_p99_ms": 1e3 * _pct(tpot, 99),
        "e2e_p50_s": _pct(e2e, 50), "e2e_p99_s": _pct(e2e, 99),
        "queue_p50_ms": 1e3 * _pct(queue, 50), "queue_p99_ms": 1e3 * _pct(queue, 99),
        "preemptions": pre,
        "preemptions_per_1k": 1000.0 * pre / max(n, 1),
        "preempted_requests": int((r.preempts[mask] > 0).sum()),
    }


def itl_p99_ms(insts: list[dict], q: float = 99.0) -> float:
    """Inter-token latency percentile (ms) over every token gap of these
    instances (vLLM's benchmark ITL: each gap between consecutive output
    tokens of a request, all requests pooled), from the instances' per-step
    histograms; the upper edge of the bin holding the percentile. Runs of
    pure-decode steps count at their mean step time. NaN without any gap."""
    h: dict[int, int] = {}
    for s in insts:
        for b, n in s.get("itl_hist", {}).items():
            h[b] = h.get(b, 0) + n
    total = sum(h.values())
    if not total:
        return float("nan")
    need, acc = q / 100.0 * total, 0
    for b in sorted(h):
        acc += h[b]
        if acc >= need:
            return 1e3 * math.exp((b + 1) / ITL_BINS_PER_E)
    return 1e3 * math.exp((max(h) + 1) / ITL_BINS_PER_E)


def _block(r: SimResult, mask: np.ndarray, insts: list[dict], duration: float,
           tp_price: list[tuple[int, float]]) -> dict:
    out = _latency(r, mask)
    ok = mask & ~r.rejected
    busy = sum(s["busy"] for s in insts)
    kv_int = sum(s["kv_int"] for s in insts)
    cap = sum(s["blocks"] for s in insts)
    cap_busy = sum(s["blocks"] * s["busy"] for s in insts)
    span = max(duration, max((s["end"] for s in insts), default=0.0))
    gpus = sum(tp for tp, _ in tp_price)
    usd_h = sum(tp * price for tp, price in tp_price)
    win_busy = sum(s["busy_window"] for s in insts)
    win_kv = sum(s["kv_int_window"] for s in insts)
    out.update({
        "recomputed_tokens": int(sum(s["recomputed_tokens"] for s in insts)),
        "kv_util_busy": kv_int / cap_busy if cap_busy else 0.0,
        # over the trace window [first arrival, last arrival], not the drain tail
        "kv_util": win_kv / (cap * duration) if cap and duration else 0.0,
        "gpu_busy": win_busy / (len(insts) * duration) if insts and duration else 0.0,
        "drain_s": span - duration,
        # automatic prefix caching (traces with block hashes): blocks hit / looked up
        "prefix_hit_rate": (sum(s["prefix_hits"] for s in insts)
                            / max(1, sum(s["prefix_queries"] for s in insts))),
        "prefix_skipped_tokens": int(sum(s["prefix_skipped"] for s in insts)),
        # over the whole simulation, warm-up included (per step, not per request)
        "itl_p99_ms": itl_p99_ms(insts),
        "instances": len(insts),
        "gpus": gpus,
        "gpu_hours": gpus * duration / 3600.0,
        "usd_per_hour": usd_h,
        "usd_per_year": usd_h * HOURS_PER_YEAR,
        "throughput_rps": int(ok.sum()) / duration if duration else 0.0,
    })
    return out


CLASSES = ("short", "long")


def class_of(total: np.ndarray, boundary: int) -> np.ndarray:
    """0 (short: true budget <= boundary) or 1 (long) per request."""
    return (np.asarray(total) > boundary).astype(np.int64)


def summarize(r: SimResult, boundary: int | None = None, measure_from: float = 0.0) -> dict:
    """{'fleet': {...}, 'pools': {name: {...}}, 'classes': {short, long}} for a
    simulation; classes (by true budget vs `boundary`) only when it is given.
    Request figures count requests arriving at or after `measure_from` s (a
    warm-up to discard: the fleet starts empty)."""
    on = r.arrival >= measure_from
    duration = float(r.arrival[-1] - r.arrival[0]) if len(r.arrival) > 1 else 0.0
    out = {"trace": r.trace_name, "spec": r.spec.describe(), "duration_s": duration,
           "spilled": r.spilled, "sim_wall_s": r.wall_s,
           "sim_req_per_s": len(r.arrival) / r.wall_s if r.wall_s else 0.0, "pools": {}}
    all_tp = []
    for k, p in enumerate(r.spec.pools):
        insts = [s for s in r.inst_stats if s["pool"] == k]
        tpp = [(p.cfg.tp, p.cfg.gpu.price_per_hour)] * p.count
        all_tp += tpp
        out["pools"][p.name] = _block(r, on & (r.pool == k), insts, duration, tpp)
    out["fleet"] = _block(r, on, r.inst_stats, duration, all_tp)
    if boundary is not None:
        cls = class_of(r.prompt + r.output, boundary)
        out["classes"] = {c: _latency(r, on & (cls == k)) for k, c in enumerate(CLASSES)}
        for j, p in enumerate(r.spec.pools):
            out["pools"][p.name]["classes"] = {c: _latency(r, on & (cls == k) & (r.pool == j))
                                               for k, c in enumerate(CLASSES)}
        out["class_boundary"] = boundary
    return out


def meets(m: dict, slo_ttft_p99_ms: float, slo_preempt_per_1k: float) -> bool:
    return (m["completed"] > 0 and m["ttft_p99_ms"] <= slo_ttft_p99_ms
            and m["preemptions_per_1k"] <= slo_preempt_per_1k)


def combine(summaries: list[dict], numeric, flags=None) -> dict:
    """One summary from several (seeds): nested dicts leaf by leaf, numeric
    leaves by ``numeric`` over the finite values (a NaN-ignoring numpy
    reducer; NaN if none is finite), bool leaves by ``flags`` over them (the
    first's when None), the rest from the first."""
    first = summaries[0]
    if len(summaries) == 1:
        return first
    out = {}
    for k, v in first.items():
        if isinstance(v, dict):
            out[k] = combine([s[k] for s in summaries], numeric, flags)
        elif isinstance(v, bool):
            out[k] = v if flags is None else flags(bool(s[k]) for s in summaries)
        elif isinstance(v, (int, float)):
            xs = np.array([s[k] for s in summaries], dtype=np.float64)
            out[k] = float(numeric(xs)) if np.isfinite(xs).any() else float("nan")
        else:
            out[k] = v
    return out


def average(summaries: list[dict]) -> dict:
    """Seed average of summaries: numeric leaves are (NaN-ignoring) means, the
    rest is taken from the first."""
    return combine(summaries, np.nanmean)

"""The closed loop's pure parts: vLLM metrics -> tier load -> spillover and
adaptive boundaries, and the router deciding with them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from extproc import config as C
from extproc.core import policy as P
from extproc.core.load import Instance, Sample, TierLoad, parse_metrics, tier_loads
from extproc.core.router import Router
from extproc.core.spillover import Spillover
from extproc.core.threshold import Threshold

REAL_0_32 = (Path(__file__).resolve().parent.parent / "data" / "vllm_0_32_metrics.txt").read_text()


def load(name: str, waiting: float = 0, kv: float = 0.1, instances: int = 1, preempt: float = 0.0,
         known: bool = True) -> TierLoad:
    return TierLoad(name, known, instances if known else 0, 1.0, waiting, kv, preempt, 0.5 if known else math.inf)


def spill(n: int = 3) -> Spillover:
    return Spillover(n, waiting_per_instance=1.0, waiting_clear=0.25, kv_usage=0.92, kv_clear=0.8)


# --- load ----------------------------------------------------------------------

def test_parse_real_vllm_0_32_exposition():
    s = parse_metrics(REAL_0_32, 10.0)
    assert s == Sample(10.0, 3.0, 0.0, 0.12, 11.0)


def test_parse_sums_engines_and_averages_kv_and_rejects_non_vllm():
    two = REAL_0_32 + REAL_0_32.replace('engine="0"', 'engine="1"').replace("} 0.12", "} 0.5")
    s = parse_metrics(two, 0.0)
    assert (s.running, s.waiting, s.kv_usage, s.preemptions) == (6.0, 0.0, pytest.approx(0.31), 22.0)
    assert parse_metrics("# HELP x y\nup 1\n", 0.0) is None
    assert parse_metrics("vllm:num_requests_waiting{a=\"}\"} garbage\nvllm:num_requests_running 2\n", 0).running == 2


def test_preemption_rate_from_counter_deltas_and_resets():
    a = Instance(Sample(0.0, 1, 0, 0.1, 10.0))
    b = a.then(Sample(2.0, 1, 0, 0.1, 16.0))
    assert b.preemption_rate() == 3.0
    assert b.then(Sample(3.0, 1, 0, 0.1, 0.0)).preemption_rate() == 0.0  # vLLM restarted
    assert a.preemption_rate() == 0.0


def test_samples_older_than_three_intervals_are_unknown():
    inst = {"short": {"a:1": Instance(Sample(10.0, 2, 3, 0.5, 0.0)), "b:1": Instance(Sample(6.0, 9, 9, 0.9, 0.0))},
            "long": {"c:1": Instance(Sample(5.0, 1, 0, 0.1, 0.0))}}
    short, long = tier_loads(["short", "long"], inst, now=11.0, interval_s=1.0, stale_intervals=3)
    assert short.known and short.instances == 1 and short.waiting == 3 and short.age_s == 1.0
    assert not long.known and long.instances == 0
    (gone,) = tier_loads(["short"], inst, now=14.5, interval_s=1.0, stale_intervals=3)
    assert not gone.known


# --- spillover -----------------------------------------------------------------

def test_saturated_tier_spills_to_the_next_clear_one_and_counts():
    s = spill()
    s.observe([load("short", waiting=3), load("medium"), load("long")])
    assert s.target(0) == 1 and s.target(1) == 1 and s.target(2) == 2
    s.observe([load("short", kv=0.95), load("medium", waiting=5), load("long")])
    assert s.target(0) == 2  # skips the saturated medium tier
    assert s.spilled == {(0, 1): 1, (0, 2): 1}


def test_hysteresis_keeps_a_tier_saturated_until_it_clears():
    s = spill(2)
    s.observe([load("short", waiting=1.0), load("long")])
    assert s.target(0) == 1
    s.observe([load("short", waiting=0.5), load("long")])  # between clear and trigger: still saturated
    assert s.target(0) == 1
    s.observe([load("short", waiting=0.25), load("long")])
    assert s.target(0) == 0
    s.observe([load("short", waiting=0.5), load("long")])  # between again: stays clear
    assert s.target(0) == 0


def test_unknown_signals_mean_static_routing():
    s = spill(2)
    s.observe([load("short", known=False), load("long")])
    assert s.target(0) == 0
    s.observe([load("short", waiting=9), load("long", known=False)])  # nowhere known to go
    assert s.target(0) == 0
    s.observe([load("short", waiting=9), load("long", waiting=9)])  # everyone saturated
    assert s.target(0) == 0
    assert s.spilled == {}


def test_never_down_a_tier():
    s = spill()
    s.observe([load("short"), load("medium", waiting=9), load("long", waiting=9)])
    assert [s.target(i) for i in range(3)] == [0, 1, 2]


def test_router_spills_with_reason_and_origin_and_not_when_disabled():
    cfg = C.Config()
    r = Router(cfg)
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
    assert r.route("/v1/chat/completions", body).pool == "short"
    r.observe((load("short", waiting=4), load("long")), now=1.0)
    d = r.route("/v1/chat/completions", body)
    assert (d.pool, d.reason, d.from_pool) == ("long", P.R_SPILLOVER, "short")
    assert "reason=spillover; from=short" in d.header_value()
    off = Router(cfg.replace(spillover={"enabled": False}))
    off.observe((load("short", waiting=4), load("long")), now=1.0)
    assert off.route("/v1/chat/completions", body).pool == "short"


# --- adaptive threshold ------------------------------------------------------------

def thr(**kw) -> Threshold:
    args = dict(base=(8000,), caps=(8028,), enabled=True, step_fraction=0.05, dwell_s=10.0, dead_band=0.5,
                min_fraction=0.5)
    args.update(kw)
    return Threshold(**args)


def test_threshold_steps_down_under_short_pressure_with_dwell_and_bounds():
    t = thr()
    hot = [load("short", waiting=5, preempt=1.0), load("long")]
    (m,) = t.observe(hot, now=0.0)
    assert (m.old, m.new) == (8000, 7600) and t.limits == [7600]
    assert t.observe(hot, now=5.0) == [] and t.limits == [7600]  # dwell
    for k in range(1, 40):
        t.observe(hot, now=10.0 * k)
    assert t.limits == [4000]  # min_fraction x configured, never below
    calm = [load("short"), load("long", waiting=9)]
    for k in range(40, 200):
        t.observe(calm, now=10.0 * k)
    assert t.limits == [8028]  # never above max_model_len x (1 - margin)
    assert t.moves == [len(t.history)] and all(m.why for m in t.history)


def test_threshold_dead_band_unknown_pinned_and_disabled():
    t = thr()
    assert t.observe([load("short", waiting=0.4), load("long")], now=0.0) == []  # inside the dead band
    assert t.observe([load("short", waiting=9), load("long", known=False)], now=0.0) == []
    t.pin(0, 6000, now=1.0)
    assert t.limits == [6000] and t.observe([load("short", waiting=9), load("long")], now=100.0) == []
    t.pin(0, None, now=2.0)
    assert t.observe([load("short", waiting=9), load("long")], now=100.0)[0].new == 5700
    off = thr(enabled=False)
    assert off.observe([load("short", waiting=9), load("long")], now=0.0) == []
    off.pin(0, 5000, now=1.0)
    assert off.limits == [5000]
    assert off.pin(0, None, now=2.0).new == 8000 and off.limits == [8000]  # nothing adapts: back to the config


def test_first_boundary_never_below_min_b_short():
    from extproc import defaults as D
    t = thr(base=(600,), caps=(2000,))
    for k in range(20):
        t.observe([load("short", waiting=9), load("long")], now=10.0 * k)
    assert t.limits == [D.MIN_B_SHORT]


def test_boundaries_stay_between_their_neighbours():
    t = thr(base=(8000, 9000), caps=(8028, 32000))
    for k in range(50):
        t.observe([load("a"), load("b", waiting=9), load("c")], now=10.0 * k)
    assert t.limits[0] < t.limits[1]


def test_router_uses_moved_limits_and_admin_pins_are_validated():
    cfg = C.Config().replace(adaptive={"enabled": True})
    r = Router(cfg)
    r.observe((load("short", waiting=9), load("long")), now=0.0)
    assert r.limits() == (7782,)
    with pytest.raises(C.ConfigError, match="above"):
        r.pin_limit(0, 9000, now=1.0)
    r.pin_limit(0, 1000, now=1.0)
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":2000}'
    assert r.route("/v1/chat/completions", body).pool == "long"

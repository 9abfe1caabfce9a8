"""The split's shared host in the fidelity check: cpu_profile.HostShare (a
neighbour computing on the same machine slows an instance's steps by a
measured factor), the instance model running with it, the fixed point of the
two servers' simulations (fidelity.shared_host), the slowdown estimate from
timings, and the foreign-CPU accounting."""
import numpy as np
import pytest

from extproc.planner.sim import cpu_profile as CP
from extproc.planner.sim.fleet import FleetSpec, PoolSpec, simulate
from extproc.planner.sim.traces import Trace
from extproc.tools import fidelity as F

PROF = CP.CPUProfile(step_overhead_s=0.008, per_token_s=20e-6, per_ctx_s=25e-9, request_overhead_s=0.009)


def cfg(host=None, **kw):
    return CP.cpu_config("tiny-qwen2", 8192, profile=PROF, kv_tokens=32768, max_num_seqs=8,
                         enable_prefix_caching=False, max_num_batched_tokens=512, host_share=host, **kw)


def run(c, arrival, prompt, output):
    tr = Trace("t", np.asarray(arrival, float), np.asarray(prompt, np.int64), np.asarray(output, np.int64))
    return simulate(tr, FleetSpec((PoolSpec("p", c, 1),)), check=True)


def test_factor_is_the_busy_share_of_the_step():
    h = CP.HostShare(0.5, ((1.0, 2.0), (3.0, 3.5)))
    assert h.factor(0.0, 0.5) == 1.0  # the neighbour is idle
    assert h.factor(1.2, 0.5) == pytest.approx(1.5)  # inside a busy interval
    assert h.factor(0.5, 1.0) == pytest.approx(1.25)  # half of it overlaps
    assert h.factor(1.5, 2.0) == pytest.approx(1.0 + 0.5 * (0.5 + 0.5) / 2.0)  # spans two intervals
    assert CP.HostShare(0.0, ((0.0, 9.0),)).factor(1.0, 1.0) == 1.0
    with pytest.raises(ValueError):
        CP.HostShare(-0.1)
    with pytest.raises(ValueError):
        CP.HostShare(0.1, ((0.0, 2.0), (1.0, 3.0)))


def test_an_instance_with_an_idle_neighbour_runs_as_alone_and_logs_its_steps():
    arr, p, o = [0.0, 0.05, 0.3, 2.0], [3000, 200, 900, 64], [5, 20, 3, 9]
    alone = run(cfg(), arr, p, o)
    h = CP.HostShare(0.7)
    shared = run(cfg(h), arr, p, o)  # no neighbour interval: every step at factor 1
    assert np.allclose(shared.first_token, alone.first_token, rtol=1e-9)
    assert np.allclose(shared.finish, alone.finish, rtol=1e-9)
    busy = h.busy_intervals()
    assert len(busy) == 2  # two bursts of work with an idle gap between them
    assert busy[0][0] == 0.0 and busy[1][0] == 2.0
    assert sum(b - a for a, b in busy) == pytest.approx(sum(r.inst_stats[0]["busy"] for r in [alone]), rel=1e-9)


def test_a_busy_neighbour_stretches_every_step_by_the_slowdown():
    arr, p, o = [0.0, 0.0], [1500, 64], [4, 12]
    alone = run(cfg(), arr, p, o)
    shared = run(cfg(CP.HostShare(0.5, ((-1.0, 100.0),))), arr, p, o)
    assert np.allclose(shared.first_token, 1.5 * alone.first_token, rtol=1e-9)
    assert np.allclose(shared.finish, 1.5 * alone.finish, rtol=1e-9)


def _two_servers():
    short = F.Server("short", 2048, 8, 8192)
    long = F.Server("long", 8192, 2, 16384, cpus="1")
    return F.Design("split", (short, long), 2048)


def test_shared_host_without_slowdown_is_the_fleet_simulation():
    tr = F.burst_trace(80, seed=3)
    d = _two_servers()
    t0, e0 = F.sim_times(tr, d, [PROF, PROF])
    t1, e1, rounds = F.shared_host(tr, d, [PROF, PROF], [0.0, 0.0])
    assert rounds == 2  # the second round sees the same busy time: settled
    assert np.allclose(t0, t1, rtol=1e-9, equal_nan=True) and np.allclose(e0, e1, rtol=1e-9, equal_nan=True)


def test_shared_host_slows_both_servers_only_where_they_overlap():
    tr = F.burst_trace(80, seed=3)
    d = _two_servers()
    t0, e0 = F.sim_times(tr, d, [PROF, PROF])
    t1, e1 = F.sim_times(tr, d, [PROF, PROF], slowdowns=[0.6, 0.6])
    assert (t1 >= t0 - 1e-12).all() and (e1 >= e0 - 1e-12).all()
    assert np.nanmedian(e1 - t1) > np.nanmedian(e0 - t0)  # decode slower
    # a server whose neighbour never computes is not slowed: all traffic on the short one
    short_only = Trace("s", tr.arrival, np.minimum(tr.prompt, 1000), np.minimum(tr.output, 8))
    a, _ = F.sim_times(short_only, d, [PROF, PROF])
    b, _ = F.sim_times(short_only, d, [PROF, PROF], slowdowns=[0.6, 0.6])
    assert np.allclose(a, b, rtol=1e-9)


def test_neighbour_slowdown_is_the_median_ratio_of_shared_to_alone_timings():
    alone = {"prefill": {512: [0.030, 0.031, 0.029], 2048: [0.14, 0.15]}, "decode": {1: [0.010], 4: [0.011]}}
    shared = {"prefill": {512: [0.045], 2048: [0.21]}, "decode": {1: [0.02], 4: [0.0165]}}
    sd, rows = F.neighbour_slowdown(alone, shared)
    ratios = sorted(r["ratio"] for r in rows)
    assert sd == pytest.approx(float(np.median(ratios)) - 1.0)
    assert len(rows) == 4
    faster = {"prefill": {512: [0.02]}, "decode": {}}
    assert F.neighbour_slowdown(alone, faster)[0] == 0.0  # never below zero
    with pytest.raises(ValueError):
        F.neighbour_slowdown(alone, {"prefill": {999: [0.1]}, "decode": {}})


def test_foreign_share_is_what_this_run_did_not_use():
    import os
    tick = os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    t0 = (0.0, 1000, 100)
    t1 = (2.0, 1000 + tick, 100 + tick // 2)  # the machine busy one core-second per second, half of it ours
    assert F.foreign_share(t0, t1) == pytest.approx(0.25, abs=0.01)
    snap = F.cpu_ticks(set())
    assert snap[1] >= snap[2] >= 0


def test_ranking_beyond_ties_ignores_only_pairs_the_real_run_does_not_separate():
    def c(name, real, sim):
        return {"name": name, "real": {"x": real}, "sim": {"x": sim}}
    near = [c("a", 501.0, 505.0), c("b", 531.0, 484.0), c("s", 288.0, 293.0)]  # a, b 6% apart
    assert F.orders_agree(near, "x", 0.10)
    assert not F.orders_agree(near, "x", 0.05)
    apart = [c("a", 500.0, 505.0), c("b", 800.0, 484.0)]  # 60% apart, the simulation reverses them
    assert not F.orders_agree(apart, "x", 0.10)
    m = {"requests": 1, "ttft_p50_ms": 1.0, "ttft_p90_ms": 1.0, "tpot_p50_ms": 1.0, "tpot_p90_ms": 1.0}
    doc = F.compare([{"name": "a", "real": dict(m), "sim": dict(m)},
                     {"name": "b", "real": {**m, "ttft_p90_ms": 1.05}, "sim": {**m, "ttft_p90_ms": 0.9}}])
    assert doc["ranking_agrees"] is False and doc["ranking_agrees_beyond_ties"] is True

"""SLO realism (issue 16 item 5): idle slack, TPOT as vLLM's benchmark, ITL P99,
the isolation label, and the bounded re-plans of --slo-sweep."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from extproc.planner.sim.fleet import FleetSpec, PoolSpec, simulate
from extproc.planner.sim.metrics import itl_p99_ms, summarize
from extproc.planner.sim.traces import Trace
from extproc.planner.sizing import slo as S
from extproc.planner.sizing.slo_sweep import RHO_ISOLATION_BAND, saving_kind

from .test_planner import A100
from tests.planner.cli_helpers import plan_parser, small_plan_argv, synthetic_trace

SCHEMA = os.path.join(os.path.dirname(__file__), "..", "schemas", "plan.schema.json")


def _trace(prompt, output, gap=100.0):
    n = len(prompt)
    p, o = np.asarray(prompt, dtype=np.int64), np.asarray(output, dtype=np.int64)
    return Trace("t", np.arange(n, dtype=np.float64) * gap, p, o)


def test_idle_slack_ratio_and_tight_flag():
    s = S.slack(2000.0, 100.0, 1718.0, 30.0)
    assert s["idle_ttft_ratio"] == pytest.approx(2000 / 1718) and s["idle_ttft_slack_ms"] == pytest.approx(282)
    assert s["tight"]  # 1.16x < TIGHT_IDLE_RATIO
    assert not S.slack(2000.0, 100.0, 1437.0, 30.0)["tight"]  # 1.39x
    assert not S.slack(1000.0, 100.0, 1437.0, 30.0)["tight"]  # infeasible, not tight
    assert S.slack(100.0, 35.0, 10.0, 30.0)["tight"]  # TPOT alone
    tr = _trace([1000] * 50 + [20000] * 50, [100] * 100)
    tg = S.targets(S.SLO(), A100, tr.prompt, tr.total)
    for t in tg.values():
        assert t["idle_ttft_ratio"] == pytest.approx(t["ttft_slo_ms"] / t["idle_ttft_p99_ms"])
    # targets at the idle figure x1.1 are flagged
    tight = S.SLO({c: 1.1 * tg[c]["idle_ttft_p99_ms"] for c in tg}, S.SLO().tpot_ms)
    assert all(t["tight"] for t in S.targets(tight, A100, tr.prompt, tr.total).values())


def test_scaled_slo():
    x = S.scaled(S.SLO(), 2.0)
    assert x.ttft_ms == {c: 2 * v for c, v in S.SLO_TTFT_P99_MS.items()}
    assert x.tpot_ms == {c: 2 * v for c, v in S.SLO_TPOT_P99_MS.items()}
    assert S.scaled(S.SLO(), 1.0, short_ttft_ms=750).ttft_ms["short"] == 750


def test_tpot_as_vllm_bench_and_itl_p99_on_one_instance():
    # one request alone: TPOT = (e2e - ttft) / (out - 1); every gap is one decode step
    tr = _trace([512, 512], [1, 64], gap=1000.0)
    r = simulate(tr, FleetSpec((PoolSpec("p", A100, 1),)))
    m = summarize(r)["fleet"]
    e2e, ttft = r.finish[1] - r.arrival[1], r.first_token[1] - r.arrival[1]
    assert m["tpot_p99_ms"] == pytest.approx(1e3 * (e2e - ttft) / 63)  # the 1-token request has no TPOT
    # ITL: 63 gaps of one decode step each; the bin's upper edge is within 2% above
    itl = m["itl_p99_ms"]
    assert m["tpot_p99_ms"] * 0.97 <= itl <= m["tpot_p99_ms"] * 1.05
    assert sum(sum(s["itl_hist"].values()) for s in r.inst_stats) == 63


def test_itl_p99_sees_a_long_prefill_stall_tpot_averages_away():
    # a decode sharing steps with a 7K-token prefill chunked by 512: ~14 of its
    # 399 gaps (> 1%) are mixed steps; its TPOT (mean gap) hides them
    tr = _trace([256, 7000], [400, 2], gap=0.05)
    r = simulate(tr, FleetSpec((PoolSpec("p", A100.with_(max_num_batched_tokens=512), 1),)))
    f = summarize(r)["fleet"]
    assert not r.rejected.any()
    assert f["itl_p99_ms"] > 2 * f["tpot_p50_ms"]
    assert math.isnan(itl_p99_ms([{"itl_hist": {}}]))


def test_saving_kind_labels_rho_near_one_as_isolation():
    assert saving_kind(1.0) == "latency isolation"
    assert saving_kind(1 + RHO_ISOLATION_BAND * 0.9) == "latency isolation"
    assert saving_kind(1.5) == "throughput"
    assert saving_kind(0.5) == "isolation despite lower throughput"
    assert saving_kind(float("nan")) == "unknown"


def test_cli_plan_slo_sweep(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    ap = plan_parser()
    f = synthetic_trace(tmp_path / "m.jsonl", 300, seed=0, gap_ms=250, max_output=300)
    out = tmp_path / "p"
    args = ap.parse_args(small_plan_argv(f, 1, "--slo-sweep", "--out", str(out)))
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "SLO realism" in text and "targets x2" in text and "decomposition" in text and "ITL P99" in text
    res = json.loads((out / "plan.json").read_text())
    jsonschema.validate(res, json.loads(open(SCHEMA).read()))
    x = res["slo_realism"]
    assert set(x["idle_slack"]) == {"short", "long"}
    assert x["sensitivity"]["factor"] == S.SENSITIVITY_FACTOR
    sw = x["short_ttft_sweep"]
    assert [p["short_ttft_ms"] for p in sw] == sorted(p["short_ttft_ms"] for p in sw)
    d = x["decomposition"]
    if d["saving_vs_baseline"] is not None and d["isolation"] is not None:
        assert d["configuration"] == pytest.approx(d["saving_vs_baseline"] - d["isolation"])
    for dd in res["designs"]:
        assert dd["itl_p99_ms"] > 0
    assert os.path.exists(out / "saving_vs_short_ttft.png")

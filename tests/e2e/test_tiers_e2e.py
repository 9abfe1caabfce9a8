"""N tiers and spillover through the real Envoy, router and simulated pools:
three tiers route by budget to three pools; a saturated short pool makes the
next short request spill to the long pool (reason ``spillover``), counted in
the router's metrics and shown by ``status``, and routing returns to short
once its queue drains."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import grpc

from extproc import cli
from extproc import config as C
from extproc.admin import cli as admin_cli
from extproc.admin.v1 import admin_pb2 as pb
from extproc.backend.server import POOL_HEADER
from extproc.tools.stack import loopback_config

from tests.conftest import start_stack

#: Small tiers keep the simulated outputs short (time_scale 0 answers at once).
THREE_TIERS = [
    {"name": "short", "max_model_len": 2048, "budget_limit": 1024, "endpoints": ["127.0.0.1:1"]},
    {"name": "medium", "max_model_len": 8192, "budget_limit": 4096, "endpoints": ["127.0.0.1:2"]},
    {"name": "long", "max_model_len": 32768, "endpoints": ["127.0.0.1:3"]},
]

def _post(stack, max_tokens: int, timeout: float = 60) -> tuple[str, str, dict]:
    """(pool that answered, decision header, response JSON) for a tiny chat."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Say hello."}],
                       "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(stack.url + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.headers[POOL_HEADER], r.headers[stack.cfg.router.decision_header], json.loads(r.read())

def _prometheus(stack) -> str:
    url = f"http://127.0.0.1:{stack.cfg.telemetry.prometheus_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()

def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not exported")

def _calibration(stack) -> pb.Calibration:
    (target, res), = admin_cli.call_all(stack.cfg, "GetCalibration", pb.GetCalibrationRequest())
    assert isinstance(res, pb.Calibration), res
    return res

def test_three_tiers_route_by_budget_through_envoy(tmp_path):
    base = C.from_mapping({"tiers": THREE_TIERS}, {})
    cfg = loopback_config(base, workers=1, router={"state_file": str(tmp_path / "state.json")})
    stack = start_stack(cfg, str(tmp_path))
    try:
        got = {n: _post(stack, n)[:2] for n in (16, 2000, 6000)}
        assert [pool for pool, _ in got.values()] == ["short", "medium", "long"]
        assert "reason=budget_fits_tier" in got[2000][1] and "reason=budget_over_b_short" in got[6000][1]
        # Envoy's own counters agree: one request per tier cluster.
        with urllib.request.urlopen(stack.admin_url + "/stats?filter=upstream_rq_total$", timeout=5) as r:
            stats = dict(line.split(": ") for line in r.read().decode().splitlines())
        for tier in ("short", "medium", "long"):
            assert stats[f"cluster.pool_{tier}.upstream_rq_total"] == "1"
        cal = _calibration(stack)
        assert [(t.name, t.budget_limit) for t in cal.tiers] == [("short", 1024), ("medium", 4096), ("long", 0)]
        # Pin the second boundary below the 2,000-token request: it goes long now.
        (_, res), = admin_cli.call_all(stack.cfg, "SetLimit", pb.SetLimitRequest(boundary=1, budget_limit=1500))
        assert list(res.limits) == [1024, 1500]
        assert _post(stack, 2000)[0] == "long"
        assert [t.pinned for t in _calibration(stack).tiers] == [False, True, False]
        for bad, why in ((pb.SetLimitRequest(boundary=2, budget_limit=9), "this router has 2"),
                         (pb.SetLimitRequest(boundary=1, budget_limit=900), "must increase")):
            (_, err), = admin_cli.call_all(stack.cfg, "SetLimit", bad)
            assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert why in err.details()
        (_, res), = admin_cli.call_all(stack.cfg, "SetLimit", pb.SetLimitRequest(boundary=1, unpin=True))
        assert list(res.limits) == [1024, 4096]  # adaptive off: back to the configured boundary
        assert not _calibration(stack).tiers[1].pinned
    finally:
        stack.stop()

def test_saturated_short_pool_makes_the_next_request_spill(tmp_path, capsys):
    cfg = loopback_config(C.Config(), workers=1, router={"state_file": str(tmp_path / "state.json")},
                          monitor={"interval_s": 0.2})
    # One sequence at a time in the short pool, at 1/20 of modelled speed:
    # 2,500 output tokens take ~2.5 s each, so five of them keep a queue for ~10 s.
    stack = start_stack(cfg, str(tmp_path), time_scale=0.05, pool_seqs={"short": 1})
    threads = []
    try:
        assert _post(stack, 16)[0] == "short"
        threads = [threading.Thread(target=_post, args=(stack, 2500), daemon=True) for _ in range(5)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _calibration(stack).tiers[0].saturated:
            time.sleep(0.1)
        cal = _calibration(stack)
        short = cal.tiers[0]
        assert short.saturated and short.known and short.waiting >= 1, cal
        metrics = _prometheus(stack)
        assert _metric(metrics, "budget_router_tier_saturated", tier="short") == 1.0
        assert _metric(metrics, "budget_router_tier_load", tier="short", signal="waiting") >= 1.0
        assert 0 <= _metric(metrics, "budget_router_tier_signal_age_seconds", tier="short") < 1.0
        assert _metric(metrics, "budget_router_tier_budget_limit", tier="short") == 8192
        pool, decision, _ = _post(stack, 16)
        assert pool == "long" and "reason=spillover; from=short" in decision
        assert cli.main(["status", "--config", stack.config_path()]) == 0
        status = capsys.readouterr().out
        assert "spillover on" in status and "saturated" in status, status
        metrics = _prometheus(stack)
        assert _metric(metrics, "budget_router_spillovers_total", from_tier="short", to_tier="long") == 1.0
        for t in threads:
            t.join(60)
        # The queue drained: the short tier clears (hysteresis) and takes its requests again.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _calibration(stack).tiers[0].saturated:
            time.sleep(0.1)
        assert _post(stack, 16)[0] == "short"
    finally:
        for t in threads:
            t.join(60)
        stack.stop()

"""``budget-router demo``: traffic builders (fast, pure) and one small end-to-end run.

The end-to-end test starts the real stack (Envoy, router, two simulated
pools), sends 60 requests of the built-in mix through Envoy and checks that
the report accounts for every request, that both pools served traffic, that
only the two deliberate errors failed and that the plots are PNG files.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from extproc.tools import demo
from extproc.tools import demo_traffic as T

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="budget-router")
    demo.add_parser(ap.add_subparsers(dest="command", required=True))
    return ap.parse_args(["demo", *argv])


# --- pure parts ---------------------------------------------------------------------

def test_parse_decision_header():
    d = demo.parse_decision("pool=short; est=1234; budget=2258; margin=0.120; cat=prose; reason=budget_fits_short")
    assert d == {"pool": "short", "est": "1234", "budget": "2258", "margin": "0.120", "cat": "prose",
                 "reason": "budget_fits_short"}
    assert demo.parse_decision(None) == {}


def test_builtin_mix_is_deterministic_and_covers_every_kind():
    a = T.builtin_mix(80, seed=7)
    b = T.builtin_mix(80, seed=7)
    assert [r.body() for r in a] == [r.body() for r in b]
    assert [r.index for r in a] == list(range(80))
    kinds = {r.kind for r in a}
    assert set(T.MIX_SHARES) <= kinds
    assert sum(r.deliberate_error for r in a) == 2
    assert any(r.stream for r in a) and any(r.max_tokens is None for r in T.builtin_mix(200, seed=1))
    longs = [r for r in a if r.kind == "long"]
    assert all(T.count_tokens(r.messages[0]["content"]) >= T.LONG_MIN_TOKENS for r in longs)
    tools = [r for r in a if r.kind == "tools"]
    assert tools and all(t["type"] == "function" and t["function"]["parameters"]["type"] == "object"
                         for r in tools for t in r.tools)
    assert T.builtin_mix(80, seed=8)[0].body() != a[0].body() or T.builtin_mix(80, seed=8)[1].body() != a[1].body()


def test_mix_shares_sum_to_one():
    assert abs(sum(T.MIX_SHARES.values()) - 1.0) < 1e-9


def test_trace_loaders(tmp_path):
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:17:03.9799600,4808,10\n"
                     "2023-11-16 18:17:04.0319600,3180,8\n"
                     "2023-11-16 18:17:05.9799600,100,20\n")
    reqs = T.from_trace(str(azure), n=10, seed=0)  # the planner's loader (one for both)
    assert [r.target_tokens for r in reqs] == [4808, 3180, 100]
    assert reqs[0].at == 0 and abs(reqs[1].at - 0.052) < 1e-6 and abs(reqs[2].at - 2.0) < 1e-6
    moon = tmp_path / "moon.jsonl"
    moon.write_text("\n".join(json.dumps({"timestamp": t, "input_length": i, "output_length": o, "hash_ids": []})
                              for t, i, o in [(0, 500, 50), (1500, 20_000, 100), (3000, 200_000, 900)]) + "\n")
    reqs = T.from_trace(str(moon), n=10, seed=0, rate=2.0)
    assert [r.at for r in reqs] == [0.0, 0.75, 1.5]
    assert [r.max_tokens for r in reqs][:2] == [50, 100]
    n = T.count_tokens(reqs[1].messages[0]["content"])
    assert abs(n + T.TEMPLATE_REQUEST_TOKENS + T.TEMPLATE_MESSAGE_TOKENS - 20_000) < 200
    assert reqs[2].clipped and T.count_tokens(reqs[2].messages[0]["content"]) + reqs[2].max_tokens <= T.TRACE_MAX_TOTAL_TOKENS
    assert len(T.from_trace(str(moon), n=10, seed=0, rate=1.0, duration=2.0)) == 2


def test_prompt_file_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"question_id": 1, "turns": ["First question?", "Follow-up?"]}) + "\n"
        + json.dumps({"uid": "x", "prompt": "Write a haiku."}) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([
        {"instruction": "翻译这句话", "input": "Hello", "output": "你好"},
        {"conversations": [{"from": "human", "value": "Weather in Kyoto?"},
                           {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Kyoto\"}}"},
                           {"from": "observation", "value": "{\"temp\": 21}"},
                           {"from": "gpt", "value": "It is 21 C."},
                           {"from": "human", "value": "And tomorrow?"}],
         "tools": json.dumps([{"name": "get_weather", "description": "d", "parameters": {"type": "object", "properties": {}}}])},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    ]))
    reqs = T.from_prompt_files(str(tmp_path), n=30, seed=3)
    assert len(reqs) == 30 and [r.index for r in reqs] == list(range(30))
    bodies = [r.body() for r in reqs]
    assert all(b["messages"][-1]["role"] == "user" for b in bodies)
    assert any(b.get("tools") and b["tools"][0]["type"] == "function" for b in bodies)
    assert any(len(b["messages"]) == 3 for b in bodies)  # two benchmark turns
    assert any(r.kind == "prompts:long" for r in reqs)


@pytest.mark.skipif(not (SHARED / "prompts").is_dir(), reason="../shared/data not present (a user's clone)")
def test_shared_prompt_files_load():
    reqs = T.from_prompt_files(str(SHARED / "prompts"), n=100, seed=0)
    assert len(reqs) == 100
    assert any(r.tools for r in reqs)


def test_analyze_classifies_misroutes_and_errors():
    R = demo.Result
    rs = [
        R(0, "prose", False, 100, False, 400, status=200, pool="short", estimate=90, budget=190, category="prose",
          prompt_tokens=100, completion_tokens=100),
        R(1, "near", False, 500, False, 400, status=200, pool="long", estimate=7500, budget=8000, category="code",
          prompt_tokens=7000, completion_tokens=500),                     # benign: 7500 <= 8192
        R(2, "near", False, 1024, False, 400, status=400, pool="short", estimate=7000, budget=8024, category="code",
          prompt_tokens=7400, error="... (7400 in the messages, 1024 in the completion)"),  # harmful
        R(3, "error:too_long", False, 256, True, 400, status=400, pool="long", reason="context_length_exceeded"),
        R(4, "prose", False, 100, False, 400, error="ConnectError"),
    ]
    a = demo.analyze(rs, 8192)
    assert a["misroutes"]["harmful"] == 1 and a["misroutes"]["benign"] == 1 and a["misroutes"]["judged"] == 3
    assert len(a["errors"]["deliberate"]) == 1
    assert [e["index"] for e in a["errors"]["unexpected"]] == [4]
    assert sum(a["statuses"].values()) == 5
    assert a["estimate_error"]["prose"]["first_p50"] == pytest.approx(0.1)


# --- end to end ---------------------------------------------------------------------------

def test_demo_end_to_end(tmp_path, capsys):
    """60 requests through the real stack in well under 40 s."""
    out = tmp_path / "demo"
    args = _parse(["--requests", "60", "--concurrency", "12", "--seed", "1", "--time-scale", "0.01",
                   "--latency-pairs", "10", "--deadline", "60", "--no-progress", "--out", str(out)])
    rc = args.func(args)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rep = json.loads((out / "report.json").read_text())
    a = rep["analysis"]
    assert a["requests"] == 60
    # every request accounted for: a status, a decision, and ok/error exclusive
    assert sum(a["statuses"].values()) == 60
    assert sum(a["pools"].values()) == 60
    assert sum(k["n"] for k in a["by_kind"].values()) == 60
    assert a["statuses"].get("200", 0) == a["ok"]
    assert a["errors"]["unexpected"] == []
    assert len(a["errors"]["deliberate"]) == 2
    # both pools served traffic, and the decision header agrees with the pool that answered
    assert a["pools"].get("short", 0) > 0 and a["pools"].get("long", 0) > 0
    assert a["served_by_mismatch"] == 0
    m = a["misroutes"]
    assert a["ok"] <= m["judged"] <= a["ok"] + m["harmful"] and m["harmful"] + m["benign"] <= m["judged"]
    assert a["estimate_error"]["all"]["n"] == a["ok"]
    lat = rep["latency"]
    assert lat["pairs"] == 10 and lat["envoy_p50_ms"] > 0 and lat["direct_p50_ms"] > 0
    assert rep["calibration"] and all(row["samples"] > 0 for row in rep["calibration"])
    for name in ("estimate_error.png", "pools.png"):
        p = out / name
        assert p.is_file() and p.read_bytes()[:8] == PNG_MAGIC
        assert str(p) in printed
    assert (out / "report.md").read_text().startswith("# budget-router demo report")
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(60))
    # each failure is a deliberate error or a harmful misroute the short pool refused
    failed = [r for r in rows if r["status"] != 200]
    assert all(r["deliberate"] or r["index"] in m["harmful_requests"] for r in failed)
    assert len(failed) == 60 - a["ok"]


def test_demo_reports_a_stack_that_fails_to_start(tmp_path, capsys, monkeypatch):
    """A component that dies at start: non-zero exit and the tail of its log."""
    import sys

    from extproc.tools import stack as S

    def broken_envoy(self):
        p = self._spawn("envoy", [sys.executable, "-c", "print('envoy: bad bootstrap (simulated)'); raise SystemExit(3)"])
        S._wait("envoy", lambda: False, p, timeout=10)

    monkeypatch.setattr(S.Stack, "start_envoy", broken_envoy)
    args = _parse(["--requests", "5", "--no-progress", "--out", str(tmp_path / "demo")])
    rc = args.func(args)
    err = capsys.readouterr().err
    assert rc == 1
    assert "did not start" in err and "envoy exited with code 3" in err
    assert "bad bootstrap (simulated)" in err
    assert not (tmp_path / "demo" / "report.json").exists()


def test_builtin_mix_scaled_for_real_vllm_pools():
    """--pools vllm: sizes /16 fit the 8,192-token long pool; the model name is the served one."""
    import argparse
    from extproc.tools import demo, vllm_pool
    full = T.builtin_mix(60, seed=3, b_short=2048)
    small = T.builtin_mix(60, seed=3, b_short=2048, scale=demo.VLLM_MIX_SCALE)
    assert sorted(r.kind for r in full) == sorted(r.kind for r in small)
    big = sum(r.content_bytes() for r in full if not r.deliberate_error)
    assert sum(r.content_bytes() for r in small if not r.deliberate_error) < big / 8
    assert all(r.max_tokens is None or r.max_tokens <= 1024 // 16 + 64 for r in small if not r.deliberate_error)
    args = argparse.Namespace(trace=None, prompts=None, requests=30, seed=1, pools="vllm")
    reqs, source = demo.build_requests(args, 2048)
    assert {r.body()["model"] for r in reqs} == {vllm_pool.VLLM_MODEL} and "x0.0625" in source
    assert all(r.max_tokens is not None for r in reqs)  # random weights never stop on their own
    assert demo.PROBE_MODEL in vllm_pool.SERVED_NAMES


def test_vllm_stack_config():
    from extproc.tools import stack as S
    cfg = S.vllm_config(S.loopback_config())
    assert (cfg.short.max_model_len, cfg.long.max_model_len, cfg.b_short) == (2048, 8192, 2048)


@pytest.mark.parametrize("cmd", ["demo", "up"])
def test_pools_vllm_without_the_environment_says_how_to_build_it(cmd, tmp_path):
    import subprocess
    import sys
    env = {**os.environ, "ROUTER_VLLM_VENV": str(tmp_path / "none")}
    p = subprocess.run([sys.executable, "-m", "extproc.cli", cmd, "--pools", "vllm"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "make vllm-env" in p.stderr, p.stderr


def test_one_trace_loader_azure_time_is_read_as_utc(monkeypatch, tmp_path):
    """demo --trace reads traces with the planner's loader, whose Azure
    TIMESTAMPs (no zone) are UTC: the arrivals do not depend on the machine's
    time zone, even across a DST change (New York sprang forward at 02:00 on
    2023-03-12; read as local time these two rows would be 2 minutes apart)."""
    import time
    if not os.path.exists("/usr/share/zoneinfo/America/New_York"):
        pytest.skip("no tz database")
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-03-12 01:59:00.5000000,100,10\n"
                     "2023-03-12 03:01:00.5000000,100,10\n")
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        reqs = T.from_trace(str(azure), n=10, seed=0)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert [r.at for r in reqs] == [0.0, 3720.0]


def test_port_base_gives_the_documented_layout_and_refuses_busy_ports():
    """Issue 17: `demo --port-base` (ports for firewalls, dashboards, a
    second demo): Envoy, Envoy admin, pools, workers, admin planes,
    Prometheus, in that order; a busy or out-of-range port is refused."""
    import socket
    from extproc import config as C
    from extproc.tools import stack
    from extproc.tools.stack import free_port_block
    args = _parse(["--port-base", "20000", "--requests", "5"])
    assert args.port_base == 20000
    base_cfg = C.load(env={}).replace(router={"workers": 2})
    port = free_port_block(12)
    cfg = stack.demo_config(base_cfg, port)
    assert (cfg.envoy.port, cfg.envoy.admin_port) == (port, port + 1)
    assert [t.endpoints for t in cfg.tiers] == [(f"127.0.0.1:{port + 2}",), (f"127.0.0.1:{port + 3}",)]
    assert (cfg.router.port, cfg.admin.port, cfg.telemetry.prometheus_port) == (port + 4, port + 6, port + 8)
    assert stack.port_layout(cfg, port)["last"] == port + 9
    with socket.socket() as s:
        s.bind(("127.0.0.1", port + 5))
        s.listen()
        with pytest.raises(ValueError, match=f"port\\(s\\) {port + 5} of"):
            stack.demo_config(base_cfg, port)
    with pytest.raises(ValueError, match="within 1-65535"):
        stack.demo_config(base_cfg, 65530)
    assert stack.demo_config(base_cfg).envoy.port != 0  # without it: free ports, as before

"""Start-up and state-file hygiene (issue 11 point 7): crash leftovers
removed, a snapshot restored less only its bad parts (issue 17), snapshots after N new samples,
and BUDGET_ROUTER_LOG_FORMAT=text as the README documents it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import orjson

from extproc import config as C
from extproc.core.router import Router
from extproc.serve import server as S
from extproc.serve import snapshot
from extproc.tools.stack import free_port_block

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Tell me a story about a fox. " * 20}]})


def trained_router(cfg: C.Config, n: int = 40) -> Router:
    r = Router(cfg)
    for i in range(n):
        d = r.route("/v1/chat/completions", BODY.encode())
        r.learn(d, 150 + i % 7, 100 + i)
    return r


def test_stale_temp_files_are_removed_at_start_only_ours(tmp_path):
    state = tmp_path / "state.json"
    cfg = C.Config().replace(router={"state_file": str(state)})
    mine = [tmp_path / (snapshot.temp_prefix(str(state)) + s) for s in ("abc123", "zz")]
    other_worker = tmp_path / (snapshot.temp_prefix(str(state) + ".w1") + "abc")
    legacy_old, legacy_new = tmp_path / ".state-old1", tmp_path / ".state-new1"
    unrelated = tmp_path / "notes.txt"
    for p in (*mine, other_worker, legacy_old, legacy_new, unrelated):
        p.write_bytes(b"{partial")
    old = time.time() - 2 * snapshot.LEGACY_TEMP_AGE_S
    os.utime(legacy_old, (old, old))
    link = tmp_path / (snapshot.temp_prefix(str(state)) + "link")
    os.symlink(unrelated, link)
    w = S.Worker(cfg, 0, telemetry=False)
    assert w.load_state() is False
    left = set(os.listdir(tmp_path))
    assert not any(p.name in left for p in mine) and legacy_old.name not in left
    # another worker's file (it may be writing it now), a recent legacy one,
    # a symlink and unrelated files stay
    assert {other_worker.name, legacy_new.name, unrelated.name, link.name} <= left
    # and a save leaves no temporary behind
    w.save_state()
    assert [n for n in os.listdir(tmp_path) if n.startswith(snapshot.temp_prefix(str(state)))] == [link.name]


def test_a_bad_part_costs_only_that_part_and_says_so(tmp_path, caplog):
    """Issue 17: a bad output sketch or category fit is dropped and logged;
    the rest of the learning survives the restart."""
    state = tmp_path / "state.json"
    cfg = C.Config().replace(router={"state_file": str(state)})
    good = trained_router(cfg).snapshot()
    bad = json.loads(orjson.dumps(good, option=orjson.OPT_SERIALIZE_NUMPY))
    bad["outputs"][0]["counts"][0] = -5.0
    bad["estimator"]["fits"][0]["abs_err"] = 1e9
    lost = (bad["estimator"]["fits"][0]["model"], bad["estimator"]["fits"][0]["category"])
    state.write_bytes(orjson.dumps(bad))
    w = S.Worker(cfg, 0, telemetry=False)
    with caplog.at_level("WARNING"):
        assert w.load_state() is True
    assert w.router.samples() == 40 and "m" in w.router.estimator.models
    assert lost not in w.router.estimator.fits and w.router.outputs.sketches == {}
    assert caplog.text.count("part dropped") == 2 and "abs_err" in caplog.text and "output-length" in caplog.text
    # the poisoned root fit, from a file: the same check as the admin API
    poisoned = json.loads(orjson.dumps(good, option=orjson.OPT_SERIALIZE_NUMPY))
    n = len(poisoned["estimator"]["root"]["b"])
    poisoned["estimator"]["root"].update(A=[0.0] * (n * n), b=[1e6] * n, samples=1000)
    state.write_bytes(orjson.dumps(poisoned))
    w = S.Worker(cfg, 0, telemetry=False)
    assert w.load_state() is False and w.router.samples() == 0
    state.write_bytes(orjson.dumps(good, option=orjson.OPT_SERIALIZE_NUMPY))
    w = S.Worker(cfg, 0, telemetry=False)
    assert w.load_state() is True and w.router.samples() == 40


def test_snapshot_after_n_new_samples(tmp_path, monkeypatch):
    """kill -9 loses at most ~snapshot_samples of learning, not 30 s of it."""
    monkeypatch.setattr(S, "SNAPSHOT_CHECK_S", 0.05)
    monkeypatch.setattr(S, "SNAPSHOT_MIN_GAP_S", 0.2)
    state = tmp_path / "state.json"
    cfg = C.Config().replace(router={"state_file": str(state), "port": free_port_block(1),
                                     "snapshot_interval_s": 3600.0, "snapshot_samples": 10},
                             admin={"port": free_port_block(1)})

    async def run() -> list[int]:
        w = S.Worker(cfg, 0, telemetry=False)
        await w.start()
        stop = asyncio.Event()
        task = asyncio.create_task(w.run_until(stop))
        seen = []
        d = w.router.route("/v1/chat/completions", BODY.encode())
        for i in range(25):
            w.router.learn(d, 150, 100)
            await asyncio.sleep(0.03)
            if state.exists():
                seen.append(json.loads(state.read_bytes())["estimator"]["root"]["samples"])
        await asyncio.sleep(0.3)
        seen.append(json.loads(state.read_bytes())["estimator"]["root"]["samples"])
        stop.set()
        await task
        return seen

    seen = asyncio.run(run())
    # written once 10 new samples were there, not after an hour; rate-bounded
    assert seen and seen[0] >= 10 and 25 - seen[-1] < 10
    assert len(set(seen)) <= 25 * 0.03 / 0.2 + 2


def test_log_format_text_works_as_documented(tmp_path):
    port, admin = free_port_block(1), free_port_block(1)
    env = {**os.environ, "BUDGET_ROUTER_LOG_FORMAT": "text", "BUDGET_ROUTER_LOG_LEVEL": "info",
           "BUDGET_ROUTER_ROUTER_STATE_FILE": str(tmp_path / "state.json"),
           "BUDGET_ROUTER_TELEMETRY_PROMETHEUS_PORT": "0", "BUDGET_ROUTER_ADMIN_PORT": str(admin)}
    env.pop("BUDGET_ROUTER_ADMIN_TOKEN", None)
    p = subprocess.Popen([sys.executable, "-m", "extproc.cli", "serve", "--port", str(port)],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                         start_new_session=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "serving ext_proc" not in line:
            line = p.stderr.readline()
            assert line or p.poll() is None, "serve exited"
        assert "serving ext_proc" in line and " INFO " in line and not line.lstrip().startswith("{")
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)
    assert p.returncode == 0

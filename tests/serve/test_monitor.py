"""The pool monitor (extproc.serve.monitor): real HTTP scrapes of the simulated
vLLM pool's /metrics and of a recorded vLLM 0.32 exposition, names resolved on
every scrape, staleness, and one scrape shared by several router workers."""

from __future__ import annotations

import asyncio
import http.server
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from extproc import config as C
from extproc.admin import cli as admin_cli
from extproc.admin.v1 import admin_pb2 as pb
from extproc.backend.pool import PoolConfig
from extproc.backend.server import BackendSettings, BackgroundServer
from extproc.core.load import Sample, tier_loads
from extproc.serve import monitor as mon
from extproc.tools.stack import loopback_config

REAL_0_32 = (Path(__file__).resolve().parents[1] / "data" / "vllm_0_32_metrics.txt").read_text()


class RecordedMetrics:
    """Serves a fixed /metrics text on loopback and counts the scrapes."""

    def __init__(self, text: str):
        outer = self
        self.hits = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                body = text.encode()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _cfg(endpoints_short, endpoints_long=("127.0.0.1:1",), interval=0.2) -> C.Config:
    return C.Config().replace(short={"endpoints": tuple(endpoints_short)}, long={"endpoints": tuple(endpoints_long)},
                              monitor={"interval_s": interval})


def test_recorded_vllm_0_32_metrics_scraped_by_dns_name_and_turn_stale():
    srv = RecordedMetrics(REAL_0_32)
    try:
        cfg = _cfg([f"localhost:{srv.port}"])
        m = mon.Monitor(cfg)

        async def rounds(n):
            for _ in range(n):
                await m.scrape_once()
            await m.close()

        asyncio.run(rounds(2))
    finally:
        srv.close()
    # "localhost" resolved to the loopback address the server listens on.
    inst = m.instances["short"][f"127.0.0.1:{srv.port}"]
    assert (inst.last.running, inst.last.waiting, inst.last.kv_usage, inst.last.preemptions) == (3.0, 0.0, 0.12, 11.0)
    assert inst.prev is not None and inst.preemption_rate() == 0.0
    assert m.instances["long"] == {}  # nothing listens on port 1: no sample, no crash
    now = inst.last.t
    short, long = tier_loads(["short", "long"], m.instances, now + 0.1, 0.2, 3)
    assert short.known and short.running == 3.0 and short.kv_usage == 0.12 and not long.known
    (stale,) = tier_loads(["short"], m.instances, now + 0.61, 0.2, 3)
    assert not stale.known


def test_simulated_pool_queue_shows_as_waiting():
    settings = BackendSettings(name="short", time_scale=0.05, pool=PoolConfig(
        max_model_len=8192, max_num_seqs=1, kv_cache_tokens=65536))
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":400,"ignore_eos":true}'
    with BackgroundServer(settings) as srv:
        def send():
            req = urllib.request.Request(srv.base_url + "/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()

        threads = [threading.Thread(target=send) for _ in range(3)]
        for t in threads:
            t.start()
        cfg = _cfg([f"127.0.0.1:{srv.port}"])
        m = mon.Monitor(cfg)

        async def until_queued():
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                await m.scrape_once()
                s = m.instances["short"].get(f"127.0.0.1:{srv.port}")
                if s and s.last.waiting >= 2:
                    break
                await asyncio.sleep(0.05)
            await m.close()

        asyncio.run(until_queued())
        for t in threads:
            t.join(60)
    s = m.instances["short"][f"127.0.0.1:{srv.port}"].last
    assert (s.running, s.waiting) == (1.0, 2.0) and s.kv_usage > 0


def test_publish_and_read_round_trip(tmp_path):
    from extproc.core.load import Instance
    inst = {"short": {"10.0.0.1:8000": Instance(Sample(5.0, 1, 2, 0.5, 3.0)).then(Sample(6.0, 1, 3, 0.6, 4.0))}}
    path = str(tmp_path / "signals.json")
    mon.publish(path, inst)
    assert mon.read_published(path) == inst
    Path(path).write_text("{not json")
    assert mon.read_published(path) is None
    assert mon.read_published(str(tmp_path / "absent.json")) is None


def test_workers_share_one_scrape(tmp_path):
    """Two workers: the supervisor scrapes each endpoint once per interval and
    both workers see the tier's load (admin GetCalibration)."""
    srv = RecordedMetrics(REAL_0_32)
    cfg = loopback_config(C.Config(), workers=2).replace(
        short={"endpoints": (f"127.0.0.1:{srv.port}",)}, monitor={"interval_s": 0.2},
        router={"state_file": str(tmp_path / "state.json")}, telemetry={"prometheus_port": 0})
    path = tmp_path / "router.toml"
    path.write_text(C.to_toml(cfg))
    p = subprocess.Popen([sys.executable, "-m", "extproc.cli", "serve", "--config", str(path)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        seen: list = []
        while time.monotonic() < deadline:
            res = admin_cli.call_all(cfg, "GetCalibration", pb.GetCalibrationRequest())
            seen = [r for _, r in res if isinstance(r, pb.Calibration) and r.tiers[0].known]
            if len(seen) == 2:
                break
            time.sleep(0.2)
        assert len(seen) == 2, "both workers should see the short tier's load"
        assert {r.worker for r in seen} == {0, 1}
        assert all(r.tiers[0].running == 3.0 and r.tiers[0].instances == 1 for r in seen)
        h0, t0 = srv.hits, time.monotonic()
        time.sleep(2.0)
        rounds = (time.monotonic() - t0) / 0.2
        # one scrape per interval (not one per worker); generous for a loaded machine
        assert srv.hits - h0 <= rounds + 2
        assert srv.hits - h0 >= 2
    finally:
        os.killpg(p.pid, 15)
        p.wait(30)
        srv.close()

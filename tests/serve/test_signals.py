"""Signals of ``budget-router serve`` (issue 17 item 5, issue 18 point 2),
against the real process with one and two workers: SIGHUP reloads the
config file and nothing dies; SIGTERM drains (health NOT_SERVING while the
port still routes, for drain_delay_s) before it closes; workers never
outlive the supervisor, even one killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import config as C
from extproc.tools.stack import free_port_block

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Tell me about foxes. " * 30}]}).encode()


class Served:
    """``budget-router serve`` in its own session with a config file."""

    def __init__(self, tmp_path, workers: int, drain_delay_s: float, b_short: int = 8192):
        self.workers = workers
        self.port, self.admin = free_port_block(workers), free_port_block(workers)
        self.config = tmp_path / "router.toml"
        self.state = tmp_path / "state.json"
        self.drain_delay_s = drain_delay_s
        self.write(b_short)
        self.log = tmp_path / "router.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(C.ENV_PREFIX)}
        env.update(BUDGET_ROUTER_LOG_LEVEL="info")
        self.p = subprocess.Popen([sys.executable, "-m", "extproc.cli", "serve", "--config", str(self.config)],
                                  stderr=open(self.log, "wb"), stdout=subprocess.DEVNULL, env=env,
                                  start_new_session=True)

    def write(self, b_short: int) -> None:
        self.config.write_text(
            f'[router]\nport = {self.port}\nworkers = {self.workers}\nstate_file = "{self.state}"\n'
            f'drain_delay_s = {self.drain_delay_s}\ndrain_seconds = 2.0\n'
            f'[admin]\nport = {self.admin}\n[telemetry]\nprometheus_port = 0\n'
            f'[monitor]\nenabled = false\n[policy]\nb_short = {b_short}\n')

    def lines(self) -> list[dict]:
        out = []
        for ln in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(ln))
            except ValueError:
                pass
        return out

    def wait_log(self, text: str, count: int, timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [d for d in self.lines() if text in d.get("msg", "")]
            if len(hits) >= count:
                return hits
            assert self.p.poll() is None, f"serve exited: {self.log.read_text()[-2000:]}"
            time.sleep(0.1)
        raise AssertionError(f"{count} x {text!r} not logged: {self.log.read_text()[-2000:]}")

    def health(self, i: int = 0) -> int:
        with grpc.insecure_channel(f"127.0.0.1:{self.port + i}") as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status

    def route(self, i: int = 0) -> str:
        """One ext_proc exchange (headers, body): the pool header it set."""
        with grpc.insecure_channel(f"127.0.0.1:{self.port + i}") as ch:
            h = pb.ProcessingRequest()
            hdr = h.request_headers.headers.headers
            for k, v in ((":path", "/v1/chat/completions"), (":method", "POST"),
                         ("content-type", "application/json")):
                hdr.add(key=k, raw_value=v.encode())
            b = pb.ProcessingRequest()
            b.request_body.body = BODY
            b.request_body.end_of_stream = True
            out = list(pbg.ExternalProcessorStub(ch).Process(iter([h, b]), timeout=5))
        muts = out[-1].request_body.response.header_mutation.set_headers
        return next(m.header.raw_value.decode() for m in muts if m.header.key == "x-budget-pool")

    def worker_pids(self) -> list[int]:
        """Pids of the workers started so far (from their "serving" lines)."""
        return sorted(int(d["msg"].split("(pid ", 1)[1].split(")", 1)[0]) for d in self.lines()
                      if "serving ext_proc" in d.get("msg", ""))

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait(timeout=10)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_the_config_file_and_nothing_dies(tmp_path, workers):
    s = Served(tmp_path, workers, drain_delay_s=0.0)
    try:
        s.wait_log("serving ext_proc", workers)
        assert s.route(0) == "short"
        pids = s.worker_pids()
        s.write(b_short=512)  # the smallest allowed: this request no longer fits short
        os.kill(s.p.pid, signal.SIGHUP)
        s.wait_log("SIGHUP: configuration reloaded", workers)
        audit = s.wait_log("admin change: config reload", workers)
        assert all("[tiers] short.budget_limit = 512" in a["msg"] and a["caller"] == "signal SIGHUP" for a in audit)
        assert s.p.poll() is None and s.worker_pids() == pids
        for i in range(workers):
            assert s.health(i) == health_pb2.HealthCheckResponse.SERVING
            assert s.route(i) == "long"
        # a bad file: logged, nothing changes, still serving
        s.config.write_text("[policy]\nb_short = -1\n")
        os.kill(s.p.pid, signal.SIGHUP)
        s.wait_log("SIGHUP: configuration not reloaded", workers)
        assert s.route(0) == "long" and s.p.poll() is None
        s.p.send_signal(signal.SIGTERM)
        assert s.p.wait(timeout=30) == 0
        assert all(_port_free(s.port + i) for i in range(workers))
    finally:
        s.close()


def test_sigterm_drains_not_serving_but_routing_then_closes(tmp_path):
    """Issue 18: SIGTERM -> health NOT_SERVING -> still routing for
    drain_delay_s -> closed, with a snapshot."""
    delay = 3.0
    s = Served(tmp_path, 1, drain_delay_s=delay)
    try:
        s.wait_log("serving ext_proc", 1)
        assert s.health() == health_pb2.HealthCheckResponse.SERVING
        t0 = time.monotonic()
        s.p.send_signal(signal.SIGTERM)
        s.wait_log("draining: health NOT_SERVING", 1, timeout=5)
        assert s.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert s.route() == "short"  # a new stream on a new connection is still routed
        assert time.monotonic() - t0 < delay - 0.5
        assert s.p.wait(timeout=30) == 0
        assert time.monotonic() - t0 >= delay
        assert s.state.exists() and _port_free(s.port)
    finally:
        s.close()


def test_second_sigterm_cuts_the_drain_delay_short(tmp_path):
    s = Served(tmp_path, 1, drain_delay_s=60.0)
    try:
        s.wait_log("serving ext_proc", 1)
        t0 = time.monotonic()
        s.p.send_signal(signal.SIGTERM)
        s.wait_log("draining: health NOT_SERVING", 1, timeout=5)
        s.p.send_signal(signal.SIGTERM)
        assert s.p.wait(timeout=30) == 0 and time.monotonic() - t0 < 30
    finally:
        s.close()


def test_workers_never_outlive_the_supervisor(tmp_path):
    """Issue 17: a supervisor killed with SIGKILL left its workers holding the
    ports; now the kernel sends them SIGTERM (parent-death signal), they
    drain, snapshot and exit, and the next serve can bind."""
    s = Served(tmp_path, 2, drain_delay_s=0.5)
    try:
        s.wait_log("serving ext_proc", 2)
        pids = s.worker_pids()
        assert len(pids) == 2
        os.kill(s.p.pid, signal.SIGKILL)
        s.p.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
        assert _port_free(s.port) and _port_free(s.port + 1)
        assert sum("drained and stopped" in d.get("msg", "") for d in s.lines()) == 2
    finally:
        for p in s.worker_pids():
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        s.close()

"""Warm start (issue 12 item 3), with two real router processes: the second
has no snapshot of its own, fetches the first's calibration from its admin
API (authenticated, by a name that resolves to several addresses), checks
it, and only then opens its ext_proc port; with no peer answering it starts
from the prior within warm_start_timeout_s."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import config as C
from extproc.admin import auth
from extproc.admin.v1 import admin_pb2 as pb
from extproc.admin.v1 import admin_pb2_grpc as pbg
from extproc.tools.stack import free_port_block

from tests.serve.test_startup_state import trained_router

TOKEN = "warm-start-token-0123456789abcdef"
AUTH = auth.call_metadata(TOKEN)


def _config(tmp, name: str, **admin) -> tuple[C.Config, str]:
    cfg = C.Config().replace(
        router={"port": free_port_block(1), "state_file": str(tmp / name / "state.json")},
        admin={"port": free_port_block(1), **admin}, telemetry={"prometheus_port": 0})
    os.makedirs(tmp / name, exist_ok=True)
    path = str(tmp / name / "budget-router.toml")
    with open(path, "w") as f:
        f.write(C.to_toml(cfg))
    return cfg, path


class Router:
    def __init__(self, cfg: C.Config, path: str, log: str, token: str = TOKEN):
        self.cfg, self.log = cfg, log
        env = {**os.environ, auth.TOKEN_ENV: token}
        with open(log, "wb") as out:
            self.p = subprocess.Popen([sys.executable, "-m", "extproc.cli", "serve", "--config", path],
                                      stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.cfg.router.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60) -> float:
        t0 = time.monotonic()
        while not self.listening():
            assert self.p.poll() is None, open(self.log).read()
            assert time.monotonic() - t0 < timeout, open(self.log).read()
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{self.cfg.router.port}") as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        return time.monotonic() - t0

    def calibration(self) -> pb.Calibration:
        with grpc.insecure_channel(f"127.0.0.1:{self.cfg.admin.port}") as ch:
            return pbg.AdminStub(ch).GetCalibration(pb.GetCalibrationRequest(), timeout=5, metadata=AUTH)

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()


@pytest.fixture
def routers():
    started: list[Router] = []
    yield started
    for r in started:
        r.stop()


def test_second_replica_starts_with_the_first_ones_calibration(tmp_path, routers):
    cfg_a, path_a = _config(tmp_path, "a")
    trained = trained_router(cfg_a, 60)
    with open(cfg_a.router.state_file, "wb") as f:
        f.write(orjson.dumps(trained.snapshot(), option=orjson.OPT_SERIALIZE_NUMPY))
    a = Router(cfg_a, path_a, str(tmp_path / "a.log"))
    routers.append(a)
    a.wait_ready()
    assert a.calibration().fits  # A learned (from its state file)

    # "localhost" resolves to 127.0.0.1 and ::1 here; A listens on the first
    # only: a name with several addresses, one of them dead.
    cfg_b, path_b = _config(tmp_path, "b", warm_start_peers=(f"localhost:{cfg_a.admin.port}",),
                            warm_start_timeout_s=20.0)
    b = Router(cfg_b, path_b, str(tmp_path / "b.log"))
    routers.append(b)
    b.wait_ready()
    fits_a = [f.SerializeToString() for f in a.calibration().fits]
    assert [f.SerializeToString() for f in b.calibration().fits] == fits_a
    log = open(b.log).read()
    # fetched before the ext_proc port opened (the start order is in one process's log)
    assert log.index("warm start: calibration from") < log.index("serving ext_proc")
    assert "127.0.0.1:%d" % cfg_a.admin.port in log
    assert not os.path.exists(cfg_b.router.state_file)  # nothing local: it came from A

    # a replica whose peer wants a token it does not have starts from the prior
    cfg_c, path_c = _config(tmp_path, "c", warm_start_peers=(f"127.0.0.1:{cfg_a.admin.port}",),
                            warm_start_timeout_s=2.0)
    c = Router(cfg_c, path_c, str(tmp_path / "c.log"), token="another-token-0123456789abcdef")
    routers.append(c)
    c.wait_ready()
    log = open(c.log).read()
    assert "UNAUTHENTICATED" in log and "starting from the prior" in log


def test_no_peer_answering_starts_from_the_prior_within_the_bound(tmp_path, routers):
    dead = free_port_block(1)
    cfg, path = _config(tmp_path, "lonely", warm_start_peers=(f"127.0.0.1:{dead}",), warm_start_timeout_s=2.0)
    r = Router(cfg, path, str(tmp_path / "lonely.log"))
    routers.append(r)
    t = r.wait_ready()
    assert "starting from the prior" in open(r.log).read()
    assert t < 2.0 + 30  # the bound plus a (loaded) process start
    assert not r.calibration().fits

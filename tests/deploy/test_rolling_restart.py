"""A rolling restart of the router under load routes every request.

Real Envoy (the rendered bootstrap: gRPC health checks of the router
endpoints every second, unhealthy after 2 failures) in front of TWO router
replicas on loopback (separate `budget-router serve` processes, the two
endpoints of Envoy's ext_proc cluster, as two pods behind a gateway) and the
simulated pools. Clients send short and long requests throughout; replica 0
is restarted (SIGTERM, wait for its exit, start again, wait until Envoy sees
it healthy), then replica 1. Every answer must be 200 and carry the router's
decision header: a request Envoy passed on unprocessed (fail open) has none.

This needs the server's drain (issue 17, the reliability helper's part of
issue 18): on SIGTERM, gRPC health NOT_SERVING while it keeps serving for
[router] drain_delay_s, so Envoy's health check moves new streams to the
other replica before the listener closes. A server that closes its listener
at once refuses the streams Envoy still sends it in the second or two before
its health check notices: those fail open. The test looks for the behaviour
(NOT_SERVING from the SIGTERMed replica while its port still answers): when
it is absent the test fails; with it, every request must be routed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import json


from extproc import config as C
from extproc.tools import stack as S

#: Client threads: enough to keep both replicas busy on a 2-core machine
#: without starving the processes under test.
CLIENTS = 4
#: Bounds of the load (time and count), whatever happens.
MAX_REQUESTS = 20_000
MAX_SECONDS = 90.0
#: In-flight drain of each replica: the simulated pools answer in
#: milliseconds (time scale 0), so 3 s is plenty and keeps the test short.
DRAIN_SECONDS = 3.0
#: NOT_SERVING before the listener closes: Envoy's router health check
#: (marked down within unhealthy threshold x interval = 3 s; envoy.bootstrap) needs up to 3 s to
#: move new streams away. The loopback stack sets 0 for fast tests; a
#: rollout needs it.
DRAIN_DELAY_S = 4.0
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 1500   # ~67 KB: long pool


def _health(port: int) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            res = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
        except grpc.RpcError:
            return None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(res.status)


def _post(url: str, prompt: str) -> tuple[int, str | None]:
    body = json.dumps({"model": "demo", "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]}).encode()
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
            return r.status, r.headers.get("x-budget-decision")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-budget-decision")
    except OSError:
        return 0, None


def test_rolling_restart_under_load_routes_every_request():
    workdir = tempfile.mkdtemp(prefix="budget-router-rolling-")
    # Envoy's config lists two router endpoints (workers=2: port, port+1);
    # each replica is its own one-worker server on one of them.
    cfg = S.loopback_config(C.load(env={}), workers=2)
    cfg = cfg.replace(router={"drain_seconds": DRAIN_SECONDS, "drain_delay_s": DRAIN_DELAY_S, "state_file": f"{workdir}/state.json"},
                      monitor={"enabled": False})
    admin_base = S.free_port_block(2)
    prom_base = S.free_port_block(2)
    st = S.Stack(cfg, workdir=workdir, time_scale=0.0, with_router=False)

    def replica_cfg(i: int) -> str:
        c = cfg.replace(router={"workers": 1, "port": cfg.router.port + i, "state_file": f"{workdir}/state-{i}.json"},
                        admin={"port": admin_base + i}, telemetry={"prometheus_port": prom_base + i})
        path = f"{workdir}/replica-{i}.toml"
        with open(path, "w") as f:
            f.write(C.to_toml(c))
        return path

    def start_replica(i: int) -> None:
        st._spawn(f"router-{i}", [sys.executable, "-m", "extproc.cli", "serve", "--config", replica_cfg(i)])

    def wait(what: str, check, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"{what} within {timeout} s\n" + "\n".join(
                f"--- {n}\n{st.log_tail(n)}" for n in st.logs)
            time.sleep(0.1)

    results: list[tuple[float, int, str | None]] = []   # (time sent, status, decision header)
    stop = threading.Event()

    def client(k: int) -> None:
        n = 0
        while not stop.is_set() and len(results) < MAX_REQUESTS:
            prompt = LONG_PROMPT if (n + k) % 4 == 0 else "Say hello in five words."
            sent = time.monotonic()
            results.append((sent, *_post(st.url + "/chat/completions", prompt)))
            n += 1

    try:
        st.start()
        for i in (0, 1):
            start_replica(i)
        wait("Envoy sees both replicas healthy", lambda: st._healthy("budget_router", 2))
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(CLIENTS)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(2.0)
        first_sigterm = time.monotonic()
        drain_seen = False
        events: list[tuple[float, str]] = []
        for i in (0, 1):
            p = st.procs[f"router-{i}"]
            os.killpg(p.pid, signal.SIGTERM)
            events.append((time.monotonic(), f"SIGTERM {i}"))
            # The drain, if the server has it: NOT_SERVING while the port answers.
            t_sig = time.monotonic()
            while p.poll() is None and time.monotonic() - t_sig < 2.0:
                if _health(cfg.router.port + i) == "NOT_SERVING":
                    drain_seen = True
                    break
                time.sleep(0.05)
            p.wait(timeout=60)
            events.append((time.monotonic(), f"exit {i}"))
            assert p.returncode == 0, st.log_tail(f"router-{i}")
            start_replica(i)
            # The new process serving, then Envoy's health check passing on it
            # (right after the exit, Envoy may not have marked it down yet).
            # 60 s: a Python server's start on a loaded 2-core machine (a run took over 30).
            wait(f"replica {i} SERVING again", lambda: _health(cfg.router.port + i) == "SERVING", timeout=60.0)
            wait(f"Envoy sees replica {i} healthy again", lambda: st._healthy("budget_router", 2))
            events.append((time.monotonic(), f"healthy {i}"))
            time.sleep(1.0)
            assert time.monotonic() - t0 < MAX_SECONDS
        stop.set()
        for t in threads:
            t.join(timeout=15)
    finally:
        stop.set()
        for i in (0, 1):
            st.stop_process(f"router-{i}")
        st.stop()
    total = len(results)
    unrouted = [r for r in results if r[1] != 200 or not r[2]]
    before = [r for r in results if r[0] < first_sigterm]
    print(f"rolling restart: {total} requests ({len(before)} before the first SIGTERM), "
          f"{len(unrouted)} not routed, drain seen: {drain_seen}")
    assert total >= 200, f"too little load to judge: {total} requests"
    # The baseline holds whatever the server does: with both replicas up,
    # every request is routed (else the failures below are not the restart's).
    assert before and all(s == 200 and d for _, s, d in before), [r for r in before if r[1] != 200 or not r[2]][:5]
    # Where the unrouted ones fell: per phase between events (diagnostics).
    marks = [(first_sigterm - 1e-9, "start")] + events + [(float("inf"), "end")]
    for (a, what), (b, _) in zip(marks, marks[1:]):
        n = sum(1 for r in unrouted if a <= r[0] < b)
        m = sum(1 for r in results if a <= r[0] < b)
        print(f"  after {what} (+{a - first_sigterm:.1f} s): {n} of {m} not routed")
    from collections import Counter
    kinds = Counter("no decision header" if s == 200 else f"status {s}" for _, s, _ in unrouted)
    assert drain_seen, "no NOT_SERVING between SIGTERM and exit: the server's drain delay is gone"
    assert not unrouted, f"{len(unrouted)} of {total} not routed {dict(kinds)}: {unrouted[:5]}"

"""bench/attack.py's attacks (issue 17), short, against the real fast transport.

Each case runs the router's Worker behind ``serve_fast`` in its own process
(tests.serve.test_h2_limits.server) while a well-behaved gRPC client routes
requests on its own connection (``probe_keeps_latency``: no error, median
within a generous ratio of its baseline). Held streams on many connections
are reclaimed oldest first instead of switching routing off; TLS handshakes
complete on uvloop (the router's loop) even when the ClientHello is read
before start_tls takes the socket over; established TLS connections are
charged to the memory budget and bounded by their share of it. (Reconnecting
rapid reset: test_h2_limits.test_rapid_reset_by_reconnecting_is_counted_per_peer;
half TLS handshakes: test_router_tls.test_half_tls_handshakes_are_bounded_and_released.)
"""

from __future__ import annotations

import shutil
import socket
import ssl
import time

import hpack
import pytest
from grpc_health.v1 import health_pb2

from extproc.serve import h2frames as h2
from extproc.serve import limits as L
from extproc.tools.pki import make_pki

from .test_h2_limits import _health, _wait_for, connect, headers, probe_keeps_latency, server

#: Memory budget of the held-stream test, in streams (H2_STREAM_COST_BYTES each).
BUDGET_STREAMS = 400
#: Connections that fill the budget with held streams, then the ones that
#: come later: the later ones fewer, so that there are always streams older
#: than the reclaim age to reset (a budget full of only young streams refuses
#: new ones for that long: test_young_streams_are_not_reclaimed).
HOLDERS = 4
LATER_HOLDERS = 3
#: The reclaim age the test server runs with (H2_RECLAIM_MIN_AGE_S in production).
RECLAIM_AGE_S = 0.2


def _hold(port: int, n: int) -> socket.socket:
    enc, s = hpack.Encoder(), connect(port)
    s.sendall(b"".join(headers(enc, 2 * i + 1) for i in range(n)))
    return s


def test_held_streams_on_many_connections_do_not_switch_routing_off(tmp_path):
    """Connections holding 1.75x the memory budget in header-only streams
    (each within its connection share): the oldest incomplete streams are
    reset to make room, so a well-behaved client keeps routing without one
    RESOURCE_EXHAUSTED, health stays SERVING, and the budget is never
    exceeded; the streams that fit are not touched before they are old."""
    cost = L.H2_STREAM_COST_BYTES
    per_conn = BUDGET_STREAMS // HOLDERS
    assert per_conn * cost <= BUDGET_STREAMS * cost * L.H2_CONNECTION_BUDGET_SHARE  # within each share
    with server(tmp_path, memory_budget_bytes=BUDGET_STREAMS * cost, reclaim_min_age_s=RECLAIM_AGE_S) as srv:
        holders = [_hold(srv.port, per_conn) for _ in range(HOLDERS)]  # the budget, full
        assert _wait_for(lambda: srv.stats()["mem_used"] >= BUDGET_STREAMS * cost)
        time.sleep(RECLAIM_AGE_S)
        with probe_keeps_latency(srv.port):  # no error: every probe stream admitted
            for _ in range(LATER_HOLDERS):
                holders.append(_hold(srv.port, per_conn))
            assert _wait_for(lambda: srv.counter("streams_reclaimed") >= LATER_HOLDERS * per_conn)
            # A budget full of streams younger than the reclaim age may read
            # NOT_SERVING for that long (Envoy needs several failed checks in a row).
            time.sleep(RECLAIM_AGE_S)
            assert _health(srv) == health_pb2.HealthCheckResponse.SERVING
        st = srv.stats()
        assert st["mem_used"] <= BUDGET_STREAMS * cost, st
        assert st["counters"].get("memory_refused", 0) == 0, st
        for s in holders:
            s.close()
        assert _wait_for(lambda: srv.stats()["mem_used"] == 0)


def test_young_streams_are_not_reclaimed(tmp_path):
    """A budget full of streams younger than reclaim_min_age_s: a new stream
    is refused (RESOURCE_EXHAUSTED) rather than one of them reset."""
    cost = L.H2_STREAM_COST_BYTES
    with server(tmp_path, memory_budget_bytes=40 * cost, reclaim_min_age_s=3600) as srv:
        holders = [_hold(srv.port, 10) for _ in range(5)]  # 50 streams for a budget of 40
        assert _wait_for(lambda: srv.counter("memory_refused") == 10)
        assert srv.counter("streams_reclaimed") == 0 and srv.stats()["mem_used"] == 40 * cost
        for s in holders:
            s.close()


# --- TLS --------------------------------------------------------------------------

pytls = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def _tls_connect(port: int, pki: dict, timeout: float) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(pki["client"], pki["client_key"])
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout), server_hostname="127.0.0.1")
    s.sendall(h2.PREFACE + h2.settings_frame([]))
    assert s.recv(9)  # our SETTINGS: HTTP/2 is up
    return s


#: TLS connections the uvloop test makes one after another (before the fix
#: about half of them stalled until the handshake timeout).
UVLOOP_CONNECTIONS = 30


@pytls
def test_tls_handshakes_complete_on_uvloop(tmp_path, pki):
    """On uvloop (the router's loop) a ClientHello already on the socket when
    the connection is accepted reaches the SSL layer: every handshake
    completes at once, none waits for the handshake timeout."""
    pytest.importorskip("uvloop")
    with server(tmp_path, loop="uvloop", tls=[pki["server"], pki["server_key"], pki["ca"]],
                tls_handshake_timeout_s=5.0) as srv:
        slow = []
        for _ in range(UVLOOP_CONNECTIONS):
            t = time.monotonic()
            _tls_connect(srv.port, pki, timeout=10).close()
            if time.monotonic() - t > 2.0:
                slow.append(round(time.monotonic() - t, 1))
        assert not slow, slow


#: TLS connections the share of the charge test admits (tls_connections_budget_share).
TLS_FIT = 6


@pytls
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_idle_tls_connections_are_charged_and_bounded(tmp_path, pki, loop):
    """Each established TLS connection holds tls_connection_cost_bytes of the
    budget until it closes; past the TLS connections' share the longest-idle
    one is closed to make room, so idle TLS connections never hold more than
    their share; closing them returns every byte."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    cost, budget = L.H2_TLS_CONNECTION_COST_BYTES, L.H2_MEMORY_BUDGET_BYTES
    share = (TLS_FIT + 0.5) * cost / budget
    from .test_router_tls import _creds
    with server(tmp_path, _creds(pki), loop=loop, tls=[pki["server"], pki["server_key"], pki["ca"]],
                tls_connections_budget_share=share) as srv:
        st = srv.stats()  # the stats channel: one TLS connection
        assert st["tls_mem"] == cost and st["mem_used"] == cost, st
        socks = [_tls_connect(srv.port, pki, timeout=10) for _ in range(TLS_FIT - 1)]
        st = srv.stats()
        assert st["tls_mem"] == st["mem_used"] == TLS_FIT * cost and st["connections"] == TLS_FIT, st
        socks += [_tls_connect(srv.port, pki, timeout=10) for _ in range(3)]  # past the share
        st = srv.stats()
        assert st["tls_mem"] <= TLS_FIT * cost and st["mem_used"] == st["tls_mem"], st
        assert st["counters"].get("connections_evicted", 0) >= 3, st
        for s in socks:
            s.close()
        assert _wait_for(lambda: srv.stats()["mem_used"] == cost)  # the stats channel's own again

"""ext_proc over TLS/mTLS (issue 11): the router's port with a certificate,
Envoy presenting its own, both transports.

Certificates are made at test time with the openssl CLI
(``extproc.tools.pki``). A real stack (simulated pools, ``budget-router
serve``, Envoy from the rendered bootstrap) on 127.0.0.1 routes requests over
mTLS; a client without a certificate, or with one from another CA, is refused
by the router's port; plain h2c to the TLS port is closed without a traceback
in the router's log. The fast transport's flood limits are replayed over TLS,
and its backpressure hook (pause_reading) is checked on asyncio's SSL
transport.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import config as C
from extproc import tls
from extproc.envoy import bootstrap as E
from extproc.serve import h2frames as h2
from extproc.serve import limits as L
from extproc.serve.h2c import serve_fast
from extproc.tools.pki import client_hello, make_pki

from .test_h2_limits import flood_unread_pings, probe_keeps_latency, server

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

SHORT_BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}'
LONG_BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 9000}'

#: How many plain-text connections the h2c test opens against the TLS port.
PLAINTEXT_TRIES = 50


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Our CA (server and client certificates) and another CA's client certificate."""
    ours = make_pki(str(tmp_path_factory.mktemp("pki")))
    other = make_pki(str(tmp_path_factory.mktemp("other-pki")))
    return {**ours, "other_client": other["client"], "other_client_key": other["client_key"]}


def _tls_sections(pki: dict, mutual: bool = True) -> dict:
    router = {"tls_cert_file": pki["server"], "tls_key_file": pki["server_key"]}
    envoy = {"router_tls_ca_file": pki["ca"]}
    if mutual:
        router["tls_client_ca_file"] = pki["ca"]
        envoy |= {"router_client_cert_file": pki["client"], "router_client_key_file": pki["client_key"]}
    return {"router": router, "envoy": envoy}


def _creds(pki: dict, client: str | None = "client") -> grpc.ChannelCredentials:
    ca = open(pki["ca"], "rb").read()
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=open(pki[client + "_key"], "rb").read(),
                                        certificate_chain=open(pki[client], "rb").read())


def _health(port: int, creds: grpc.ChannelCredentials) -> int:
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


# --- config and rendering ------------------------------------------------------


def test_tls_keys_checked_at_start(pki, tmp_path):
    with pytest.raises(C.ConfigError, match=r"\[router\] tls_cert_file and tls_key_file: set both"):
        C.Config().replace(router={"tls_cert_file": pki["server"]})
    with pytest.raises(C.ConfigError, match=r"\[router\] tls_client_ca_file needs tls_cert_file"):
        C.Config().replace(router={"tls_client_ca_file": pki["ca"]})
    with pytest.raises(C.ConfigError, match=r"\[envoy\] router_client_cert_file and router_client_key_file"):
        C.Config().replace(envoy={"router_client_cert_file": pki["client"]})
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(C.ConfigError, match=r"\[router\] tls_cert_file .*nope.pem: cannot read it"):
        tls.server_context(tls.TlsFiles("router", missing, pki["server_key"]))
    with pytest.raises(C.ConfigError, match=r"\[router\] tls_cert_file/tls_key_file .*not a PEM certificate"):
        tls.server_context(tls.TlsFiles("router", pki["server"], pki["client_key"]))  # key of another cert
    with pytest.raises(C.ConfigError, match=r"\[router\] tls_client_ca_file .*is not a regular file"):
        tls.server_context(tls.TlsFiles("router", pki["server"], pki["server_key"], "/dev/zero"))
    ctx = tls.server_context(tls.TlsFiles("router", pki["server"], pki["server_key"], pki["ca"]))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_serve_refuses_unreadable_router_tls_files(tmp_path):
    cfg = C.Config().replace(router={"tls_cert_file": str(tmp_path / "a.pem"), "tls_key_file": str(tmp_path / "b"),
                                     "state_file": str(tmp_path / "state.json")})
    path = tmp_path / "router.toml"
    path.write_text(C.to_toml(cfg))
    out = subprocess.run([sys.executable, "-m", "extproc.cli", "serve", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "configuration error: [router] tls_cert_file" in out.stderr and "cannot read it" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_rendered_tls_cluster_validates(pki, mutual):
    cfg = C.Config().replace(**_tls_sections(pki, mutual))
    cluster = next(c for c in E.to_dict(cfg)["static_resources"]["clusters"] if c["name"] == E.ROUTER_CLUSTER)
    sock = cluster["transport_socket"]
    assert sock["name"] == E.TLS_TRANSPORT_SOCKET
    common = sock["typed_config"]["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]
    assert common["validation_context"]["trusted_ca"] == {"filename": pki["ca"]}
    assert common["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}}]
    assert "sni" not in sock["typed_config"]  # an IP literal gets no SNI (RFC 6066)
    assert bool(common.get("tls_certificates")) == mutual
    res = E.validate_yaml(E.render_yaml(cfg))
    assert res.returncode == 0, res.stdout + res.stderr
    # a DNS name: SNI and a DNS SAN
    named = cfg.replace(envoy={"router_tls_server_name": "router.budget.svc"})
    sock = next(c for c in E.to_dict(named)["static_resources"]["clusters"]
                if c["name"] == E.ROUTER_CLUSTER)["transport_socket"]["typed_config"]
    assert sock["sni"] == "router.budget.svc"
    assert sock["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0]["san_type"] == "DNS"


def test_rendering_tls_without_envoy_side_is_a_clear_error(pki):
    cfg = C.Config().replace(router=_tls_sections(pki)["router"])
    with pytest.raises(C.ConfigError, match=r"\[envoy\] router_tls_ca_file"):
        E.render_yaml(cfg)
    cfg = C.Config().replace(router=_tls_sections(pki)["router"], envoy={"router_tls_ca_file": pki["ca"]})
    with pytest.raises(C.ConfigError, match=r"\[envoy\] router_client_cert_file"):
        E.render_yaml(cfg)


# --- a real stack over mTLS ----------------------------------------------------


@pytest.fixture(scope="module")
def fast_stack(stack_factory, pki):
    return stack_factory(**_tls_sections(pki))


@pytest.fixture(scope="module")
def grpcio_stack(stack_factory, pki, fast_stack):
    sections = _tls_sections(pki)
    return stack_factory(pools_from=fast_stack, router={**sections["router"], "transport": "grpcio"},
                         envoy=sections["envoy"])


@pytest.fixture(params=["fast", "grpcio"])
def stack(request):
    return request.getfixturevalue(f"{request.param}_stack")


def _envoy_stat(stack, name: str) -> int:
    text = httpx.get(stack.admin_url + "/stats", params={"filter": f"^{name}$"}, timeout=5).text
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    raise AssertionError(f"no stat {name}: {text!r}")


def test_envoy_routes_over_mtls(stack):
    assert stack.cfg.router.tls_client_ca_file
    with httpx.Client(timeout=30) as h:
        for body, pool in ((SHORT_BODY, "short"), (LONG_BODY, "long"), (SHORT_BODY, "short")):
            r = h.post(stack.url + "/chat/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
            # fail-open would send everything long: "short" is the router's decision
            assert r.headers["x-pool-name"] == pool
    assert _envoy_stat(stack, f"cluster.{E.ROUTER_CLUSTER}.ssl.handshake") >= 1
    assert _envoy_stat(stack, f"cluster.{E.ROUTER_CLUSTER}.upstream_cx_connect_fail") == 0


def test_router_port_refuses_clients_without_our_certificate(stack, pki):
    port = C.worker_ports(stack.cfg)[0]
    assert _health(port, _creds(pki)) == health_pb2.HealthCheckResponse.SERVING  # the right one gets in
    for client in (None, "other_client"):
        with pytest.raises(grpc.RpcError) as e:
            _health(port, _creds(pki, client))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, client
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_h2c_to_tls_port_is_closed_without_tracebacks(stack):
    port = C.worker_ports(stack.cfg)[0]
    log_path = stack.logs["router"]
    before = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    t0 = time.monotonic()
    for _ in range(PLAINTEXT_TRIES):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(h2.PREFACE + h2.settings_frame([]))
            try:
                while s.recv(4096):  # a TLS alert at most, then the close
                    pass
            except ConnectionResetError:
                pass
    assert time.monotonic() - t0 < 30  # closed at once, not at a timeout
    # the router still serves Envoy afterwards
    r = httpx.post(stack.url + "/chat/completions", content=SHORT_BODY, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 200 and r.headers["x-pool-name"] == "short"
    with open(log_path, "rb") as f:
        f.seek(before)
        added = f.read().decode(errors="replace")
    assert "Traceback" not in added and len(added) < 4096, added[-2000:]


# --- backpressure over TLS (fast transport) ------------------------------------


def test_control_replies_never_read_over_tls_bound_memory(tmp_path, pki):
    """test_h2_limits' PING flood over TLS: cut off (h2frames' cap on pending
    control replies, as over h2c) or reading paused, memory flat, and a
    concurrent client over TLS keeps its latency."""
    creds = _creds(pki)
    with server(tmp_path, creds, tls=[pki["server"], pki["server_key"], pki["ca"]]) as srv, \
            probe_keeps_latency(srv.port, creds):
        rss0 = srv.rss_kb()
        ctx = ssl.create_default_context(cafile=pki["ca"])
        ctx.load_cert_chain(pki["client"], pki["client_key"])
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", srv.port))
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        assert s.selected_alpn_protocol() == "h2"
        s.sendall(h2.PREFACE + h2.settings_frame([]))
        flood_unread_pings(srv, s, rss0)
        raw.close()


def test_pause_reading_holds_over_tls(pki):
    """The backpressure hook itself over asyncio's SSL transport: while the
    connection has paused reading (what pause_writing does at the write
    buffer's high-water mark), a PING is not answered; once resumed it is.
    (The flood above is cut off by h2frames' own caps first, so this checks
    the transport underneath them.)"""
    files = tls.TlsFiles("router", pki["server"], pki["server_key"], pki["ca"])
    ack = h2.ping_frame(b"abcdefgh", ack=True)

    async def until(reader, needle: bytes, timeout: float, seen: bytearray) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while needle not in seen:
                    chunk = await reader.read(65536)
                    if not chunk:
                        return False
                    seen += chunk
        except TimeoutError:
            return False
        return True

    async def run() -> None:
        srv = await serve_fast(lambda meta=None: None, "127.0.0.1", 0, max_message_bytes=1 << 20, tls=files)
        ctx = ssl.create_default_context(cafile=pki["ca"])
        ctx.load_cert_chain(pki["client"], pki["client_key"])
        ctx.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, ssl=ctx, server_hostname="127.0.0.1")
        try:
            writer.write(h2.PREFACE + h2.settings_frame([]))
            seen = bytearray()
            assert await until(reader, h2.settings_frame([])[:4], 5, seen)  # the server's SETTINGS
            conn = next(iter(srv._connections))
            conn.pause_writing()
            assert srv.counters["reading_paused"] == 1
            writer.write(h2.ping_frame(b"abcdefgh"))
            await writer.drain()
            assert not await until(reader, ack, 0.5, seen)  # not read, not answered
            conn.resume_writing()
            assert await until(reader, ack, 5, seen)
        finally:
            writer.close()
            await srv.stop(0)

    asyncio.run(run())


# --- half-finished TLS handshakes (issue 17 item 2) --------------------------------

#: Half ClientHellos one attack opens: past both the connection cap and the
#: pending-handshake bound of each case below, and well under the test
#: process's open-file limit.
HALF_HELLOS = 1_500
#: The handshake timeout the test server runs with (H2_TLS_HANDSHAKE_TIMEOUT_S in production).
HANDSHAKE_TIMEOUT_S = 2.0


def _half_client_hello(ca: str) -> bytes:
    """The first half of a real TLS ClientHello (from an in-memory client)."""
    hello = client_hello(ca, server_hostname="localhost")
    assert hello[0] == 0x16 and len(hello) > 100  # a handshake record
    return hello[: len(hello) // 2]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("limits", [{"max_connections": 100}, {"max_connections": 1000, "max_pending_handshakes": 64}],
                         ids=["connection-cap", "pending-bound"])
def test_half_tls_handshakes_are_bounded_and_released(tmp_path, pki, limits):
    """1,500 half ClientHellos on the TLS port: pending handshakes count
    against the connection cap (or their own bound) from the TCP accept, so
    the server's descriptors stay within it and its RSS bounded; a
    well-behaved client keeps routing and a new TLS client still connects;
    the ones left pending time out and their budget charge is returned."""
    creds = _creds(pki)
    bound = min(limits["max_connections"], limits.get("max_pending_handshakes", 128))
    with server(tmp_path, creds, tls=[pki["server"], pki["server_key"], pki["ca"]],
                tls_handshake_timeout_s=HANDSHAKE_TIMEOUT_S, **limits) as srv:
        srv.stats()  # the stats channel's own connection is up before the flood
        st0 = srv.stats()
        rss0, fd0, mem0 = srv.rss_kb(), _fds(srv.proc.pid), st0["mem_used"] - st0["tls_mem"]
        half = _half_client_hello(pki["ca"])
        socks: list[socket.socket] = []
        peak_fds = 0
        try:
            with probe_keeps_latency(srv.port, creds):
                for i in range(HALF_HELLOS):
                    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
                    try:
                        s.sendall(half)
                    except OSError:  # already closed by the server: fine
                        pass
                    socks.append(s)
                    if i % 100 == 99:
                        peak_fds = max(peak_fds, _fds(srv.proc.pid))
                assert _health(srv.port, creds) == health_pb2.HealthCheckResponse.SERVING  # a new TLS client
                stats = srv.stats()
            rss1 = srv.rss_kb()
            # asyncio accepts a batch before connection_made enforces the cap and
            # closes evicted sockets an iteration later (L.H2_ACCEPT_BACKLOG);
            # a few more: the probe's and the health check's connections. One
            # more backlog of slack: on a loaded machine a socket evicted in one
            # accept batch may still be closing while the next batch is counted
            # (this check failed ~1 in 3 runs at load 10+ without it); 1,500
            # unbounded would be ~1,500 descriptors.
            assert peak_fds <= fd0 + bound + 3 * L.H2_ACCEPT_BACKLOG + 4, (peak_fds, fd0, bound)
            assert stats["connections"] <= bound + 4, stats
            c = stats["counters"]
            assert c.get("connections_evicted", 0) + c.get("tls_handshakes_evicted", 0) >= HALF_HELLOS - bound - 4, c
            # Each pending one is charged L.H2_TLS_HANDSHAKE_COST_BYTES, at most ``bound`` of them
            # (established TLS connections, the probe's among them, are charged apart: tls_mem).
            assert stats["mem_used"] - stats["tls_mem"] - mem0 <= bound * L.H2_TLS_HANDSHAKE_COST_BYTES + (64 << 10), stats
            # issue 17: 6,000 of them took 850 MB; at most ``bound`` pending at ~350 KB each, plus slack.
            assert rss1 - rss0 < bound * 350 + 40_000, (rss0, rss1)
            # Still held open by us: the handshake timeout closes them and returns their charge.
            time.sleep(HANDSHAKE_TIMEOUT_S + 1.5)
            stats = srv.stats()
            assert stats["counters"].get("tls_handshake_timeouts", 0) >= 1, stats
            assert stats["mem_used"] - stats["tls_mem"] == mem0 and stats["connections"] <= 2, stats
            assert stats["tls_mem"] == stats["connections"] * L.H2_TLS_CONNECTION_COST_BYTES, stats
            assert _fds(srv.proc.pid) <= fd0 + 2
        finally:
            for s in socks:
                s.close()


def test_loop_choice_and_its_override():
    from extproc.serve.loop import LOOP_ENV, choose
    assert choose({}) == "auto"  # TLS ports too: uvloop when installed
    assert choose({LOOP_ENV: "asyncio"}) == "asyncio"
    assert choose({LOOP_ENV: "uvloop"}) == "uvloop"
    # the override is a process setting, not a config key the loader refuses
    assert C.from_mapping({}, env={LOOP_ENV: "asyncio"}) == C.from_mapping({}, env={})

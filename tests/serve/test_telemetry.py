"""OpenTelemetry end to end: spans and metrics reach a real OTLP/gRPC receiver
over the network from both Envoy (its OpenTelemetry tracer) and the router
(the OTel SDK's OTLP exporters), and Envoy's and the router's spans share a
trace id. The receiver implements the OTLP collector services
(opentelemetry-proto) on a loopback port, as an OpenTelemetry Collector would.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from extproc.tools.stack import Stack, loopback_config

openai = pytest.importorskip("openai")

#: Short export periods so the test sees data within a second or two.
FAST_EXPORT_ENV = {
    "OTEL_BSP_SCHEDULE_DELAY": "100",          # ms, batch span processor
    "OTEL_METRIC_EXPORT_INTERVAL": "300",      # ms, periodic metric reader
    "OTEL_EXPORTER_OTLP_INSECURE": "true",
}

PROMETHEUS_NAMES = [
    "budget_router_requests_total", "budget_router_estimate_relative_error_bucket",
    "budget_router_learned_bytes_per_token", "budget_router_learned_overhead_tokens",
    "budget_router_learned_samples_total", "budget_router_processing_seconds_bucket",
    "budget_router_streams_in_flight",
]


def test_otlp_protos_are_the_exporters_version():
    """xds-protos installs an older opentelemetry/proto/ over opentelemetry-proto's;
    the Makefile reinstalls the latter. Without that the OTLP exporters fail to import."""
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope  # noqa: F401
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: F401


def _attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out


class Receiver(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self):
        self.lock = threading.Lock()
        self.spans: list[dict] = []
        self.metric_names: set[str] = set()

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                for rs in request.resource_spans:
                    service = _attrs(rs.resource.attributes).get("service.name")
                    for ss in rs.scope_spans:
                        for sp in ss.spans:
                            self.spans.append({"service": service, "name": sp.name, "trace_id": sp.trace_id.hex(),
                                               "span_id": sp.span_id.hex(), "parent": sp.parent_span_id.hex(),
                                               "attrs": _attrs(sp.attributes)})
                return trace_service_pb2.ExportTraceServiceResponse()
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        self.metric_names.add(m.name)
            return metrics_service_pb2.ExportMetricsServiceResponse()


class _MetricsAdapter(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, r: Receiver):
        self.r = r

    def Export(self, request, context):  # noqa: N802
        return self.r.Export(request, context)


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(r, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsAdapter(r), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    r.port = port
    yield r
    server.stop(0)


@pytest.fixture(scope="module")
def stack(receiver):
    cfg = loopback_config(envoy={"otlp_endpoint": f"127.0.0.1:{receiver.port}"},
                          router={"sample_rate": 1.0})
    st = Stack(cfg, time_scale=0, router_env={
        **FAST_EXPORT_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}"})
    st.start()
    yield st
    st.stop()


def _wait(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout} s")


def test_envoy_and_router_spans_share_a_trace(stack, receiver):
    client = openai.OpenAI(base_url=stack.url, api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="otel-model", messages=[{"role": "user", "content": "Trace me, please."}], max_tokens=7)
    assert raw.http_response.status_code == 200
    usage = raw.parse().usage

    def joined():
        with receiver.lock:
            router = [s for s in receiver.spans if s["service"] == "budget-router"
                      and s["attrs"].get("gen_ai.request.model") == "otel-model"]
            envoy = {s["trace_id"] for s in receiver.spans if s["service"] == "budget-router-envoy"}
        return [s for s in router if s["trace_id"] in envoy]

    spans = _wait(joined, what="a router span in a trace Envoy also reported")
    s = spans[0]
    assert s["parent"], "the router's span must be a child (of Envoy's ext_proc span)"
    a = s["attrs"]
    assert a["budget_router.pool"] == "short" and a["budget_router.reason"] == "budget_fits_short"
    assert a["budget_router.category"] == "prose"
    assert a["budget_router.estimated_prompt_tokens"] > 0
    assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens == 7
    assert abs(a["budget_router.estimate_error"]) < 1.0


def test_client_traceparent_is_continued(stack, receiver):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    req = urllib.request.Request(
        stack.url + "/chat/completions",
        data=b'{"model":"otel-model","messages":[{"role":"user","content":"hello"}],"max_tokens":3}',
        headers={"content-type": "application/json", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert urllib.request.urlopen(req, timeout=10).status == 200

    def found():
        with receiver.lock:
            return {s["service"] for s in receiver.spans if s["trace_id"] == trace_id}

    services = _wait(lambda: (lambda x: x if {"budget-router", "budget-router-envoy"} <= x else None)(found()),
                     what="both services in the client's trace")
    assert {"budget-router", "budget-router-envoy"} <= services


def test_metrics_on_prometheus_and_otlp(stack, receiver):
    client = openai.OpenAI(base_url=stack.url, api_key="x", max_retries=0)
    for i in range(3):
        client.chat.completions.create(model="otel-model", messages=[{"role": "user", "content": f"count {i}"}],
                                       max_tokens=2)
    url = f"http://127.0.0.1:{stack.cfg.telemetry.prometheus_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for name in PROMETHEUS_NAMES:
        assert name in text, f"{name} missing from the router's Prometheus endpoint"
    line = next(ln for ln in text.splitlines()
                if ln.startswith("budget_router_requests_total") and 'pool="short"' in ln)
    assert float(line.rsplit(" ", 1)[1]) >= 3
    names = _wait(lambda: receiver.metric_names if "budget_router.requests" in receiver.metric_names else None,
                  what="OTLP metrics from the router")
    assert {"budget_router.requests", "budget_router.processing", "budget_router.learned_samples"} <= names


def test_trace_covers_the_pool_hop(stack, receiver):
    """Envoy -> router -> pool in one trace: Envoy's ingress span has, beside the
    router's ext_proc span, a child span for the upstream request to the pool
    (HCM tracing ``spawn_upstream_span``) naming the pool cluster and host."""
    trace_id = "5cf92f3577b34da6a3ce929d0e0e4737"
    req = urllib.request.Request(
        stack.url + "/chat/completions",
        data=b'{"model":"otel-model","messages":[{"role":"user","content":"pool hop"}],"max_tokens":3}',
        headers={"content-type": "application/json", "traceparent": f"00-{trace_id}-00f067aa0ba902b8-01"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200 and r.headers["x-pool-name"] == "short"

    host = stack.cfg.short.endpoints[0]

    def upstream():
        with receiver.lock:
            spans = [s for s in receiver.spans if s["trace_id"] == trace_id]
        ups = [s for s in spans if s["service"] == "budget-router-envoy"
               and s["attrs"].get("upstream_address") == host]
        ids = {s["span_id"] for s in spans}
        routers = [s for s in spans if s["service"] == "budget-router" and s["parent"] in ids]
        return (spans, ups) if ups and routers else None

    spans, ups = _wait(upstream, what="Envoy's upstream span to the pool and the router's span")
    (up,) = ups
    assert up["name"].endswith("egress") and up["attrs"]["upstream_cluster"].startswith("pool_short")
    assert up["attrs"]["http.status_code"] == "200"
    by_id = {s["span_id"]: s for s in spans}
    ingress = by_id[up["parent"]]  # the pool hop is a child of Envoy's ingress span
    assert ingress["service"] == "budget-router-envoy" and ingress["parent"] == "00f067aa0ba902b8"
    # ... as is Envoy's ext_proc span, the parent of the router's span.
    (router,) = [s for s in spans if s["service"] == "budget-router"]
    assert by_id[router["parent"]]["parent"] == ingress["span_id"]


def _series(text: str, name: str, **labels: str) -> float | None:
    """The value of ``name`` whose labels include ``labels`` on a Prometheus page."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_fresh_router_exports_known_counters_at_zero_and_snapshot_failures(tmp_path):
    """Issue 17: a fresh router's page already has misroutes (each tier but
    the last x each kind), spillovers (each pair) and snapshot failures at 0,
    so rate() sees the first event; a failed snapshot write is counted."""
    from extproc import config as C
    from extproc.serve import server as S
    from extproc.tools.stack import free_port_block
    port = free_port_block(1)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    cfg = C.Config().replace(telemetry={"prometheus_port": port, "prometheus_listen": "127.0.0.1"},
                             router={"state_file": str(blocker / "state.json")})
    w = S.Worker(cfg, 0)
    try:
        def page() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        text = page()
        for kind in ("context_length", "truncated"):
            assert _series(text, "budget_router_misroutes_detected_total", kind=kind, pool="short") == 0
            assert _series(text, "budget_router_misroutes_detected_total", kind=kind, pool="long") is None
        assert _series(text, "budget_router_spillovers_total", from_tier="short", to_tier="long") == 0
        assert _series(text, "budget_router_snapshot_failures_total") == 0
        assert _series(text, "budget_router_refused_samples_total") == 0
        assert isinstance(w.save_state(), OSError)  # its directory is a file: the write fails
        assert _series(page(), "budget_router_snapshot_failures_total") == 1
    finally:
        w.telemetry.shutdown()

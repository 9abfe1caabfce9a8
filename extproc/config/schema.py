"""The configuration's schema: frozen dataclasses, one per section, and the
tiers in one form (``Config.tiers``; B_short is the first tier's budget limit).

This is the only module of ``extproc.config`` the pure core imports: it reads
no file and no environment (``extproc.config.loader`` does), and what it
imports (``parse``, ``validation``, ``defaults``) is pure too.
``tests/test_architecture.py`` checks that through every import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from .. import defaults as D
from . import parse as P
from .errors import ConfigError
from .validation import validate

@dataclass(frozen=True)
class PoolConfig:
    """One tier (a vLLM pool): name (routing header value, Envoy cluster
    ``pool_<name>``), context limit, endpoints, and the largest padded budget
    it takes (``budget_limit``; None on the last tier, the catch-all)."""

    name: str
    max_model_len: int
    endpoints: tuple[str, ...]  # "host:port"
    budget_limit: int | None = None

    @property
    def cluster(self) -> str:
        return f"pool_{self.name}"


@dataclass(frozen=True)
class RouterConfig:
    listen: str = "127.0.0.1"
    port: int = D.ROUTER_PORT
    workers: int = 1
    transport: str = "fast"  # "fast" (purpose-built h2c gRPC) or "grpcio" (grpc.aio)
    routing_header: str = D.ROUTING_HEADER
    decision_header: str = D.DECISION_HEADER
    metadata_namespace: str = D.METADATA_NAMESPACE
    max_body_bytes: int = D.MAX_BODY_BYTES
    state_file: str = ".budget-router/state.json"
    snapshot_interval_s: float = D.SNAPSHOT_INTERVAL_S
    # Also snapshot after this many new learned samples (at most one per
    # defaults.SNAPSHOT_MIN_GAP_S); 0 = only every snapshot_interval_s.
    snapshot_samples: int = D.SNAPSHOT_SAMPLES
    sample_rate: float = D.SAMPLE_RATE
    inject_include_usage: bool = D.INJECT_INCLUDE_USAGE
    drain_seconds: float = D.DRAIN_SECONDS
    # After SIGTERM: health NOT_SERVING, still serving, for this long; then
    # the port closes and in-flight streams get drain_seconds.
    drain_delay_s: float = D.DRAIN_DELAY_S
    # TLS for the ext_proc port (PEM files; both transports); with
    # tls_client_ca_file set, Envoy must present a certificate signed by that
    # CA (mTLS). Envoy's side: [envoy] router_tls_*.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""


@dataclass(frozen=True)
class PolicyConfig:
    # The first boundary (B_short) is the first tier's budget_limit
    # (Config.b_short); "[policy] b_short" in a file is translated to it.
    margin_sigmas: float = D.MARGIN_SIGMAS
    min_margin: float = D.MIN_MARGIN
    reject_margin: float = D.REJECT_MARGIN
    default_output_tokens: int = D.DEFAULT_OUTPUT_TOKENS
    output_quantile: float = D.OUTPUT_QUANTILE


@dataclass(frozen=True)
class EstimatorConfig:
    prior_bytes_per_token: float = D.PRIOR_BYTES_PER_TOKEN
    prior_rel_error: float = D.PRIOR_REL_ERROR
    error_ema_weight: float = D.ERROR_EMA_WEIGHT
    rls_forgetting: float = D.RLS_FORGETTING
    min_samples_confident: int = D.MIN_SAMPLES_CONFIDENT
    max_models: int = D.MAX_MODELS
    # With every slot taken, a model not learned from for this many samples
    # gives its slot to a new name (least recently learned first).
    model_idle_samples: int = D.MODEL_IDLE_SAMPLES


@dataclass(frozen=True)
class EnvoyConfig:
    listen: str = "127.0.0.1"
    port: int = D.ENVOY_PORT
    admin_port: int = D.ENVOY_ADMIN_PORT
    # Envoy's admin API can drain and reconfigure Envoy: loopback by default;
    # a container needs 0.0.0.0 for Prometheus to scrape /stats/prometheus.
    admin_listen: str = "127.0.0.1"
    message_timeout_ms: int = D.MESSAGE_TIMEOUT_MS
    route_timeout_s: int = D.ROUTE_TIMEOUT_S
    stream_idle_timeout_s: int = D.STREAM_IDLE_TIMEOUT_S
    router_host: str = "127.0.0.1"  # where Envoy reaches the router's workers
    # host:port of an OTLP/gRPC collector for Envoy's OpenTelemetry tracer
    # ("" = Envoy does not trace).
    otlp_endpoint: str = ""
    # Envoy's side of TLS to the router (used when [router] tls_cert_file is
    # set): the CA that signed the router's certificate, the name checked
    # against it and sent as SNI ("" = router_host), and for mTLS Envoy's own
    # client certificate and key. Paths as Envoy sees them.
    router_tls_ca_file: str = ""
    router_tls_server_name: str = ""
    router_client_cert_file: str = ""
    router_client_key_file: str = ""


@dataclass(frozen=True)
class MediaConfig:
    """Prompt tokens of non-text content parts (images, audio, video, files);
    the reason behind each default is in extproc.defaults."""

    image_patch_px: int = D.IMAGE_PATCH_PX
    image_min_tokens: int = D.IMAGE_MIN_TOKENS
    image_max_tokens: int = D.IMAGE_MAX_TOKENS
    image_overhead_tokens: int = D.IMAGE_OVERHEAD_TOKENS
    remote_image_tokens: int = D.REMOTE_IMAGE_TOKENS
    audio_tokens: int = D.AUDIO_TOKENS
    audio_bytes_per_token: int = D.AUDIO_BYTES_PER_TOKEN
    file_tokens: int = D.FILE_TOKENS
    # Per-model image rule, e.g. {"llava-1.5" = {image_patch_px = 14,
    # image_max_tokens = 576}}: keys are the image_* keys above; a model not
    # listed uses them. (File only: no environment variable sets it.)
    models: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class TelemetryConfig:
    # Prometheus endpoint of worker i on prometheus_port + i; 0 turns it off.
    # 9464 is the OpenTelemetry Prometheus exporter's conventional port.
    prometheus_port: int = 9464
    prometheus_listen: str = "127.0.0.1"
    # Traces and OTLP metrics follow the standard OTEL_* environment variables
    # (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_SAMPLER, OTEL_SERVICE_NAME...).


@dataclass(frozen=True)
class MonitorConfig:
    """Scraping of each tier endpoint's vLLM /metrics (extproc.serve.monitor)."""

    enabled: bool = True
    interval_s: float = D.MONITOR_INTERVAL_S
    stale_intervals: int = D.MONITOR_STALE_INTERVALS


@dataclass(frozen=True)
class SpilloverConfig:
    """Send a request up a tier when its own is saturated (extproc.core.spillover)."""

    enabled: bool = True
    waiting_per_instance: float = D.SPILL_WAITING_PER_INSTANCE
    waiting_clear: float = D.SPILL_WAITING_CLEAR
    kv_usage: float = D.SPILL_KV_USAGE
    kv_clear: float = D.SPILL_KV_CLEAR


@dataclass(frozen=True)
class AdaptiveConfig:
    """Move each tier boundary from live signals (extproc.core.threshold); opt-in."""

    enabled: bool = False
    step_fraction: float = D.ADAPT_STEP_FRACTION
    dwell_s: float = D.ADAPT_DWELL_S
    dead_band: float = D.ADAPT_DEAD_BAND
    min_fraction: float = D.ADAPT_MIN_FRACTION


def _default_tiers() -> tuple[PoolConfig, ...]:
    return (
        PoolConfig(D.SHORT_POOL, D.SHORT_MAX_MODEL_LEN, (f"127.0.0.1:{D.SHORT_POOL_PORT}",), D.B_SHORT),
        PoolConfig(D.LONG_POOL, D.LONG_MAX_MODEL_LEN, (f"127.0.0.1:{D.LONG_POOL_PORT}",)),
    )


@dataclass(frozen=True)
class AdminConfig:
    """The admin gRPC plane (budget_router.admin.v1.Admin, grpc.health,
    reflection): worker i on ``port + i``, apart from ext_proc."""

    listen: str = "127.0.0.1"
    port: int = D.ADMIN_PORT
    # File holding the bearer token callers must send ("authorization:
    # Bearer <token>"); $BUDGET_ROUTER_ADMIN_TOKEN wins over it. With no token
    # the admin plane refuses to listen beyond loopback.
    token_file: str = ""
    # TLS for the admin port (PEM files); with tls_client_ca_file set, callers
    # must present a certificate signed by that CA (mTLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Where a replica without a snapshot of its own fetches a peer's
    # calibration at start: "host:port" entries; a name resolving to many
    # addresses (a headless Service) asks each of them.
    warm_start_peers: tuple[str, ...] = ()
    warm_start_timeout_s: float = D.WARM_START_TIMEOUT_S


@dataclass(frozen=True)
class Config:
    router: RouterConfig = field(default_factory=RouterConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    envoy: EnvoyConfig = field(default_factory=EnvoyConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    spillover: SpilloverConfig = field(default_factory=SpilloverConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    #: Ordered tiers, smallest first; the last is the catch-all and default
    #: route. Each tier's budget_limit is the boundary above it (B_short is
    #: the first tier's).
    tiers: tuple[PoolConfig, ...] = field(default_factory=_default_tiers)

    @property
    def short(self) -> PoolConfig:
        """The first (smallest) tier."""
        return self.tiers[0]

    @property
    def long(self) -> PoolConfig:
        """The last tier: serves every length, the default route."""
        return self.tiers[-1]

    @property
    def pools(self) -> tuple[PoolConfig, ...]:
        return self.tiers

    @property
    def limits(self) -> tuple[int, ...]:
        """Budget limit of every tier but the last (the boundaries)."""
        return tuple(int(t.budget_limit) for t in self.tiers[:-1])  # type: ignore[arg-type]

    @property
    def b_short(self) -> int:
        """The first boundary (B_short): the first tier's budget limit."""
        return int(self.tiers[0].budget_limit)  # type: ignore[arg-type]

    def tier(self, name: str) -> PoolConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    def tier_index(self, name: str) -> int:
        for i, t in enumerate(self.tiers):
            if t.name == name:
                return i
        return len(self.tiers) - 1  # unknown names route like the default: the last tier

    def with_limits(self, limits: tuple[int, ...] | list[int]) -> "Config":
        """A copy with new boundaries (validated)."""
        limits = list(limits)
        if len(limits) != len(self.tiers) - 1:
            raise ConfigError(f"expected {len(self.tiers) - 1} budget limit(s), got {len(limits)}")
        tiers = tuple(dataclasses.replace(t, budget_limit=int(b)) for t, b in zip(self.tiers, limits))
        out = dataclasses.replace(self, tiers=tiers + self.tiers[-1:])
        validate(out)
        return out

    def replace(self, **sections: Any) -> "Config":
        """A copy with whole sections or single keys replaced, e.g.
        ``cfg.replace(router={"workers": 4})``; the result is validated.
        ``tiers=`` replaces every tier (``PoolConfig``s or ``[[tiers]]``
        tables); the old two-tier spellings are translated as a file's are
        (``extproc.config.parse``): ``short=``/``long=`` (or a tier's name)
        set that tier's max_model_len/endpoints, ``policy={"b_short": n}`` the
        first tier's budget limit."""
        raw = as_raw(self)
        for section, value in sections.items():
            if section == "tiers":
                raw["tiers"] = [P.fields_of(v) if isinstance(v, PoolConfig) else P.tier_table(i, v)
                                for i, v in enumerate(P.tiers_list(value))]
            elif section in SECTIONS:
                values = P.fields_of(value) if dataclasses.is_dataclass(value) else dict(value)
                P.take_legacy_keys(section, values, raw["tiers"])
                raw[section] = {**raw[section], **values}
            else:
                index = P.pool_index(raw["tiers"], section)
                if index is None:
                    raise ConfigError(f"unknown section or tier {section!r}")
                current = raw["tiers"][index]
                raw["tiers"][index] = (P.fields_of(value) if isinstance(value, PoolConfig)
                                       else P.pool_overlay(current, value))
        return build(raw)


#: Section name -> its dataclass, in the order ``to_toml`` writes them.
SECTIONS: dict[str, type] = {
    "router": RouterConfig,
    "policy": PolicyConfig,
    "estimator": EstimatorConfig,
    "envoy": EnvoyConfig,
    "telemetry": TelemetryConfig,
    "monitor": MonitorConfig,
    "spillover": SpilloverConfig,
    "adaptive": AdaptiveConfig,
    "media": MediaConfig,
    "admin": AdminConfig,
}


def as_raw(cfg: Config) -> dict[str, Any]:
    """``cfg`` as raw tables: ``{section: {key: value}}`` plus ``"tiers"``, a
    list of ``[[tiers]]`` tables (what ``build`` takes back)."""
    raw: dict[str, Any] = {name: P.fields_of(getattr(cfg, name)) for name in SECTIONS}
    raw["tiers"] = [P.fields_of(t) for t in cfg.tiers]
    return raw


def build(raw: Mapping[str, Any]) -> Config:
    """The validated Config of complete raw tables (``as_raw``'s shape: every
    section, tiers already as coerced ``[[tiers]]`` tables)."""
    cfg = Config(**{name: P.build_section(cls, name, raw[name]) for name, cls in SECTIONS.items()},
                 tiers=tuple(PoolConfig(**t) for t in raw["tiers"]))
    validate(cfg)
    return cfg


def worker_ports(cfg: Config) -> list[int]:
    """gRPC port of each router worker: Envoy's ext_proc cluster lists each as
    its own endpoint, so each gets its own HTTP/2 connection and streams spread
    over the processes (one connection's streams all land in one process)."""
    return [cfg.router.port + i for i in range(cfg.router.workers)]


def admin_ports(cfg: Config) -> list[int]:
    """Admin gRPC port of each router worker (``[admin] port + i``)."""
    return [cfg.admin.port + i for i in range(cfg.router.workers)]

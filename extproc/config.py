"""Router configuration: one TOML file plus ``BUDGET_ROUTER_*`` environment variables.

Precedence: built-in defaults (``extproc.defaults``) < config file < environment.
An environment variable names a key as ``BUDGET_ROUTER_<SECTION>_<KEY>``, e.g.
``BUDGET_ROUTER_POLICY_B_SHORT=16384`` or ``BUDGET_ROUTER_POOLS_SHORT_MAX_MODEL_LEN``.

Every error names the key, the value and what was expected, so a typo in a
deployment fails at start with a message an operator can act on.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import defaults as D

ENV_PREFIX = "BUDGET_ROUTER_"


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class PoolConfig:
    """One vLLM pool: Envoy cluster name, context limit and its endpoints."""

    name: str
    max_model_len: int
    endpoints: tuple[str, ...]  # "host:port"

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
    # TLS for the ext_proc port (PEM files; both transports); with
    # tls_client_ca_file set, Envoy must present a certificate signed by that
    # CA (mTLS). Envoy's side: [envoy] router_tls_*.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""


@dataclass(frozen=True)
class PolicyConfig:
    b_short: int = D.B_SHORT
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
    short: PoolConfig = field(
        default_factory=lambda: PoolConfig(
            D.SHORT_POOL, D.SHORT_MAX_MODEL_LEN, (f"127.0.0.1:{D.SHORT_POOL_PORT}",)
        )
    )
    long: PoolConfig = field(
        default_factory=lambda: PoolConfig(
            D.LONG_POOL, D.LONG_MAX_MODEL_LEN, (f"127.0.0.1:{D.LONG_POOL_PORT}",)
        )
    )

    @property
    def pools(self) -> tuple[PoolConfig, PoolConfig]:
        return (self.short, self.long)

    def replace(self, **sections: Any) -> "Config":
        """A copy with whole sections or single keys replaced, e.g.
        ``cfg.replace(policy={"b_short": 16384})``; the result is validated."""
        out = self
        for section, value in sections.items():
            current = getattr(out, section)
            if isinstance(value, Mapping):
                if isinstance(current, PoolConfig):
                    value = _pool(current.name, {**_asdict(current), **value, "name": None}, current)
                else:
                    value = _build(type(current), section, {**_asdict(current), **value})
            out = dataclasses.replace(out, **{section: value})
        validate(out)
        return out


_SECTIONS = {
    "router": RouterConfig,
    "policy": PolicyConfig,
    "estimator": EstimatorConfig,
    "envoy": EnvoyConfig,
    "telemetry": TelemetryConfig,
    "media": MediaConfig,
    "admin": AdminConfig,
}

#: Keys of a per-model image rule in [media] models.
MEDIA_MODEL_KEYS = ("image_patch_px", "image_min_tokens", "image_max_tokens", "image_overhead_tokens")

#: Environment variables under ENV_PREFIX that are not config keys.
#: ADMIN_TOKEN is a secret (kept out of Config, so `config --show` and
#: ConfigResult never print it); LOG_FORMAT and LOG_LEVEL are read by logging
#: setup before any config exists.
NON_CONFIG_ENV = frozenset({"CONFIG", "ADMIN_TOKEN", "LOG_FORMAT", "LOG_LEVEL"})

#: Largest config file read (and the only kind: a regular file). A real one is
#: a few KB; the bound keeps a mistaken path (/dev/zero, a log file) from
#: eating memory, the way ReloadConfig did before it stopped taking paths.
MAX_CONFIG_BYTES = 1024 * 1024


def _asdict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _coerce(section: str, key: str, value: Any, typ: Any) -> Any:
    where = f"[{section}] {key}"
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where} = {value!r}: expected true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""), 0)
            except ValueError:
                pass
        raise ConfigError(f"{where} = {value!r}: expected an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} = {value!r}: expected a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} = {value!r}: expected a string")
    if typ == "tuple[str, ...]":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where} = {value!r}: expected a list of strings")
    return value


def _build(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"[{section}] unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(section, k, v, fields[k].type) for k, v in values.items()}
    return cls(**kwargs)


def _pool(name: str, raw: Mapping[str, Any], default: PoolConfig) -> PoolConfig:
    section = f"pools.{name}"
    raw = {k: v for k, v in raw.items() if k != "name"}
    unknown = sorted(set(raw) - {"max_model_len", "endpoints"})
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s) {', '.join(unknown)}; known: endpoints, max_model_len")
    mml = _coerce(section, "max_model_len", raw.get("max_model_len", default.max_model_len), int)
    eps = raw.get("endpoints", default.endpoints)
    if isinstance(eps, str):
        eps = [e.strip() for e in eps.split(",") if e.strip()]
    if not isinstance(eps, (list, tuple)) or not all(isinstance(e, str) for e in eps):
        raise ConfigError(f"[{section}] endpoints = {eps!r}: expected a list of \"host:port\" strings")
    return PoolConfig(name, mml, tuple(eps))


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``BUDGET_ROUTER_POLICY_B_SHORT=16384`` -> {"policy": {"b_short": "16384"}}."""
    out: dict[str, dict[str, Any]] = {}
    names = list(_SECTIONS) + ["pools_short", "pools_long"]
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var[len(ENV_PREFIX):] in NON_CONFIG_ENV:
            continue
        rest = var[len(ENV_PREFIX):].lower()
        for section in sorted(names, key=len, reverse=True):
            if rest.startswith(section + "_"):
                out.setdefault(section, {})[rest[len(section) + 1:]] = value
                break
        else:
            raise ConfigError(
                f"environment variable {var}: unknown section; expected {ENV_PREFIX}<SECTION>_<KEY> "
                f"with SECTION one of {', '.join(s.upper() for s in names)}"
            )
    return out


def read_bounded(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ConfigError
    for anything else (a device, a FIFO, a directory, a bigger file)."""
    with open(path, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes")
    return data


def load(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the config file (if any) and the environment, validated.

    ``path`` defaults to $BUDGET_ROUTER_CONFIG; with neither, built-in defaults.
    """
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG")
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        try:
            raw = tomllib.loads(read_bounded(p, MAX_CONFIG_BYTES, "config file").decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    return from_mapping(raw, env)


def load_config(args: Any, **overrides: Any) -> Config:
    """The config a command runs with: ``args.config`` (or the environment), then
    command-line ``overrides`` named ``section__key`` (``None`` = not given)."""
    cfg = load(getattr(args, "config", None))
    sections: dict[str, dict] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        section, key = name.split("__")
        sections.setdefault(section, {})[key] = value
    return cfg.replace(**sections) if sections else cfg


def from_mapping(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    pools_raw = raw.pop("pools", {})
    if not isinstance(pools_raw, Mapping):
        raise ConfigError("[pools] must be a table with [pools.short] and [pools.long]")
    unknown_pools = sorted(set(pools_raw) - {"short", "long"})
    if unknown_pools:
        raise ConfigError(f"[pools] unknown pool(s) {', '.join(unknown_pools)}; the router has exactly 'short' and 'long'")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(_SECTIONS))}, pools")
    for name, value in raw.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"[{name}] must be a table")
    for section, values in _env_overrides(env or {}).items():
        if section.startswith("pools_"):
            pools_raw = {**pools_raw, section[6:]: {**pools_raw.get(section[6:], {}), **values}}
        else:
            raw[section] = {**raw.get(section, {}), **values}
    base = Config()
    cfg = Config(
        **{name: _build(cls, name, raw.get(name, {})) for name, cls in _SECTIONS.items()},
        short=_pool("short", pools_raw.get("short", {}), base.short),
        long=_pool("long", pools_raw.get("long", {}), base.long),
    )
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_endpoint(where: str, ep: str) -> None:
    host, sep, port = ep.rpartition(":")
    _check(bool(sep and host and port.isdigit() and 0 < int(port) < 65536),
           f"{where}: endpoint {ep!r} is not host:port with a port in 1-65535")


def _check_tls(section: str, c: Any) -> None:
    """The TLS keys of a port's section (files are read at start, extproc.tls)."""
    _check(bool(c.tls_cert_file) == bool(c.tls_key_file),
           f"[{section}] tls_cert_file and tls_key_file: set both (TLS) or neither")
    _check(not c.tls_client_ca_file or bool(c.tls_cert_file),
           f"[{section}] tls_client_ca_file needs tls_cert_file and tls_key_file "
           "(mTLS is TLS plus client certificates)")


def validate(cfg: Config) -> None:
    r, p, e, v = cfg.router, cfg.policy, cfg.estimator, cfg.envoy
    _check(1 <= r.workers <= 64, f"[router] workers = {r.workers}: expected 1-64")
    _check(r.transport in ("fast", "grpcio"), f"[router] transport = {r.transport!r}: expected \"fast\" or \"grpcio\"")
    for section, name, port in (("router", "port", r.port), ("envoy", "port", v.port), ("envoy", "admin_port", v.admin_port)):
        _check(0 < port < 65536, f"[{section}] {name} = {port}: expected 1-65535")
    _check(r.port + r.workers - 1 < 65536, f"[router] port {r.port} + workers {r.workers} runs past 65535")
    for name in ("routing_header", "decision_header"):
        h = getattr(r, name)
        _check(bool(h) and h == h.lower() and all(c.isalnum() or c == "-" for c in h),
               f"[router] {name} = {h!r}: expected a lower-case header name (letters, digits, '-')")
    _check(r.routing_header != r.decision_header, "[router] routing_header and decision_header must differ")
    _check(64 * 1024 <= r.max_body_bytes <= 1024 ** 3,
           f"[router] max_body_bytes = {r.max_body_bytes}: expected 64 KiB to 1 GiB")
    _check(0.0 <= r.sample_rate <= 1.0, f"[router] sample_rate = {r.sample_rate}: expected 0.0-1.0")
    _check(r.snapshot_interval_s > 0, f"[router] snapshot_interval_s = {r.snapshot_interval_s}: expected > 0")
    _check(r.drain_seconds >= 0, f"[router] drain_seconds = {r.drain_seconds}: expected >= 0")
    _check(p.b_short > 0, f"[policy] b_short = {p.b_short}: expected a positive token count")
    _check(p.b_short >= D.MIN_B_SHORT, f"[policy] b_short = {p.b_short}: expected at least {D.MIN_B_SHORT} tokens "
           "(below that every chat request is long)")
    _check(p.b_short <= cfg.short.max_model_len,
           f"[policy] b_short = {p.b_short} is above [pools.short] max_model_len = {cfg.short.max_model_len}: "
           "requests routed short would be rejected by the short pool")
    _check(cfg.short.max_model_len <= cfg.long.max_model_len,
           f"[pools.short] max_model_len = {cfg.short.max_model_len} is above [pools.long] max_model_len = "
           f"{cfg.long.max_model_len}: the long pool must serve every length the short one does")
    _check(p.margin_sigmas >= 0, f"[policy] margin_sigmas = {p.margin_sigmas}: expected >= 0")
    _check(0 <= p.min_margin < 1, f"[policy] min_margin = {p.min_margin}: expected 0.0-1.0")
    _check(0 <= p.reject_margin < 1, f"[policy] reject_margin = {p.reject_margin}: expected 0.0-1.0")
    _check(p.default_output_tokens >= 0, f"[policy] default_output_tokens = {p.default_output_tokens}: expected >= 0")
    _check(0.5 <= p.output_quantile < 1, f"[policy] output_quantile = {p.output_quantile}: expected 0.5-0.999")
    _check(0.5 <= e.prior_bytes_per_token <= 16,
           f"[estimator] prior_bytes_per_token = {e.prior_bytes_per_token}: expected 0.5-16")
    _check(0 < e.prior_rel_error < 1, f"[estimator] prior_rel_error = {e.prior_rel_error}: expected 0-1")
    _check(0 < e.error_ema_weight <= 1, f"[estimator] error_ema_weight = {e.error_ema_weight}: expected 0-1")
    _check(0.9 <= e.rls_forgetting <= 1, f"[estimator] rls_forgetting = {e.rls_forgetting}: expected 0.9-1.0")
    _check(e.min_samples_confident >= 1, f"[estimator] min_samples_confident = {e.min_samples_confident}: expected >= 1")
    _check(1 <= e.max_models <= 10_000, f"[estimator] max_models = {e.max_models}: expected 1-10000")
    _check(e.model_idle_samples >= 1, f"[estimator] model_idle_samples = {e.model_idle_samples}: expected >= 1")
    _check(r.snapshot_samples >= 0, f"[router] snapshot_samples = {r.snapshot_samples}: expected >= 0 (0 = off)")
    a = cfg.admin
    _check(0 < a.port and a.port + r.workers - 1 < 65536,
           f"[admin] port = {a.port}: expected a port with room for every worker (port + workers - 1 <= 65535)")
    _check(a.port + r.workers <= r.port or r.port + r.workers <= a.port,
           f"[admin] port = {a.port} overlaps the ext_proc ports {r.port}-{r.port + r.workers - 1}")
    _check(0 < a.warm_start_timeout_s <= D.MAX_WARM_START_TIMEOUT_S,
           f"[admin] warm_start_timeout_s = {a.warm_start_timeout_s}: expected 0-{D.MAX_WARM_START_TIMEOUT_S:g} s")
    for peer in a.warm_start_peers:
        _check_endpoint("[admin] warm_start_peers", peer)
    _check_tls("admin", a)
    _check_tls("router", r)
    _check(bool(v.router_client_cert_file) == bool(v.router_client_key_file),
           "[envoy] router_client_cert_file and router_client_key_file: set both (mTLS to the router) or neither")
    _check(v.message_timeout_ms >= 10, f"[envoy] message_timeout_ms = {v.message_timeout_ms}: expected >= 10")
    _check(v.route_timeout_s >= 0, f"[envoy] route_timeout_s = {v.route_timeout_s}: expected >= 0 (0 = none)")
    _check(v.stream_idle_timeout_s > 0, f"[envoy] stream_idle_timeout_s = {v.stream_idle_timeout_s}: expected > 0")
    t = cfg.telemetry
    _check(0 <= t.prometheus_port < 65536 and t.prometheus_port + r.workers - 1 < 65536,
           f"[telemetry] prometheus_port = {t.prometheus_port}: expected 0 (off) or a port with room for every worker")
    if v.otlp_endpoint:
        _check_endpoint("[envoy] otlp_endpoint", v.otlp_endpoint)
    _validate_media(cfg.media)
    for pool in cfg.pools:
        where = f"[pools.{pool.name}]"
        _check(pool.max_model_len > 0, f"{where} max_model_len = {pool.max_model_len}: expected > 0")
        _check(len(pool.endpoints) > 0, f"{where} endpoints: expected at least one host:port")
        for ep in pool.endpoints:
            _check_endpoint(where, ep)


def _validate_media(m: MediaConfig) -> None:
    rules = [("[media]", {k: getattr(m, k) for k in MEDIA_MODEL_KEYS})]
    _check(isinstance(m.models, Mapping), f"[media] models = {m.models!r}: expected a table of model names")
    for model, rule in m.models.items():
        where = f"[media] models.{model!r}"
        _check(isinstance(rule, Mapping) and set(rule) <= set(MEDIA_MODEL_KEYS),
               f"{where} = {rule!r}: expected a table with keys among {', '.join(MEDIA_MODEL_KEYS)}")
        rules.append((where, {k: rule.get(k, getattr(m, k)) for k in MEDIA_MODEL_KEYS}))
    for where, r in rules:
        for k, v in r.items():
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0 and (v > 0 or k == "image_overhead_tokens"),
                   f"{where} {k} = {v!r}: expected a positive integer")
        _check(r["image_min_tokens"] <= r["image_max_tokens"],
               f"{where} image_min_tokens = {r['image_min_tokens']} is above image_max_tokens = {r['image_max_tokens']}")
    for k in ("remote_image_tokens", "audio_tokens", "audio_bytes_per_token", "file_tokens"):
        v = getattr(m, k)
        _check(v > 0, f"[media] {k} = {v}: expected a positive integer")


def worker_ports(cfg: Config) -> list[int]:
    """gRPC port of each router worker: Envoy's ext_proc cluster lists each as
    its own endpoint, so each gets its own HTTP/2 connection and streams spread
    over the processes (one connection's streams all land in one process)."""
    return [cfg.router.port + i for i in range(cfg.router.workers)]


def admin_ports(cfg: Config) -> list[int]:
    """Admin gRPC port of each router worker (``[admin] port + i``)."""
    return [cfg.admin.port + i for i in range(cfg.router.workers)]


def to_toml(cfg: Config) -> str:
    """Render a config as TOML (used for `budget-router config --show`)."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{fmt(str(k))} = {fmt(x)}" for k, x in v.items()) + "}"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []
    for name in _SECTIONS:
        lines.append(f"[{name}]")
        lines += [f"{k} = {fmt(v)}" for k, v in _asdict(getattr(cfg, name)).items()]
        lines.append("")
    for pool in cfg.pools:
        lines += [f"[pools.{pool.name}]", f"max_model_len = {pool.max_model_len}",
                  f"endpoints = {fmt(pool.endpoints)}", ""]
    return "\n".join(lines)

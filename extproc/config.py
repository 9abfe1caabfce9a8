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
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import defaults as D

ENV_PREFIX = "BUDGET_ROUTER_"

_TIER_NAME = re.compile(D.TIER_NAME_PATTERN)


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent."""


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


#: A tier is a pool; the new name for the N-tier config.
TierConfig = PoolConfig


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
    #: route. ``policy.b_short`` always equals ``tiers[0].budget_limit``.
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
        return self.replace(tiers=tiers + self.tiers[-1:])

    def replace(self, **sections: Any) -> "Config":
        """A copy with whole sections or single keys replaced, e.g.
        ``cfg.replace(policy={"b_short": 16384})``; the result is validated.
        ``short=``/``long=`` (or any tier's name) change the first/last (that)
        tier; ``tiers=`` replaces all of them; ``policy.b_short`` is the first
        tier's budget limit."""
        out = self
        for section, value in sections.items():
            if section == "tiers":
                tiers = tuple(_tier_from(out, v, i) for i, v in enumerate(value))
                out = dataclasses.replace(out, tiers=tiers)
                out = dataclasses.replace(out, policy=dataclasses.replace(
                    out.policy, b_short=tiers[0].budget_limit if len(tiers) > 1 else out.policy.b_short))
                continue
            index = _tier_section(out, section)
            if index is not None:
                current = out.tiers[index]
                if isinstance(value, Mapping):
                    value = _pool(current.name, {**_asdict(current), **value, "name": None}, current)
                tiers = list(out.tiers)
                tiers[index] = value
                out = dataclasses.replace(out, tiers=tuple(tiers))
                continue
            current = getattr(out, section)
            if isinstance(value, Mapping):
                value = _build(type(current), section, {**_asdict(current), **value})
            out = dataclasses.replace(out, **{section: value})
            if section == "policy" and len(out.tiers) > 1:
                first = dataclasses.replace(out.tiers[0], budget_limit=out.policy.b_short)
                out = dataclasses.replace(out, tiers=(first,) + out.tiers[1:])
        validate(out)
        return out


def _tier_section(cfg: Config, section: str) -> int | None:
    """Index of the tier a ``replace`` keyword names: short (first), long
    (last), or a tier's own name; None for a plain section."""
    if section in _SECTIONS:
        return None
    for i, t in enumerate(cfg.tiers):
        if t.name == section:
            return i
    if section == "short":
        return 0
    if section == "long":
        return len(cfg.tiers) - 1
    raise ConfigError(f"unknown section or tier {section!r}")


def _tier_from(cfg: Config, value: Any, index: int) -> PoolConfig:
    if isinstance(value, PoolConfig):
        return value
    if isinstance(value, Mapping):
        return _tier_table(index, value)
    raise ConfigError(f"[[tiers]] #{index + 1}: expected a table, got {value!r}")


_SECTIONS = {
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

_TIER_KEYS = ("name", "max_model_len", "budget_limit", "endpoints")

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


def _endpoints(section: str, eps: Any) -> tuple[str, ...]:
    if isinstance(eps, str):
        eps = [e.strip() for e in eps.split(",") if e.strip()]
    if not isinstance(eps, (list, tuple)) or not all(isinstance(e, str) for e in eps):
        raise ConfigError(f"[{section}] endpoints = {eps!r}: expected a list of \"host:port\" strings")
    return tuple(eps)


def _pool(name: str, raw: Mapping[str, Any], default: PoolConfig) -> PoolConfig:
    """A tier addressed by name (``[pools.<name>]``, ``BUDGET_ROUTER_POOLS_<NAME>_*``)
    over its current values; its budget limit is kept (the policy sets it)."""
    section = f"pools.{name}"
    raw = {k: v for k, v in raw.items() if k not in ("name", "budget_limit")}
    unknown = sorted(set(raw) - {"max_model_len", "endpoints"})
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s) {', '.join(unknown)}; known: endpoints, max_model_len")
    mml = _coerce(section, "max_model_len", raw.get("max_model_len", default.max_model_len), int)
    eps = _endpoints(section, raw.get("endpoints", default.endpoints))
    return PoolConfig(name, mml, eps, default.budget_limit)


def _tier_table(index: int, raw: Mapping[str, Any]) -> PoolConfig:
    """One ``[[tiers]]`` table: name, max_model_len, budget_limit (not on the
    last tier; checked in validate), endpoints."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[[tiers]] #{index + 1} must be a table")
    name = raw.get("name")
    where = f"[[tiers]] #{index + 1}" + (f" ({name})" if isinstance(name, str) else "")
    unknown = sorted(set(raw) - set(_TIER_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_TIER_KEYS))}")
    for key in ("name", "max_model_len", "endpoints"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}")
    name = _coerce(where, "name", raw["name"], str)
    limit = raw.get("budget_limit")
    return PoolConfig(
        name,
        _coerce(where, "max_model_len", raw["max_model_len"], int),
        _endpoints(where, raw["endpoints"]),
        None if limit is None else _coerce(where, "budget_limit", limit, int),
    )


def _env_overrides(env: Mapping[str, str], tier_names: tuple[str, ...] = (D.SHORT_POOL, D.LONG_POOL)
                   ) -> dict[str, dict[str, Any]]:
    """``BUDGET_ROUTER_POLICY_B_SHORT=16384`` -> {"policy": {"b_short": "16384"}};
    ``BUDGET_ROUTER_POOLS_<TIER>_<KEY>`` addresses the tier of that name."""
    out: dict[str, dict[str, Any]] = {}
    names = list(_SECTIONS) + [f"pools_{t}" for t in tier_names]
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


def _tiers_raw(raw: dict[str, Any]) -> tuple[PoolConfig, ...] | None:
    """The ``[[tiers]]`` array, or None for the two-tier ``[pools.*]`` shape."""
    tiers_raw = raw.pop("tiers", None)
    if tiers_raw is None:
        return None
    if "pools" in raw:
        raise ConfigError("[pools.*] and [[tiers]] both given: use [[tiers]] only "
                          "(each with name, max_model_len, budget_limit, endpoints)")
    if not isinstance(tiers_raw, list) or not tiers_raw:
        raise ConfigError("tiers must be an array of tables [[tiers]] (name, max_model_len, "
                          "budget_limit absent on the last, endpoints)")
    if "b_short" in raw.get("policy", {}):
        raise ConfigError("[policy] b_short and [[tiers]] both given: with [[tiers]] the first "
                          "boundary is the first tier's budget_limit")
    return tuple(_tier_table(i, t) for i, t in enumerate(tiers_raw))


def from_mapping(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    tiers = _tiers_raw(raw)
    pools_raw = raw.pop("pools", {})
    if not isinstance(pools_raw, Mapping):
        raise ConfigError("[pools] must be a table with [pools.short] and [pools.long]")
    unknown_pools = sorted(set(pools_raw) - {"short", "long"})
    if unknown_pools:
        raise ConfigError(f"[pools] unknown pool(s) {', '.join(unknown_pools)}; [pools] has exactly 'short' "
                          "and 'long': for other or more tiers use [[tiers]] (name, max_model_len, "
                          "budget_limit, endpoints)")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(_SECTIONS))}, "
                          "pools, tiers")
    for name, value in raw.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"[{name}] must be a table")
    if tiers is None:
        base = Config().tiers
        b_short = _coerce("policy", "b_short", raw.get("policy", {}).get("b_short", D.B_SHORT), int)
        tiers = (dataclasses.replace(base[0], budget_limit=b_short), base[1])
        tiers = tuple(_pool(t.name, pools_raw.get(t.name, {}), t) for t in tiers)
    tier_overrides: dict[str, dict[str, Any]] = {}
    for section, values in _env_overrides(env or {}, tuple(t.name for t in tiers)).items():
        if section.startswith("pools_"):
            tier_overrides[section[6:]] = values
        else:
            raw[section] = {**raw.get(section, {}), **values}
    tiers = tuple(_pool(t.name, tier_overrides[t.name], t) if t.name in tier_overrides else t for t in tiers)
    policy = _build(PolicyConfig, "policy", raw.get("policy", {}))
    if len(tiers) > 1:
        if "b_short" in raw.get("policy", {}):  # the environment (or the legacy file) sets the first boundary
            tiers = (dataclasses.replace(tiers[0], budget_limit=policy.b_short),) + tiers[1:]
        elif tiers[0].budget_limit is not None:
            policy = dataclasses.replace(policy, b_short=tiers[0].budget_limit)
    cfg = Config(
        **{name: _build(cls, name, raw.get(name, {})) for name, cls in _SECTIONS.items() if name != "policy"},
        policy=policy, tiers=tiers,
    )
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def split_endpoint(ep: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port); ``ep`` is one the
    config validated (``_check_endpoint``)."""
    host, _, port = ep.rpartition(":")
    return host.strip("[]"), int(port)


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
    _check(r.drain_delay_s >= 0, f"[router] drain_delay_s = {r.drain_delay_s}: expected >= 0")
    _validate_tiers(cfg)
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
    m, sp, a = cfg.monitor, cfg.spillover, cfg.adaptive
    _check(0.05 <= m.interval_s <= 60, f"[monitor] interval_s = {m.interval_s}: expected 0.05-60 seconds")
    _check(1 <= m.stale_intervals <= 100, f"[monitor] stale_intervals = {m.stale_intervals}: expected 1-100")
    _check(sp.waiting_per_instance > 0, f"[spillover] waiting_per_instance = {sp.waiting_per_instance}: expected > 0")
    _check(0 <= sp.waiting_clear < sp.waiting_per_instance,
           f"[spillover] waiting_clear = {sp.waiting_clear}: expected >= 0 and below waiting_per_instance")
    _check(0 < sp.kv_usage <= 1, f"[spillover] kv_usage = {sp.kv_usage}: expected 0-1 (a share of the KV cache)")
    _check(0 <= sp.kv_clear < sp.kv_usage, f"[spillover] kv_clear = {sp.kv_clear}: expected >= 0 and below kv_usage")
    _check(0 < a.step_fraction <= 0.5, f"[adaptive] step_fraction = {a.step_fraction}: expected 0-0.5")
    _check(a.dwell_s >= 0, f"[adaptive] dwell_s = {a.dwell_s}: expected >= 0")
    _check(a.dead_band >= 0, f"[adaptive] dead_band = {a.dead_band}: expected >= 0")
    _check(0 < a.min_fraction <= 1, f"[adaptive] min_fraction = {a.min_fraction}: expected 0-1")


def _validate_tiers(cfg: Config) -> None:
    """Names unique and header-safe; limits increase; each limit fits its tier."""
    tiers, p = cfg.tiers, cfg.policy
    _check(2 <= len(tiers) <= D.MAX_TIERS, f"tiers: {len(tiers)} given; expected 2-{D.MAX_TIERS} "
           "(one pool needs no router)")
    names = [t.name for t in tiers]
    for t in tiers:
        _check(bool(_TIER_NAME.fullmatch(t.name)), f"tier name {t.name!r}: expected lower-case letters, digits "
               "and '_', starting with a letter, at most 32 (it is a header value, cluster and metric label)")
    dup = sorted({n for n in names if names.count(n) > 1})
    _check(not dup, f"tier name(s) {', '.join(dup)} used more than once")
    prev_limit, prev = 0, None
    for i, t in enumerate(tiers):
        where = f"[pools.{t.name}]"
        _check(t.max_model_len > 0, f"{where} max_model_len = {t.max_model_len}: expected > 0")
        _check(len(t.endpoints) > 0, f"{where} endpoints: expected at least one host:port")
        for ep in t.endpoints:
            _check_endpoint(where, ep)
        if prev is not None:
            _check(prev.max_model_len <= t.max_model_len,
                   f"[pools.{prev.name}] max_model_len = {prev.max_model_len} is above {where} max_model_len = "
                   f"{t.max_model_len}: each tier must serve every length the one before it does")
        prev = t
        if i == len(tiers) - 1:
            _check(t.budget_limit is None, f"{where} budget_limit = {t.budget_limit}: the last tier takes every "
                   "budget the others do not (it is the catch-all); remove its budget_limit")
            break
        key = "[policy] b_short" if i == 0 else f"{where} budget_limit"
        limit = t.budget_limit
        _check(limit is not None, f"{where}: budget_limit missing (every tier but the last needs one)")
        _check(limit > 0, f"{key} = {limit}: expected a positive token count")
        if i == 0:
            _check(limit >= D.MIN_B_SHORT, f"{key} = {limit}: expected at least {D.MIN_B_SHORT} tokens "
                   "(below that every chat request is long)")
        _check(limit <= t.max_model_len,
               f"{key} = {limit} is above {where} max_model_len = {t.max_model_len}: "
               f"requests routed to {t.name} would be rejected by its pool")
        _check(limit > prev_limit, f"{key} = {limit}: budget limits must increase from tier to tier "
               f"(the one before is {prev_limit})")
        prev_limit = limit
    _check(p.b_short == tiers[0].budget_limit,
           f"[policy] b_short = {p.b_short} differs from the first tier's budget_limit = {tiers[0].budget_limit}")


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
        if name == "policy":  # with [[tiers]] the first boundary is the first tier's budget_limit
            lines = [ln for ln in lines if not ln.startswith("b_short = ")]
    for t in cfg.tiers:
        lines += ["[[tiers]]", f"name = {fmt(t.name)}", f"max_model_len = {t.max_model_len}"]
        if t.budget_limit is not None:
            lines.append(f"budget_limit = {t.budget_limit}")
        lines += [f"endpoints = {fmt(t.endpoints)}", ""]
    return "\n".join(lines)

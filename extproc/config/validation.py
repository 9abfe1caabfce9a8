"""Validation of a whole configuration: ranges, and keys that must agree
with each other (ports with workers, tiers with their limits, TLS pairs).

Every error names the key, the value and what was expected, so a typo in a
deployment fails at start with a message an operator can act on. Pure; it
reads the config's attributes and does not import the schema (whose
``replace`` and ``with_limits`` validate their result).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from .. import defaults as D
from .endpoints import check_endpoint
from .errors import ConfigError

_TIER_NAME = re.compile(D.TIER_NAME_PATTERN)

#: Keys of a per-model image rule in [media] models.
MEDIA_MODEL_KEYS = ("image_patch_px", "image_min_tokens", "image_max_tokens", "image_overhead_tokens")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_tls(section: str, c: Any) -> None:
    """The TLS keys of a port's section (files are read at start, extproc.tls)."""
    _check(bool(c.tls_cert_file) == bool(c.tls_key_file),
           f"[{section}] tls_cert_file and tls_key_file: set both (TLS) or neither")
    _check(not c.tls_client_ca_file or bool(c.tls_cert_file),
           f"[{section}] tls_client_ca_file needs tls_cert_file and tls_key_file "
           "(mTLS is TLS plus client certificates)")


def validate(cfg: Any) -> None:
    """ConfigError naming the first key whose value is out of range or
    inconsistent with another (``cfg`` is a ``schema.Config``)."""
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
        check_endpoint("[admin] warm_start_peers", peer)
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
        check_endpoint("[envoy] otlp_endpoint", v.otlp_endpoint)
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


def _validate_tiers(cfg: Any) -> None:
    """Names unique and header-safe; limits increase; each limit fits its tier."""
    tiers = cfg.tiers
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
            check_endpoint(where, ep)
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


def _validate_media(m: Any) -> None:
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

"""Helpers for tests that check Envoy fragments (the operator snippet, the
Istio EnvoyFilter patches) with the real Envoy: wrap them in a minimal
operator bootstrap and run ``envoy --mode validate``."""

from __future__ import annotations

import pytest
import yaml

from extproc.envoy import bootstrap as E


def envoy_validate(boot: dict) -> None:
    try:
        res = E.validate_yaml(yaml.safe_dump(boot, sort_keys=False))
    except E.EnvoyNotFound as e:
        pytest.skip(str(e))
    assert res.returncode == 0, res.stdout + res.stderr


def bootstrap_around(hcm_parts: dict, listener_limit: int, clusters: list[dict]) -> dict:
    """A one-listener bootstrap whose HTTP connection manager holds ``hcm_parts``,
    with ``clusters`` plus the two pool clusters the routes name."""
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "operator_ingress", "codec_type": "AUTO", **hcm_parts}
    pool = lambda name: {"name": name, "type": "STATIC", "connect_timeout": "5s",
                         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                             {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                          "port_value": 8000}}}}]}]}}
    return {"static_resources": {
        "listeners": [{"name": "operator", "per_connection_buffer_limit_bytes": listener_limit,
                       "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                       "filter_chains": [{"filters": [{"name": E.HCM_FILTER, "typed_config": hcm}]}]}],
        "clusters": [*clusters, pool("pool_short"), pool("pool_long")]}}

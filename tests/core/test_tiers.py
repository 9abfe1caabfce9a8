"""N tiers: the [[tiers]] config, the old two-pool shape converted to it,
validation, and the policy's smallest-fitting-tier rule."""

from __future__ import annotations

import pytest

from extproc import config as C
from extproc.config import ConfigError
from extproc.core import policy as P
from extproc.core.router import Router

THREE = {"tiers": [
    {"name": "short", "max_model_len": 8192, "budget_limit": 8000, "endpoints": ["10.0.0.1:8000"]},
    {"name": "medium", "max_model_len": 32768, "budget_limit": 32000, "endpoints": ["vllm-medium:8000"]},
    {"name": "long", "max_model_len": 131072, "endpoints": ["10.0.0.3:8000", "10.0.0.4:8000"]},
]}


def _three(i: int, key: str, value) -> dict:
    """THREE with tier ``i``'s ``key`` set to ``value`` (None: removed)."""
    tiers = [dict(t) for t in THREE["tiers"]]
    if value is None:
        tiers[i].pop(key, None)
    else:
        tiers[i][key] = value
    return {"tiers": tiers}


def test_three_tiers_load_and_keep_short_long_accessors():
    cfg = C.from_mapping(THREE, {})
    assert [t.name for t in cfg.tiers] == ["short", "medium", "long"]
    assert cfg.limits == (8000, 32000) and cfg.b_short == 8000
    assert cfg.short.name == "short" and cfg.long.name == "long" and cfg.long.budget_limit is None
    assert [t.cluster for t in cfg.pools] == ["pool_short", "pool_medium", "pool_long"]
    assert cfg.tier("medium").endpoints == ("vllm-medium:8000",)


def test_old_pools_shape_becomes_two_tiers():
    cfg = C.from_mapping({"policy": {"b_short": 4096}, "pools": {"short": {"max_model_len": 16384}}}, {})
    assert [(t.name, t.max_model_len, t.budget_limit) for t in cfg.tiers] == [
        ("short", 16384, 4096), ("long", 131072, None)]
    assert C.from_mapping({}, {}).tiers == C.Config().tiers


def test_to_toml_round_trips_both_shapes():
    for raw in (THREE, {"policy": {"b_short": 4096}}):
        cfg = C.from_mapping(raw, {})
        import tomllib
        assert C.from_mapping(tomllib.loads(C.to_toml(cfg)), {}) == cfg


def test_env_overrides_reach_tiers_by_name_and_the_first_boundary():
    env = {"BUDGET_ROUTER_POLICY_B_SHORT": "4096", "BUDGET_ROUTER_POOLS_MEDIUM_ENDPOINTS": "a:1,b:2",
           "BUDGET_ROUTER_POOLS_LONG_MAX_MODEL_LEN": "262144"}
    cfg = C.from_mapping(THREE, env)
    assert cfg.limits == (4096, 32000) and cfg.b_short == 4096
    assert cfg.tier("medium").endpoints == ("a:1", "b:2") and cfg.long.max_model_len == 262144
    # the two-tier shape, as before
    cfg = C.from_mapping({}, {"BUDGET_ROUTER_POOLS_SHORT_ENDPOINTS": "x:1", "BUDGET_ROUTER_POLICY_B_SHORT": "2048"})
    assert cfg.short.endpoints == ("x:1",) and cfg.limits == (2048,)


@pytest.mark.parametrize("raw, message", [
    (_three(1, "budget_limit", 4000), r"\[pools.medium\] budget_limit = 4000: budget limits must increase"),
    (_three(1, "budget_limit", 40000), r"\[pools.medium\] budget_limit = 40000 is above \[pools.medium\] "
                                             r"max_model_len = 32768"),
    (_three(0, "budget_limit", 9000), r"\[policy\] b_short = 9000 is above \[pools.short\] max_model_len"),
    (_three(2, "budget_limit", 100000), r"\[pools.long\] budget_limit = 100000: the last tier .* catch-all"),
    (_three(1, "budget_limit", None), r"\[pools.medium\]: budget_limit missing"),
    (_three(1, "name", "short"), r"tier name\(s\) short used more than once"),
    (_three(1, "name", "Medium Tier"), r"tier name 'Medium Tier': expected lower-case"),
    (_three(1, "max_model_len", 4096), r"\[pools.short\] max_model_len = 8192 is above \[pools.medium\]"),
    (_three(1, "endpoints", None), r"\[\[tiers\]\] #2 \(medium\): missing key 'endpoints'"),
    (_three(1, "colour", "red"), r"\[\[tiers\]\] #2 \(medium\): unknown key\(s\) colour"),
    ({**THREE, "policy": {"b_short": 4096}}, r"\[policy\] b_short and \[\[tiers\]\] both given"),
    ({**THREE, "pools": {"short": {}}}, r"\[pools.\*\] and \[\[tiers\]\] both given"),
    ({"tiers": THREE["tiers"][2:]}, r"tiers: 1 given; expected 2-8"),
    ({"pools": {"medium": {}}}, r"\[pools\] unknown pool\(s\) medium; .*use \[\[tiers\]\]"),
])
def test_invalid_tiers_fail_with_a_clear_message(raw, message):
    with pytest.raises(ConfigError, match=message):
        C.from_mapping(raw, {})


def test_replace_and_with_limits():
    cfg = C.from_mapping(THREE, {})
    assert cfg.replace(policy={"b_short": 4000}).limits == (4000, 32000)
    assert cfg.with_limits([6000, 20000]).limits == (6000, 20000)
    with pytest.raises(ConfigError, match="must increase"):
        cfg.with_limits([6000, 5000])
    assert cfg.replace(medium={"endpoints": ("m:1",)}).tier("medium").endpoints == ("m:1",)
    assert cfg.replace(long={"max_model_len": 262144}).long.max_model_len == 262144


@pytest.mark.parametrize("padded, tier", [(0, 0), (8000, 0), (8001, 1), (32000, 1), (32001, 2), (10**6, 2)])
def test_smallest_tier_whose_limit_fits(padded, tier):
    assert P.tier_for((8000, 32000), padded) == tier


def test_router_routes_three_tiers_by_budget():
    cfg = C.from_mapping(THREE, {})
    r = Router(cfg)
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":%d}'
    got = {n: (d.pool, d.reason) for n in (100, 20000, 60000) for d in [r.route("/v1/chat/completions", body % n)]}
    assert got == {100: ("short", P.R_SHORT), 20000: ("medium", P.R_TIER), 60000: ("long", P.R_LONG)}


def test_replay_judges_misroutes_against_the_tier_the_true_budget_needs():
    import io

    import orjson

    from extproc.tools.replay import Summary, replay_lines

    def rec(n_prompt: int, max_tokens: int, true_prompt: int) -> bytes:
        return orjson.dumps({"path": "/v1/completions",
                             "body": {"model": "m", "prompt": [1] * n_prompt, "max_tokens": max_tokens},
                             "usage": {"prompt_tokens": true_prompt, "completion_tokens": 1}})

    r = Router(C.from_mapping(THREE, {}))
    s = Summary()
    out = io.BytesIO()
    # exact token-id prompts: the estimate is the truth unless the usage says otherwise
    replay_lines(r, [rec(100, 100, 100), rec(10000, 100, 10000), rec(100, 100, 9000), rec(20000, 100, 100)], out, s)
    rows = [orjson.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["pool"], x["oracle_pool"]) for x in rows] == [
        ("short", "short"), ("medium", "medium"), ("short", "medium"), ("medium", "short")]
    assert (s.harmful, s.benign) == (1, 1) and s.pools == {"short": 2, "medium": 2}


def test_truncation_at_a_middle_tiers_context_is_a_misroute():
    """vLLM 0.32 clips an answer at the context of the tier it reached; any
    tier but the last counts (the last has nowhere larger to send it)."""
    r = Router(C.from_mapping(THREE, {}))
    d = P.Decision(pool="medium", reason=P.R_LONG, capped=False)
    assert r.truncation_misroute(d, 30000, 2768)         # reached medium's 32768
    assert not r.truncation_misroute(d, 30000, 2000)     # ended inside the context
    d.pool = "short"
    assert r.truncation_misroute(d, 7000, 1192)          # reached short's 8192
    d.pool = "long"
    assert not r.truncation_misroute(d, 130000, 1072)    # the last tier: nowhere larger

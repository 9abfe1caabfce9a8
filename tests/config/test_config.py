"""Config: defaults, file + env precedence, validation messages, to_toml round trip."""

from __future__ import annotations

import tomllib

import pytest

from extproc import config as C
from extproc import defaults as D
from extproc.config import Config, ConfigError


def test_defaults_load_without_file_or_env():
    cfg = C.load(None, env={})
    assert cfg == Config()
    assert cfg.b_short == D.B_SHORT == 8192
    assert cfg.short.max_model_len == D.SHORT_MAX_MODEL_LEN
    assert cfg.long.max_model_len == D.LONG_MAX_MODEL_LEN
    assert cfg.short.endpoints == (f"127.0.0.1:{D.SHORT_POOL_PORT}",)
    assert cfg.long.endpoints == (f"127.0.0.1:{D.LONG_POOL_PORT}",)
    assert cfg.short.cluster == "pool_short" and cfg.long.cluster == "pool_long"
    assert cfg.router.routing_header == "x-budget-pool"
    assert cfg.router.inject_include_usage is False
    assert C.worker_ports(cfg) == [D.ROUTER_PORT]


def _write(tmp_path, text):
    p = tmp_path / "router.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_file_overrides_defaults_and_env_overrides_file(tmp_path):
    p = _write(tmp_path, """
[router]
workers = 3
sample_rate = 0.1
[policy]
b_short = 4096
margin_sigmas = 2.0
[pools.short]
max_model_len = 16384
endpoints = ["10.0.0.1:8000", "10.0.0.2:8000"]
""")
    cfg = C.load(p, env={})
    assert cfg.router.workers == 3
    assert cfg.router.sample_rate == 0.1
    assert cfg.b_short == 4096
    assert cfg.policy.margin_sigmas == 2.0
    assert cfg.short.max_model_len == 16384
    assert cfg.short.endpoints == ("10.0.0.1:8000", "10.0.0.2:8000")
    assert C.worker_ports(cfg) == [D.ROUTER_PORT, D.ROUTER_PORT + 1, D.ROUTER_PORT + 2]
    # untouched values stay default
    assert cfg.long == Config().long
    assert cfg.estimator == Config().estimator

    env = {
        "BUDGET_ROUTER_POLICY_B_SHORT": "16_384",
        "BUDGET_ROUTER_POOLS_SHORT_MAX_MODEL_LEN": "32768",
        "BUDGET_ROUTER_POOLS_LONG_ENDPOINTS": "a:1, b:2",
        "BUDGET_ROUTER_ROUTER_INJECT_INCLUDE_USAGE": "yes",
        "BUDGET_ROUTER_ESTIMATOR_MAX_MODELS": "8",
        "UNRELATED": "x",
    }
    cfg = C.load(p, env=env)
    assert cfg.b_short == 16384               # env beats file
    assert cfg.policy.margin_sigmas == 2.0           # file kept where env is silent
    assert cfg.short.max_model_len == 32768
    assert cfg.short.endpoints == ("10.0.0.1:8000", "10.0.0.2:8000")
    assert cfg.long.endpoints == ("a:1", "b:2")
    assert cfg.router.inject_include_usage is True
    assert cfg.estimator.max_models == 8
    assert cfg.router.workers == 3


def test_config_path_from_env(tmp_path):
    p = _write(tmp_path, "[policy]\nb_short = 2048\n")
    cfg = C.load(None, env={"BUDGET_ROUTER_CONFIG": str(p)})
    assert cfg.b_short == 2048


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        C.load(tmp_path / "nope.toml", env={})
    p = _write(tmp_path, "[policy\nb_short = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        C.load(p, env={})


@pytest.mark.parametrize("raw, env, pattern", [
    # b_short above the short pool's max_model_len
    ({"policy": {"b_short": 9000}}, {},
     r"\[policy\] b_short = 9000 is above \[pools.short\] max_model_len = 8192"),
    ({}, {"BUDGET_ROUTER_POLICY_B_SHORT": "10000"},
     r"\[policy\] b_short = 10000 is above \[pools.short\] max_model_len"),
    # bad endpoints
    ({"pools": {"short": {"endpoints": ["localhost"]}}}, {},
     r"\[pools.short\]: endpoint 'localhost' is not host:port"),
    ({"pools": {"long": {"endpoints": ["h:70000"]}}}, {},
     r"\[pools.long\]: endpoint 'h:70000' is not host:port"),
    ({"pools": {"long": {"endpoints": [":80"]}}}, {}, r"\[pools.long\]: endpoint ':80'"),
    ({"pools": {"long": {"endpoints": []}}}, {}, r"\[pools.long\] endpoints: expected at least one"),
    ({"pools": {"long": {"endpoints": [1, 2]}}}, {}, r"\[pools.long\] endpoints = \[1, 2\]"),
    # unknown key / section / pool
    ({"policy": {"b_shrot": 1}}, {}, r"\[policy\] unknown key\(s\) b_shrot; known: .*b_short"),
    ({"polcy": {"b_short": 1}}, {}, r"unknown section\(s\) polcy"),
    ({"pools": {"medium": {}}}, {}, r"\[pools\] unknown pool\(s\) medium"),
    ({"pools": {"short": {"max_len": 1}}}, {}, r"\[pools.short\] unknown key\(s\) max_len"),
    ({"pools": 3}, {}, r"\[pools\] must be a table"),
    ({"policy": 3}, {}, r"\[policy\] must be a table"),
    # bad bool / int / float / str
    ({"router": {"inject_include_usage": "maybe"}}, {},
     r"\[router\] inject_include_usage = 'maybe': expected true or false"),
    ({}, {"BUDGET_ROUTER_ROUTER_INJECT_INCLUDE_USAGE": "2"},
     r"\[router\] inject_include_usage = '2': expected true or false"),
    ({"router": {"workers": "many"}}, {}, r"\[router\] workers = 'many': expected an integer"),
    ({"router": {"workers": True}}, {}, r"\[router\] workers = True: expected an integer"),
    ({"router": {"workers": 1.5}}, {}, r"\[router\] workers = 1.5: expected an integer"),
    ({}, {"BUDGET_ROUTER_POLICY_B_SHORT": "8k"}, r"\[policy\] b_short = '8k': expected an integer"),
    ({"policy": {"margin_sigmas": "lots"}}, {}, r"\[policy\] margin_sigmas = 'lots': expected a number"),
    ({"router": {"transport": 5}}, {}, r"\[router\] transport = 5: expected a string"),
    ({"pools": {"short": {"max_model_len": "big"}}}, {},
     r"\[pools.short\] max_model_len = 'big': expected an integer"),
    # env var with an unknown section
    ({}, {"BUDGET_ROUTER_POLICIES_B_SHORT": "1"},
     r"environment variable BUDGET_ROUTER_POLICIES_B_SHORT: unknown section"),
    ({}, {"BUDGET_ROUTER_POLICY_BSHORT": "1"}, r"\[policy\] unknown key\(s\) bshort"),
    # range checks
    ({"router": {"workers": 0}}, {}, r"\[router\] workers = 0: expected 1-64"),
    ({"router": {"transport": "h3"}}, {}, r"\[router\] transport = 'h3'"),
    ({"router": {"port": 65535, "workers": 2}}, {}, r"\[router\] port 65535 \+ workers 2 runs past 65535"),
    ({"router": {"routing_header": "X-Pool"}}, {}, r"\[router\] routing_header = 'X-Pool'"),
    ({"router": {"decision_header": "x-budget-pool"}}, {}, r"routing_header and decision_header must differ"),
    ({"router": {"max_body_bytes": 1000}}, {}, r"\[router\] max_body_bytes = 1000"),
    ({"router": {"sample_rate": 1.5}}, {}, r"\[router\] sample_rate = 1.5"),
    ({"policy": {"b_short": 0}}, {}, r"\[policy\] b_short = 0: expected a positive"),
    ({"policy": {"output_quantile": 0.3}}, {}, r"\[policy\] output_quantile = 0.3"),
    ({"estimator": {"prior_bytes_per_token": 20}}, {}, r"\[estimator\] prior_bytes_per_token = 20"),
    ({"estimator": {"max_models": 0}}, {}, r"\[estimator\] max_models = 0"),
    ({"pools": {"long": {"max_model_len": 4096}}}, {},
     r"\[pools.short\] max_model_len = 8192 is above \[pools.long\] max_model_len = 4096"),
    ({"envoy": {"admin_port": 0}}, {}, r"\[envoy\] admin_port = 0"),
])
def test_validation_errors_name_the_key(raw, env, pattern):
    with pytest.raises(ConfigError, match=pattern):
        C.from_mapping(raw, env)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("text", ["1", "true", "YES", "on"])
def test_env_bool_true_spellings(text):
    cfg = C.from_mapping({}, {"BUDGET_ROUTER_ROUTER_INJECT_INCLUDE_USAGE": text})
    assert cfg.router.inject_include_usage is True


@pytest.mark.parametrize("text", ["0", "false", "No", "OFF"])
def test_env_bool_false_spellings(text):
    cfg = C.from_mapping({"router": {"inject_include_usage": True}},
                         {"BUDGET_ROUTER_ROUTER_INJECT_INCLUDE_USAGE": text})
    assert cfg.router.inject_include_usage is False


def test_env_int_forms():
    assert C.from_mapping({}, {"BUDGET_ROUTER_POLICY_B_SHORT": "0x1000"}).b_short == 4096
    assert C.from_mapping({}, {"BUDGET_ROUTER_ENVOY_PORT": "10_001"}).envoy.port == 10001
    assert C.from_mapping({}, {"BUDGET_ROUTER_POLICY_MIN_MARGIN": "0.05"}).policy.min_margin == 0.05


def test_replace_validates():
    cfg = Config().replace(policy={"b_short": 4096})
    assert cfg.b_short == 4096 and cfg.policy.margin_sigmas == D.MARGIN_SIGMAS
    cfg2 = cfg.replace(short={"max_model_len": 32768}, policy={"b_short": 16384})
    assert cfg2.short.max_model_len == 32768 and cfg2.short.name == "short"
    assert cfg2.b_short == 16384
    with pytest.raises(ConfigError, match=r"b_short = 9000 is above"):
        Config().replace(policy={"b_short": 9000})
    with pytest.raises(ConfigError, match=r"\[policy\] unknown key"):
        Config().replace(policy={"nope": 1})


def _nondefault() -> Config:
    return C.from_mapping({
        "router": {"workers": 4, "transport": "grpcio", "sample_rate": 0.25, "inject_include_usage": True,
                   "state_file": 'dir with "quotes"\\and\\backslashes/state.json', "drain_seconds": 1.5},
        "policy": {"b_short": 12000, "margin_sigmas": 2.5, "output_quantile": 0.95},
        "estimator": {"prior_bytes_per_token": 3.5, "max_models": 10},
        "envoy": {"port": 11000, "route_timeout_s": 60},
        "pools": {"short": {"max_model_len": 16384, "endpoints": ["a:1", "b:2"]},
                  "long": {"max_model_len": 262144, "endpoints": ["c:3"]}},
    })


@pytest.mark.parametrize("cfg", [Config(), _nondefault()], ids=["default", "custom"])
def test_to_toml_round_trips(cfg, tmp_path):
    text = C.to_toml(cfg)
    tomllib.loads(text)  # valid TOML
    assert C.from_mapping(tomllib.loads(text), {}) == cfg
    p = _write(tmp_path, text)
    assert C.load(p, env={}) == cfg


def test_media_section_validated_and_overridable():
    cfg = C.from_mapping({"media": {"models": {"llava": {"image_patch_px": 14, "image_max_tokens": 576}}}},
                          env={"BUDGET_ROUTER_MEDIA_REMOTE_IMAGE_TOKENS": "2048"})
    assert cfg.media.remote_image_tokens == 2048 and cfg.media.models["llava"]["image_patch_px"] == 14
    for bad, words in [({"models": {"m": {"patch": 14}}}, "keys among"),
                       ({"models": {"m": {"image_patch_px": 0}}}, "positive integer"),
                       ({"image_min_tokens": 10, "image_max_tokens": 5}, "above image_max_tokens"),
                       ({"models": "llava"}, "table of model names"),
                       ({"file_tokens": 0}, "file_tokens")]:
        with pytest.raises(ConfigError, match=words):
            C.from_mapping({"media": bad}, env={})


# --- The package: tiers in one form, the old shape translated ----------------

LEGACY = {"policy": {"b_short": 4096, "margin_sigmas": 1.5},
          "pools": {"short": {"max_model_len": 16384, "endpoints": ["a:1", "b:2"]},
                    "long": {"endpoints": ["c:3"]}}}
TIERS = {"policy": {"margin_sigmas": 1.5},
         "tiers": [{"name": "short", "max_model_len": 16384, "budget_limit": 4096, "endpoints": ["a:1", "b:2"]},
                   {"name": "long", "max_model_len": D.LONG_MAX_MODEL_LEN, "endpoints": ["c:3"]}]}


def test_old_pools_shape_is_the_same_config_as_its_tiers():
    assert C.from_mapping(LEGACY, {}) == C.from_mapping(TIERS, {})
    assert "b_short" not in {f for f in C.PolicyConfig.__dataclass_fields__}  # one place for B_short
    assert C.from_mapping(LEGACY, {}).b_short == C.from_mapping(TIERS, {}).limits[0] == 4096


def test_replace_translates_the_old_spellings_like_the_loader():
    base = C.from_mapping(TIERS, {})
    assert base.replace(policy={"b_short": 2048}) == base.with_limits([2048])
    assert base.replace(policy={"b_short": 2048}) == C.from_mapping(TIERS, {"BUDGET_ROUTER_POLICY_B_SHORT": "2048"})
    assert base.replace(short={"endpoints": ["x:9"]}) == C.from_mapping(
        TIERS, {"BUDGET_ROUTER_POOLS_SHORT_ENDPOINTS": "x:9"})
    assert base.replace(long={"max_model_len": 262144}).long.max_model_len == 262144
    with pytest.raises(ConfigError, match=r"unknown section or tier 'medium'"):
        base.replace(medium={"endpoints": ["x:9"]})
    with pytest.raises(ConfigError, match=r"\[pools.short\] unknown key\(s\) colour"):
        base.replace(short={"colour": "red"})


def test_package_reexports_the_loader_on_first_use():
    from extproc.config import load as load_  # noqa: F401 (PEP 562 re-export)
    from extproc.config import loader
    assert C.load is loader.load and C.MAX_CONFIG_BYTES == loader.MAX_CONFIG_BYTES
    assert "load_config" in dir(C)
    with pytest.raises(AttributeError):
        C.no_such_name  # noqa: B018

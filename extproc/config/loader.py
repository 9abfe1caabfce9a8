"""Loading a configuration: one TOML file plus ``BUDGET_ROUTER_*`` environment
variables, over the built-in defaults.

Precedence: built-in defaults (``extproc.defaults``) < config file < environment.
An environment variable names a key as ``BUDGET_ROUTER_<SECTION>_<KEY>``, e.g.
``BUDGET_ROUTER_POLICY_MARGIN_SIGMAS=1.5``; ``BUDGET_ROUTER_POOLS_<TIER>_<KEY>``
sets a tier's max_model_len or endpoints, ``BUDGET_ROUTER_POLICY_B_SHORT`` the
first tier's budget limit (translated by ``extproc.config.parse``, as the old
``[pools.short/long]`` + ``[policy] b_short`` file is).

The file and process environment are read here and nowhere else in the
package; the pure core never imports this module.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Mapping

from . import parse as P
from .errors import ConfigError
from .schema import SECTIONS, Config, as_raw, build

ENV_PREFIX = "BUDGET_ROUTER_"

#: Environment variables under ENV_PREFIX that are not config keys.
#: ADMIN_TOKEN is a secret (kept out of Config, so `config --show` and
#: ConfigResult never print it); LOG_FORMAT and LOG_LEVEL are read by logging
#: setup before any config exists; LOOP (serve/loop.py) picks the event loop
#: before the worker starts, so it is a process setting, not a config key.
NON_CONFIG_ENV = frozenset({"CONFIG", "ADMIN_TOKEN", "LOG_FORMAT", "LOG_LEVEL", "LOOP"})

#: Largest config file read (and the only kind: a regular file). A real one is
#: a few KB; the bound keeps a mistaken path (/dev/zero, a log file) from
#: eating memory, the way ReloadConfig did before it stopped taking paths.
MAX_CONFIG_BYTES = 1024 * 1024


def from_mapping(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """The validated Config of a parsed TOML document ``raw`` and the
    environment ``env`` (only ``BUDGET_ROUTER_*`` variables are read)."""
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    tiers_raw = raw.pop("tiers", None)
    if tiers_raw is not None:
        if "pools" in raw:
            raise ConfigError("[pools.*] and [[tiers]] both given: use [[tiers]] only "
                              "(each with name, max_model_len, budget_limit, endpoints)")
        tiers_raw = P.tiers_list(tiers_raw)
        if isinstance(raw.get("policy"), Mapping) and "b_short" in raw["policy"]:
            raise ConfigError("[policy] b_short and [[tiers]] both given: with [[tiers]] the first "
                              "boundary is the first tier's budget_limit")
    pools_raw = raw.pop("pools", {})
    if not isinstance(pools_raw, Mapping):
        raise ConfigError("[pools] must be a table with [pools.short] and [pools.long]")
    unknown_pools = sorted(set(pools_raw) - {"short", "long"})
    if unknown_pools:
        raise ConfigError(f"[pools] unknown pool(s) {', '.join(unknown_pools)}; [pools] has exactly 'short' "
                          "and 'long': for other or more tiers use [[tiers]] (name, max_model_len, "
                          "budget_limit, endpoints)")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(SECTIONS))}, "
                          "pools, tiers")
    for name, value in raw.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"[{name}] must be a table")

    out = as_raw(Config())
    if tiers_raw is not None:
        out["tiers"] = [P.tier_table(i, t) for i, t in enumerate(tiers_raw)]
    _overlay(out, raw, pools_raw)
    env_sections, env_pools = _env_overrides(env or {}, tuple(t["name"] for t in out["tiers"]))
    _overlay(out, env_sections, env_pools)
    return build(out)


def _overlay(out: dict[str, Any], sections: Mapping[str, dict[str, Any]],
             pools: Mapping[str, Mapping[str, Any]]) -> None:
    """Sections' keys over ``out`` (the old spellings moved into the tiers),
    then each ``[pools.<name>]`` table over the tier it names."""
    for name, values in sections.items():
        values = dict(values)
        P.take_legacy_keys(name, values, out["tiers"])
        out[name] = {**out[name], **values}
    for name, values in pools.items():
        index = P.pool_index(out["tiers"], name)
        out["tiers"][index] = P.pool_overlay(out["tiers"][index], values)


def _env_overrides(env: Mapping[str, str], tier_names: tuple[str, ...]
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``BUDGET_ROUTER_POLICY_MIN_MARGIN=0.05`` -> ({"policy": {"min_margin": "0.05"}}, {});
    ``BUDGET_ROUTER_POOLS_<TIER>_<KEY>`` addresses the tier of that name (second dict)."""
    sections: dict[str, dict[str, Any]] = {}
    pools: dict[str, dict[str, Any]] = {}
    names = list(SECTIONS) + [f"pools_{t}" for t in tier_names]
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var[len(ENV_PREFIX):] in NON_CONFIG_ENV:
            continue
        rest = var[len(ENV_PREFIX):].lower()
        for section in sorted(names, key=len, reverse=True):
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1:]
                if section.startswith("pools_"):
                    pools.setdefault(section[len("pools_"):], {})[key] = value
                else:
                    sections.setdefault(section, {})[key] = value
                break
        else:
            raise ConfigError(
                f"environment variable {var}: unknown section; expected {ENV_PREFIX}<SECTION>_<KEY> "
                f"with SECTION one of {', '.join(s.upper() for s in names)}"
            )
    return sections, pools


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

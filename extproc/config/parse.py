"""Raw values to typed fields: TOML tables, environment strings and keyword
arguments all pass through here, so each key has one way to be read and one
error message.

Tiers have one form, the ``[[tiers]]`` table (name, max_model_len,
budget_limit, endpoints). The old two-tier shape is translated into it here,
once, for the file, the environment and ``Config.replace`` alike:
``[pools.<name>]`` (``BUDGET_ROUTER_POOLS_<NAME>_*``, ``replace(<name>=...)``)
edits the tier of that name, and ``[policy] b_short`` sets the first tier's
``budget_limit``.

Pure: no file, no environment of its own (both are passed in), and no import
of the schema (the schema's ``replace`` uses this module).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .errors import ConfigError

#: Keys of one ``[[tiers]]`` table.
TIER_KEYS = ("name", "max_model_len", "budget_limit", "endpoints")

#: Keys a ``[pools.<name>]`` table may set (its name is the table's, its
#: budget limit the policy's ``b_short`` or the next tier's).
POOL_KEYS = ("endpoints", "max_model_len")

#: Keys a section still takes that are not fields of its dataclass: the old
#: two-tier spelling of a tier's value, translated by ``take_legacy_keys``.
LEGACY_KEYS: dict[str, tuple[str, ...]] = {"policy": ("b_short",)}


def fields_of(obj: Any) -> dict[str, Any]:
    """A section (or tier) dataclass as a plain dict, field order kept."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def coerce(section: str, key: str, value: Any, typ: Any) -> Any:
    """``value`` as the field's type (from TOML or an environment string);
    ConfigError naming ``[section] key`` and the value otherwise."""
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


def build_section(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    """The section dataclass ``cls`` from ``values`` (every key coerced; an
    unknown key is an error listing the known ones)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = sorted(set(fields) | set(LEGACY_KEYS.get(section, ())))
        raise ConfigError(f"[{section}] unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return cls(**{k: coerce(section, k, v, fields[k].type) for k, v in values.items()})


def endpoints(section: str, eps: Any) -> tuple[str, ...]:
    """A tier's endpoints: a list of strings, or one comma-separated string."""
    if isinstance(eps, str):
        eps = [e.strip() for e in eps.split(",") if e.strip()]
    if not isinstance(eps, (list, tuple)) or not all(isinstance(e, str) for e in eps):
        raise ConfigError(f"[{section}] endpoints = {eps!r}: expected a list of \"host:port\" strings")
    return tuple(eps)


def tier_table(index: int, raw: Any) -> dict[str, Any]:
    """One ``[[tiers]]`` table, coerced: name, max_model_len, budget_limit
    (absent on the last tier; checked in validation), endpoints."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[[tiers]] #{index + 1} must be a table")
    name = raw.get("name")
    where = f"[[tiers]] #{index + 1}" + (f" ({name})" if isinstance(name, str) else "")
    unknown = sorted(set(raw) - set(TIER_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(TIER_KEYS))}")
    for key in ("name", "max_model_len", "endpoints"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}")
    limit = raw.get("budget_limit")
    return {
        "name": coerce(where, "name", raw["name"], str),
        "max_model_len": coerce(where, "max_model_len", raw["max_model_len"], int),
        "endpoints": endpoints(where, raw["endpoints"]),
        "budget_limit": None if limit is None else coerce(where, "budget_limit", limit, int),
    }


def tiers_list(value: Any) -> list[Any]:
    """The ``[[tiers]]`` array itself: a non-empty list of tables."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError("tiers must be an array of tables [[tiers]] (name, max_model_len, "
                          "budget_limit absent on the last, endpoints)")
    return list(value)


def pool_overlay(current: Mapping[str, Any], raw: Mapping[str, Any]) -> dict[str, Any]:
    """The old ``[pools.<name>]`` table over the tier ``current`` (a tier
    table): it sets max_model_len and endpoints; the tier keeps its name and
    budget limit (``name``/``budget_limit`` keys are ignored, as they always were)."""
    name = current["name"]
    section = f"pools.{name}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{section}] must be a table")
    raw = {k: v for k, v in raw.items() if k not in ("name", "budget_limit")}
    unknown = sorted(set(raw) - set(POOL_KEYS))
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s) {', '.join(unknown)}; known: {', '.join(POOL_KEYS)}")
    return {**current,
            "max_model_len": coerce(section, "max_model_len", raw.get("max_model_len", current["max_model_len"]), int),
            "endpoints": endpoints(section, raw.get("endpoints", current["endpoints"]))}


def pool_index(tiers: list[Mapping[str, Any]], name: str) -> int | None:
    """The tier a ``[pools.<name>]`` table (or ``replace(<name>=...)``) edits:
    the tier of that name; else ``short`` is the first and ``long`` the last."""
    for i, t in enumerate(tiers):
        if t["name"] == name:
            return i
    if name == "short":
        return 0
    if name == "long":
        return len(tiers) - 1
    return None


def take_legacy_keys(section: str, values: dict[str, Any], tiers: list[dict[str, Any]]) -> None:
    """Move the old spelling out of a section's values into the tiers:
    ``[policy] b_short`` becomes the first tier's ``budget_limit``."""
    if section != "policy" or "b_short" not in values:
        return
    b_short = coerce("policy", "b_short", values.pop("b_short"), int)
    if len(tiers) > 1:  # one tier is refused by validation, naming the count
        tiers[0] = {**tiers[0], "budget_limit": b_short}

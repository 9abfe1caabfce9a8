"""A configuration rendered back as TOML (``budget-router config --show``,
the admin plane's ConfigResult, ``plan --emit``): every section, then the
tiers as ``[[tiers]]``; ``loader.from_mapping`` reads it back to an equal Config."""

from __future__ import annotations

from typing import Any, Mapping

from .parse import fields_of
from .schema import SECTIONS, Config


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_fmt(str(k))} = {_fmt(x)}" for k, x in v.items()) + "}"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(cfg: Config) -> str:
    """Render a config as TOML."""
    lines: list[str] = []
    for name in SECTIONS:
        lines.append(f"[{name}]")
        lines += [f"{k} = {_fmt(v)}" for k, v in fields_of(getattr(cfg, name)).items()]
        lines.append("")
    for t in cfg.tiers:
        lines += ["[[tiers]]", f"name = {_fmt(t.name)}", f"max_model_len = {t.max_model_len}"]
        if t.budget_limit is not None:
            lines.append(f"budget_limit = {t.budget_limit}")
        lines += [f"endpoints = {_fmt(t.endpoints)}", ""]
    return "\n".join(lines)

"""Router configuration: one TOML file plus ``BUDGET_ROUTER_*`` environment
variables (precedence: defaults < file < environment).

``schema`` the frozen dataclasses (the tiers in one form, ``[[tiers]]``),
``parse`` raw values to typed fields and the old ``[pools.*]`` + ``b_short``
shape translated to tiers, ``validation`` ranges and cross-key checks,
``loader`` the file and the environment, ``render`` back to TOML,
``endpoints`` ``host:port`` checks, ``errors`` ``ConfigError``.

The shell imports the names below from here (``from extproc import config as
C``; ``C.load``, ``C.Config``...). The pure core imports ``extproc.config.schema``
only. Importing this package runs only pure modules: the loader's names
(``load``, ``load_config``, ``from_mapping``, ``read_bounded``, ...) are
looked up on first use (PEP 562), so the core, which runs this file as the
schema's parent, never loads ``tomllib`` or reads a file.

May import: ``extproc.defaults`` and the standard library (the file and the
environment in ``loader`` only). Must not import any other layer of ``extproc``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .endpoints import split_endpoint
from .errors import ConfigError
from .render import to_toml
from .schema import (SECTIONS, AdaptiveConfig, AdminConfig, Config, EnvoyConfig, EstimatorConfig, MediaConfig,
                     MonitorConfig, PolicyConfig, PoolConfig, RouterConfig, SpilloverConfig, TelemetryConfig,
                     admin_ports, worker_ports)
from .validation import MEDIA_MODEL_KEYS, validate

#: Names of ``loader`` re-exported here on first use (it reads files and the environment).
_LOADER_NAMES = ("ENV_PREFIX", "MAX_CONFIG_BYTES", "NON_CONFIG_ENV", "from_mapping", "load", "load_config",
                 "read_bounded")

__all__ = ["SECTIONS", "AdaptiveConfig", "AdminConfig", "Config", "ConfigError", "EnvoyConfig", "EstimatorConfig",
           "MEDIA_MODEL_KEYS", "MediaConfig", "MonitorConfig", "PolicyConfig", "PoolConfig", "RouterConfig",
           "SpilloverConfig", "TelemetryConfig", "admin_ports", "split_endpoint", "to_toml", "validate",
           "worker_ports", *_LOADER_NAMES]


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        return getattr(importlib.import_module(".loader", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LOADER_NAMES))

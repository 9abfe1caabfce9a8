"""The one error the configuration raises (the bottom of ``extproc.config``:
every other module of the package may raise it, and it imports nothing)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent."""

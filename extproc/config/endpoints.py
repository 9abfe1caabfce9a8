"""``host:port`` endpoints: how the config checks one and how the shell splits
one it checked (pure: no resolving here; ``extproc.dns`` resolves names)."""

from __future__ import annotations

from .errors import ConfigError


def split_endpoint(ep: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port); ``ep`` is one the
    config validated (``check_endpoint``)."""
    host, _, port = ep.rpartition(":")
    return host.strip("[]"), int(port)


def check_endpoint(where: str, ep: str) -> None:
    """ConfigError naming ``where`` unless ``ep`` is ``host:port`` with a port in 1-65535."""
    host, sep, port = ep.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{where}: endpoint {ep!r} is not host:port with a port in 1-65535")

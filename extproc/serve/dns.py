"""Endpoints that are DNS names: every address a ``host:port`` resolves to
now (a Kubernetes headless Service resolves to one address per ready pod).
Used by the pool monitor (each scrape) and the admin plane's warm start."""

from __future__ import annotations

import asyncio
import socket

from ..config import split_endpoint


async def addresses(endpoint: str) -> list[tuple[str, int]]:
    """Every IPv4/IPv6 (ip, port) of ``endpoint``, deduplicated, in resolver
    order. Raises ``socket.gaierror`` (an ``OSError``) or ``UnicodeError``
    when the name cannot be resolved; ``ValueError`` for a bad port."""
    host, port = split_endpoint(endpoint)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[tuple[str, int], None] = {}
    for family, _, _, _, addr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            seen[(addr[0], port)] = None
    return list(seen)

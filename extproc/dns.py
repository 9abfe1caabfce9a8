"""Endpoints that are DNS names: every address a ``host:port`` resolves to
now (a Kubernetes headless Service resolves to one address per ready pod).
Used by the pool monitor (``extproc.serve.monitor``, each scrape) and the
admin plane's warm start (``extproc.admin.warm``).

It sits below both, beside ``extproc.tls``: ``serve`` starts ``admin``'s
plane, so a resolver inside ``serve`` made ``admin -> serve -> admin`` a
folder circle. May import: ``extproc.config`` and ``defaults``, asyncio,
sockets. Must not import ``core`` or any layer above it
(``tests/test_architecture.py``)."""

from __future__ import annotations

import asyncio
import socket

from .config.endpoints import split_endpoint


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

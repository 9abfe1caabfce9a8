"""The event loop the router runs on.

uvloop (libuv, Cython) when it is installed: the router's transport is one
asyncio.Protocol per connection, so per request it pays the loop's own cost
of an epoll round, a read callback and a write; uvloop's are C calls where
the standard loop's selector_events run Python (issue 19 profile, see
docs/bench.md "Where the router's CPU goes"). Without uvloop the standard
loop runs the same code: nothing else depends on it. BUDGET_ROUTER_LOOP=asyncio
forces the standard loop (to compare, or to rule uvloop out of a bug).
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

#: Environment/CLI choice: "auto" (uvloop if importable), "asyncio", "uvloop".
LOOP_CHOICES = ("auto", "asyncio", "uvloop")

#: Environment variable that overrides the choice (not a config key: it is
#: read before the worker's config is in use; config/loader.NON_CONFIG_ENV).
LOOP_ENV = "BUDGET_ROUTER_LOOP"

#: "auto" on a TLS ext_proc port means the standard loop: the fast transport
#: runs the handshake itself with loop.start_tls on the accepted connection
#: (issue 17: pending handshakes are charged and bounded), and under uvloop
#: 0.23 that handshake never completed with Envoy as the client (measured:
#: "no handshake within 10.0 s" for every connection, the stack never became
#: healthy; asyncio's start_tls completes it). Plain h2c keeps uvloop.
TLS_AUTO_LOOP = "asyncio"


def choose(tls: bool, env: dict | None = None) -> str:
    """The loop a worker runs: the LOOP_ENV override, else "auto", which
    means TLS_AUTO_LOOP when the ext_proc port speaks TLS."""
    import os
    choice = (os.environ if env is None else env).get(LOOP_ENV, "auto")
    return TLS_AUTO_LOOP if choice == "auto" and tls else choice


def loop_factory(choice: str = "auto"):
    """A loop factory for asyncio.Runner, or None for the standard loop."""
    if choice not in LOOP_CHOICES:
        raise ValueError(f"event loop {choice!r}: one of {', '.join(LOOP_CHOICES)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, Any], choice: str = "auto") -> Any:
    """asyncio.run(main) on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)

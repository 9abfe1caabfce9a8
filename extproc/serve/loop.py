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
import os
from typing import Any, Coroutine

#: Environment/CLI choice: "auto" (uvloop if importable), "asyncio", "uvloop".
LOOP_CHOICES = ("auto", "asyncio", "uvloop")

#: Environment variable that overrides the choice (not a config key: it is
#: read before the worker's config is in use; config/loader.NON_CONFIG_ENV).
LOOP_ENV = "BUDGET_ROUTER_LOOP"

def choose(env: dict | None = None) -> str:
    """The loop a worker runs: the LOOP_ENV override, else "auto". TLS ports
    included: h2c.py replays a ClientHello read before start_tls took the
    socket over (uvloop 0.23 ignores pause_reading() in connection_made)."""
    return (os.environ if env is None else env).get(LOOP_ENV, "auto")


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

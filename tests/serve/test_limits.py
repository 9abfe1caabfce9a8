"""extproc.serve.limits: the one home of the HTTP/2 limits, each documented."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

from extproc.serve import h2c, h2frames, limits as L

SERVE = Path(L.__file__).parent


def test_every_limit_is_a_named_constant_with_its_reason():
    """Each UPPER_CASE constant of limits.py has a ``#:`` comment of its own
    (or shares the one just above it, like a burst and its rate)."""
    lines = Path(L.__file__).read_text(encoding="utf-8").splitlines()
    names = [(i, m.group(1)) for i, line in enumerate(lines) if (m := re.match(r"([A-Z][A-Z0-9_]+) = ", line))]
    assert len(names) >= 25
    for i, name in names:
        j = i - 1
        while j >= 0 and re.match(r"[A-Z][A-Z0-9_]+ = ", lines[j]):
            j -= 1  # a group: BURST then RATE under one comment
        comment = []
        while j >= 0 and lines[j].startswith("#:"):
            comment.append(lines[j])
            j -= 1
        assert len(" ".join(comment)) > 60, f"{name}: no reason given in a #: comment above it"


def test_no_other_serve_module_defines_a_limit():
    """h2frames and the gRPC servers import their limits; none defines its own.
    (monitor.py's limits are the metrics scraper's, not HTTP/2's.)"""
    pattern = re.compile(r"^(H2_|LOCAL_|MAX_|HEADER_CACHE|RECENT_RESETS|WINDOW_UPDATE|DRAIN_PING_TIMEOUT|LOG_PERIOD"
                         r"|MIN_TIMER)[A-Z0-9_]* = ", re.M)
    for name in ("h2frames.py", "h2c.py", "grpc_aio.py", "rpc.py", "transport.py"):
        path = SERVE / name
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = [t.id for node in tree.body if isinstance(node, ast.Assign)
                   for t in node.targets if isinstance(t, ast.Name)]
        bad = [n for n in defined if pattern.match(n + " = ")]
        if path.name == "h2frames.py":  # protocol constants (RFC 9113 defaults), not our limits
            bad = [n for n in bad if n not in ("MAX_WINDOW", "MAX_FRAME_SIZE_LIMIT")]
        assert bad == [], f"{path.name} defines limits of its own: {bad}"
    assert h2frames.LOCAL_MAX_FRAME_SIZE is L.LOCAL_MAX_FRAME_SIZE


def test_server_limits_default_to_the_constants_and_override_by_name():
    d = L.ServerLimits()
    assert (d.preface_timeout_s, d.idle_timeout_s, d.memory_budget_bytes, d.write_buffer_high_water,
            d.stream_cost_bytes) == (L.H2_PREFACE_TIMEOUT_S, L.H2_IDLE_TIMEOUT_S, L.H2_MEMORY_BUDGET_BYTES,
                                     L.H2_WRITE_BUFFER_HIGH_WATER, L.H2_STREAM_COST_BYTES)
    assert 1 <= d.connections() <= L.H2_MAX_CONNECTIONS
    assert L.ServerLimits(max_connections=3).connections() == 3
    # serve_fast's keyword overrides are exactly ServerLimits' fields
    fields = {f.name for f in dataclasses.fields(L.ServerLimits)}
    doc = inspect.getdoc(h2c.serve_fast) or ""
    assert all(name in doc for name in fields), doc

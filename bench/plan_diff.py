"""Diff two plan.json files, ignoring the wall-time fields (a refactor of the
planner must leave everything else byte-identical).

    .venv/bin/python bench/plan_diff.py [--early-exit] BEFORE/plan.json AFTER/plan.json

Prints each differing path with both values (at most MAX_SHOWN) and exits 1
when they differ, 0 when they are identical but the wall fields. The
comparison is exact: the files are parsed and re-serialized with sorted keys
after the wall fields are removed, so equal means byte-identical but those.

``--early-exit``: the sizing search ends a run that surely misses early
(`planner.sim.stop`); such a count's `tried` entry carries ``early_exit`` and
partial (lower-bound) figures. With this flag those entries are compared on
their verdict only (EARLY_EXIT_KEYS: count, seeds, ok, per-seed ok); every
other field of the plan is still compared exactly. Without it they differ.
"""
from __future__ import annotations

import sys

import orjson

#: Keys whose values are wall-clock measurements of the planner's own run
#: (metrics.summarize: simulator seconds and requests simulated per second).
WALL_KEYS = frozenset({"sim_wall_s", "sim_req_per_s", "wall_s", "plan_wall_s"})

#: What a `tried` entry with ``early_exit`` is compared on under --early-exit:
#: the search's decision at that count, not its (partial) figures.
EARLY_EXIT_KEYS = ("count", "seeds", "ok", "seed_ok")

#: Differences printed before the count of the rest.
MAX_SHOWN = 40


def strip(x):
    """x without any WALL_KEYS entry, at any depth."""
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k not in WALL_KEYS}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def verdict_only(a: dict, b: dict) -> tuple[dict, dict] | None:
    """(a, b) cut to EARLY_EXIT_KEYS when either is an early-exited `tried` entry."""
    if "early_exit" in a or "early_exit" in b:
        return ({k: a.get(k) for k in EARLY_EXIT_KEYS}, {k: b.get(k) for k in EARLY_EXIT_KEYS})
    return None


def diff(a, b, path: str = "", early_exit: bool = False) -> list[str]:
    """Paths where a and b differ (keys, order of keys, lengths, values)."""
    if early_exit and isinstance(a, dict) and isinstance(b, dict):
        cut = verdict_only(a, b)
        if cut is not None:
            a, b = cut
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{path or '/'}: keys {list(a)} != {list(b)}"]
        return [d for k in a for d in diff(a[k], b[k], f"{path}/{k}", early_exit)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for k, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}/{k}", early_exit)]
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} != {b!r}"]


def main(argv: list[str]) -> int:
    early_exit = "--early-exit" in argv
    argv = [x for x in argv if x != "--early-exit"]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = (strip(orjson.loads(open(p, "rb").read())) for p in argv)
    out = diff(a, b, early_exit=early_exit)
    same_bytes = not out if early_exit else orjson.dumps(a) == orjson.dumps(b)
    for line in out[:MAX_SHOWN]:
        print(line)
    if len(out) > MAX_SHOWN:
        print(f"... and {len(out) - MAX_SHOWN} more")
    but = "the wall fields" + (" and early-exited counts' figures" if early_exit else "")
    print(f"{argv[0]} vs {argv[1]}: " + (f"identical but {but}" if not out and same_bytes
                                         else f"{len(out)} difference(s)"))
    return 0 if not out and same_bytes else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Calibration state on disk: atomic writes, tolerant reads.

A snapshot is the router's ``snapshot()`` dict as JSON. Writes go to a
temporary file in the same directory, are fsync'ed, then renamed over the
old file (rename is atomic on POSIX), so a crash mid-write leaves the
previous snapshot intact, as SQLite and etcd do for their state files.

With several worker processes each writes its own file (``state.json``,
``state.json.w1``, ...); at start every worker loads the one that has learned
from the most samples.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from typing import Any

import orjson

log = logging.getLogger(__name__)


def worker_path(base: str, worker: int) -> str:
    return base if worker == 0 else f"{base}.w{worker}"


def save(path: str, state: dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(state, option=orjson.OPT_SERIALIZE_NUMPY))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _samples(state: dict[str, Any]) -> int:
    try:
        return int(state["estimator"]["root"]["samples"])
    except (KeyError, TypeError, ValueError):
        return -1


def load_best(base: str) -> tuple[dict[str, Any] | None, str | None]:
    """The snapshot with the most samples among ``base`` and its worker files;
    unreadable files are skipped with a warning, never fatal."""
    best: tuple[int, dict[str, Any], str] | None = None
    for path in [base] + sorted(glob.glob(glob.escape(base) + ".w*")):
        try:
            with open(path, "rb") as f:
                state = orjson.loads(f.read())
        except FileNotFoundError:
            continue
        except (OSError, orjson.JSONDecodeError) as e:
            log.warning("ignoring unreadable calibration snapshot %s: %s", path, e)
            continue
        n = _samples(state)
        if n >= 0 and (best is None or n > best[0]):
            best = (n, state, path)
    return (best[1], best[2]) if best else (None, None)

"""Calibration state on disk: atomic writes, tolerant reads.

A snapshot is the router's ``snapshot()`` dict as JSON. Writes go to a
temporary file in the same directory, are fsync'ed, then renamed over the
old file (rename is atomic on POSIX), so a crash mid-write leaves the
previous snapshot intact, as SQLite and etcd do for their state files.

With several worker processes each writes its own file (``state.json``,
``state.json.w1``, ...); at start every worker loads the one that has learned
from the most samples.

A crash (kill -9) between creating the temporary file and the rename leaves
the temporary behind. Each worker's temporaries carry its own file's name
(``.state.json.w1.tmp-XXXX``), so at start a worker removes its own leftovers
(no other process writes them: one worker index, one file) and never another
worker's file that is being written right now.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
import tempfile
import time
from typing import Any

import orjson

from ..core.estimator import MIN_SNAPSHOT_BOUND_BYTES

log = logging.getLogger(__name__)


def worker_path(base: str, worker: int) -> str:
    return base if worker == 0 else f"{base}.w{worker}"


#: Prefix of the temporary files of releases before 0.2 (one prefix for every
#: worker): removed at start only once older than LEGACY_TEMP_AGE_S, far longer
#: than any write takes, so a write in progress is never touched.
LEGACY_TEMP_PREFIX = ".state-"
LEGACY_TEMP_AGE_S = 600.0


def temp_prefix(path: str) -> str:
    return "." + os.path.basename(path) + ".tmp-"


def remove_stale_temps(path: str) -> int:
    """Remove temporaries that a crash left next to ``path`` (this worker's
    own, and legacy ones old enough to be dead): regular files we own only,
    never following links. Returns how many were removed."""
    directory = os.path.dirname(os.path.abspath(path))
    mine = temp_prefix(path)
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    now = time.time()
    for name in names:
        legacy = name.startswith(LEGACY_TEMP_PREFIX)
        if not (name.startswith(mine) or legacy):
            continue
        full = os.path.join(directory, name)
        try:
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            if legacy and now - st.st_mtime < LEGACY_TEMP_AGE_S:
                continue
            os.unlink(full)
            removed += 1
        except OSError:
            continue
    if removed:
        log.info("removed %d temporary snapshot file(s) left by a crash next to %s", removed, path)
    return removed


def atomic_write(path: str, data: bytes, prefix: str, durable: bool = True) -> None:
    """Write ``data`` to ``path`` all or nothing: a temporary file named
    ``prefix...`` beside it, then a rename; ``durable`` fsyncs before the
    rename (a crash then leaves the old file or the new one, never a torn one).
    The temporary is removed on any failure."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save(path: str, state: dict[str, Any]) -> None:
    atomic_write(path, orjson.dumps(state, option=orjson.OPT_SERIALIZE_NUMPY), temp_prefix(path))


def _samples(state: dict[str, Any]) -> int:
    try:
        return int(state["estimator"]["root"]["samples"])
    except (KeyError, TypeError, ValueError):
        return -1


def load_best(base: str, limit: int = MIN_SNAPSHOT_BOUND_BYTES) -> tuple[dict[str, Any] | None, str | None]:
    """The snapshot with the most samples among ``base`` and its worker files;
    unreadable files and files over ``limit`` bytes (more than any table of
    this config writes: ``estimator.snapshot_bound_bytes``) are skipped with a
    warning, never fatal."""
    best: tuple[int, dict[str, Any], str] | None = None
    for path in [base] + sorted(glob.glob(glob.escape(base) + ".w*")):
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                log.warning("ignoring calibration snapshot %s: larger than %d bytes", path, limit)
                continue
            state = orjson.loads(data)
        except FileNotFoundError:
            continue
        except (OSError, orjson.JSONDecodeError) as e:
            log.warning("ignoring unreadable calibration snapshot %s: %s", path, e)
            continue
        if not isinstance(state, dict):
            log.warning("ignoring calibration snapshot %s: not a JSON object", path)
            continue
        n = _samples(state)
        if n >= 0 and (best is None or n > best[0]):
            best = (n, state, path)
    return (best[1], best[2]) if best else (None, None)

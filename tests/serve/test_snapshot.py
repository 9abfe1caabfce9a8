"""Calibration snapshots on disk: atomic save, load_best."""

from __future__ import annotations

import os

import numpy as np
import orjson
import pytest

from extproc.serve import snapshot as S
from extproc.config import Config
from extproc.core.router import Router


def state(samples: int, tag: str = "") -> dict:
    return {"estimator": {"root": {"samples": samples}}, "tag": tag}


def test_worker_path():
    assert S.worker_path("/x/state.json", 0) == "/x/state.json"
    assert S.worker_path("/x/state.json", 3) == "/x/state.json.w3"


def test_save_round_trip_and_creates_directory(tmp_path):
    p = tmp_path / "deep" / "dir" / "state.json"
    S.save(str(p), {"a": [1, 2.5], "n": np.array([1.0, 2.0]), "s": "é"})
    assert orjson.loads(p.read_bytes()) == {"a": [1, 2.5], "n": [1.0, 2.0], "s": "é"}
    assert os.listdir(p.parent) == ["state.json"]  # no temporary left behind


def test_save_failure_while_writing_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "state.json"
    S.save(str(p), state(5, "old"))
    old = p.read_bytes()
    with pytest.raises(TypeError):
        S.save(str(p), {"bad": object()})  # not serialisable
    assert p.read_bytes() == old
    assert os.listdir(tmp_path) == ["state.json"]


def test_save_failure_at_rename_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "state.json"
    S.save(str(p), state(5, "old"))
    old = p.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(S.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        S.save(str(p), state(9, "new"))
    assert p.read_bytes() == old
    assert os.listdir(tmp_path) == ["state.json"]


def test_save_failure_without_old_file_leaves_nothing(tmp_path, monkeypatch):
    p = tmp_path / "state.json"
    monkeypatch.setattr(S.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("io error")))
    with pytest.raises(OSError):
        S.save(str(p), state(1))
    assert os.listdir(tmp_path) == []


def test_load_best_picks_most_samples_and_skips_corrupt(tmp_path):
    base = str(tmp_path / "state.json")
    S.save(S.worker_path(base, 0), state(10, "w0"))
    S.save(S.worker_path(base, 1), state(30, "w1"))
    S.save(S.worker_path(base, 2), state(20, "w2"))
    with open(S.worker_path(base, 3), "wb") as f:
        f.write(b'{"estimator": {"root": {"samples": 99')  # truncated: corrupt
    with open(S.worker_path(base, 4), "wb") as f:
        f.write(orjson.dumps({"estimator": {"root": {"samples": "many"}}}))  # no usable count
    with open(S.worker_path(base, 5), "wb") as f:
        f.write(orjson.dumps([1, 2, 3]))  # not even an object
    st, path = S.load_best(base)
    assert st == state(30, "w1") and path == S.worker_path(base, 1)


def test_load_best_without_base_file(tmp_path):
    base = str(tmp_path / "state.json")
    S.save(S.worker_path(base, 2), state(3, "w2"))
    assert S.load_best(base) == (state(3, "w2"), S.worker_path(base, 2))


def test_load_best_nothing(tmp_path):
    base = str(tmp_path / "state.json")
    assert S.load_best(base) == (None, None)
    with open(base, "wb") as f:
        f.write(b"garbage")
    assert S.load_best(base) == (None, None)


def test_load_best_tie_prefers_base_and_zero_samples_count(tmp_path):
    base = str(tmp_path / "state.json")
    S.save(base, state(0, "w0"))
    S.save(S.worker_path(base, 1), state(0, "w1"))
    assert S.load_best(base) == (state(0, "w0"), base)


def test_load_best_glob_special_characters(tmp_path):
    d = tmp_path / "we[ir]d*dir"
    base = str(d / "state.json")
    S.save(S.worker_path(base, 1), state(7, "w1"))
    assert S.load_best(base) == (state(7, "w1"), S.worker_path(base, 1))


def test_unreadable_path_is_skipped(tmp_path):
    base = str(tmp_path / "state.json")
    os.mkdir(base)  # a directory where the file should be: IsADirectoryError (an OSError)
    S.save(S.worker_path(base, 1), state(4, "w1"))
    assert S.load_best(base) == (state(4, "w1"), S.worker_path(base, 1))


def test_router_state_survives_save_and_load(tmp_path):
    r = Router(Config())
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello world " * 300}]})
    for _ in range(40):
        r.learn(r.route("/v1/chat/completions", body), 1234, 56)
    base = str(tmp_path / "state.json")
    S.save(base, r.snapshot())
    st, _ = S.load_best(base)
    r2 = Router(Config())
    r2.restore(st)
    a, b = r.route("/v1/chat/completions", body), r2.route("/v1/chat/completions", body)
    assert (a.estimate, a.output, a.margin, a.samples, a.pool) == (b.estimate, b.output, b.margin, b.samples, b.pool)
    assert a.estimate == pytest.approx(1234, rel=0.02)


def test_load_best_skips_files_over_the_bound(tmp_path):
    """A state file bigger than any table of the config writes (the old
    134 MB file of 1 MiB model names) is not read into memory."""
    base = str(tmp_path / "state.json")
    S.save(base, state(12345, "w0-with-a-longer-tag"))
    S.save(S.worker_path(base, 1), state(2, "w1"))
    size = os.path.getsize(base)
    assert S.load_best(base, limit=size - 1) == (state(2, "w1"), S.worker_path(base, 1))
    assert S.load_best(base, limit=size) == (state(12345, "w0-with-a-longer-tag"), base)

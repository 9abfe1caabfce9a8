"""Content-Encoding of request bodies: decoded within the body limit, bombs
refused after at most limit + 1 bytes of output, unknown codings refused."""

from __future__ import annotations

import gzip
import json
import time
import tracemalloc
import zlib

import pytest

from extproc.core import content_coding as CC

LIMIT = 1024 * 1024


def test_parse_codings():
    assert CC.parse_codings("gzip") == ("gzip",)
    assert CC.parse_codings(" GZIP , identity") == ("gzip",)
    assert CC.parse_codings("x-gzip") == ("x-gzip",)
    assert CC.parse_codings("deflate, gzip") == ("deflate", "gzip")
    assert CC.parse_codings("identity") == ()
    assert CC.parse_codings("br") == CC.Unsupported("br")
    assert CC.parse_codings("gzip, zstd") == CC.Unsupported("zstd")
    assert isinstance(CC.parse_codings("gzip, gzip, gzip"), CC.Unsupported)


def test_round_trips():
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi " * 1000}]}).encode()
    assert CC.decode(gzip.compress(body), ("gzip",), LIMIT) == body
    assert CC.decode(zlib.compress(body), ("deflate",), LIMIT) == body
    raw = zlib.compressobj(wbits=-15)
    assert CC.decode(raw.compress(body) + raw.flush(), ("deflate",), LIMIT) == body  # raw DEFLATE
    assert CC.decode(gzip.compress(gzip.compress(body)), ("gzip", "gzip"), LIMIT) == body
    assert CC.decode(gzip.compress(zlib.compress(body)), ("deflate", "gzip"), LIMIT) == body
    two_members = gzip.compress(body[:100]) + gzip.compress(body[100:])
    assert CC.decode(two_members, ("gzip",), LIMIT) == body
    exact = b"x" * LIMIT
    assert CC.decode(gzip.compress(exact), ("gzip",), LIMIT) == exact


def test_corrupt_and_truncated():
    body = gzip.compress(b"hello world" * 100)
    assert isinstance(CC.decode(body[:-12], ("gzip",), LIMIT), CC.Corrupt)
    assert isinstance(CC.decode(b"not compressed", ("gzip",), LIMIT), CC.Corrupt)
    assert isinstance(CC.decode(b"not compressed", ("deflate",), LIMIT), CC.Corrupt)
    assert isinstance(CC.decode(body + b"trailing junk", ("gzip",), LIMIT), CC.Corrupt)


def _compress(data_chunks, coding: str) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31 if coding == "gzip" else 15)
    return b"".join(c.compress(chunk) for chunk in data_chunks) + c.flush()


@pytest.mark.parametrize("layers", [("gzip",), ("deflate",), ("gzip", "gzip")])
def test_bomb_is_refused_with_bounded_memory_and_time(layers):
    """A body of a few hundred KB that expands to 64 MiB (the issue's 30 KB ->
    20 MB, far worse): refused after at most limit + 1 bytes of output."""
    zeros = b"\x00" * (1024 * 1024)
    bomb = _compress((zeros for _ in range(64)), layers[0])
    for coding in layers[1:]:
        bomb = _compress([bomb], coding)
    assert len(bomb) < 1024 * 1024
    tracemalloc.start()
    t0 = time.process_time()
    res = CC.decode(bomb, layers, LIMIT)
    cpu = time.process_time() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert isinstance(res, CC.TooLarge)
    assert peak < 4 * LIMIT + len(bomb), peak      # never the 64 MiB
    assert cpu < 1.0, cpu                           # inflating ~1 MiB, not 64

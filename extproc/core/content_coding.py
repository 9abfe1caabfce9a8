"""Request bodies sent with ``Content-Encoding``: decoded within the body limit.

Pure (zlib is computation, not I/O). HTTP allows a client to compress its
request body (RFC 9110 8.4); a router that estimated the compressed bytes
would see a 30 KB body where the model reads 20 MB. Decoding is bounded: zlib
stops producing output at ``limit + 1`` bytes, so a decompression bomb costs
at most the body limit in memory and the CPU to inflate that much, and is
answered 413 like any body over the limit.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

#: Codings we decode (RFC 9110 8.4.1; ``x-gzip`` is gzip's registered alias).
#: ``deflate`` is the zlib format (RFC 1950) by the RFC; raw DEFLATE, which some
#: clients send under that name, is accepted too. Brotli (``br``) and zstd
#: need decoders that are not dependencies: refused with 415.
GZIP = ("gzip", "x-gzip")
DEFLATE = ("deflate",)
#: The coding of a body sent as it is (RFC 9110 8.4.1).
IDENTITY_CODING = "identity"
IDENTITY = ("", IDENTITY_CODING)
SUPPORTED = GZIP + DEFLATE

#: Codings stacked on one body (``Content-Encoding: gzip, gzip``): each layer
#: is another pass; two is already unusual, more is only ever an attack.
MAX_LAYERS = 2


@dataclass(frozen=True, slots=True)
class Unsupported:
    coding: str


@dataclass(frozen=True, slots=True)
class TooLarge:
    """The decoded body passed ``limit`` bytes (size unknown beyond that)."""


@dataclass(frozen=True, slots=True)
class Corrupt:
    why: str


def parse_codings(header: str) -> tuple[str, ...] | Unsupported:
    """The codings of a Content-Encoding value, in the order they were applied;
    identity layers dropped; the first one we cannot decode as Unsupported."""
    codings = tuple(c for c in (part.strip().lower() for part in header.split(",")) if c not in IDENTITY)
    for c in codings:
        if c not in SUPPORTED:
            return Unsupported(c)
    if len(codings) > MAX_LAYERS:
        return Unsupported(", ".join(codings))
    return codings


def _inflate(data: bytes, wbits: int, limit: int) -> bytes | TooLarge | Corrupt:
    out: list[bytes] = []
    size = 0
    while True:  # gzip may have several members (RFC 1952 2.2)
        d = zlib.decompressobj(wbits)
        try:
            chunk = d.decompress(data, limit + 1 - size)
        except zlib.error as e:
            return Corrupt(str(e))
        size += len(chunk)
        out.append(chunk)
        if size > limit:
            return TooLarge()
        if d.unconsumed_tail:  # stopped at the output bound with input left
            return TooLarge()
        if not d.eof:
            return Corrupt("truncated compressed body")
        data = d.unused_data
        if not data or wbits != zlib.MAX_WBITS | 16:
            return b"".join(out)


def decode(body: bytes, codings: tuple[str, ...], limit: int) -> bytes | TooLarge | Corrupt:
    """Undo ``codings`` (last applied first); never more than ``limit`` bytes out."""
    for coding in reversed(codings):
        if coding in GZIP:
            res = _inflate(body, zlib.MAX_WBITS | 16, limit)
        else:
            res = _inflate(body, zlib.MAX_WBITS, limit)
            if isinstance(res, Corrupt):
                res = _inflate(body, -zlib.MAX_WBITS, limit)  # raw DEFLATE under the name "deflate"
        if not isinstance(res, bytes):
            return res
        body = res
    return body

"""Image sizes from file headers, and the prompt tokens a vision model spends on them.

Pure: bytes in, numbers out. Only the header of an image is read (PNG's IHDR,
GIF's logical screen, WebP's VP8/VP8L/VP8X frame header, JPEG's start-of-frame
segment); pixels are never decoded. Anything truncated, malformed or of another
format gives ``None``, never an exception: the caller then uses a configured
conservative estimate.

A vision encoder cuts an image into patches after resizing it; each patch (or
each merged group of patches) becomes one prompt token. ``ImageRule`` is that
rule: Qwen2-VL / Qwen2.5-VL (vLLM's most served VLMs) use 14 px patches merged
2x2, i.e. one token per 28 x 28 px, with 4 to 16384 tokens per image (their
processor's ``min_pixels`` 56*56 and ``max_pixels`` 28*28*16384), plus the
``<|vision_start|>``/``<|vision_end|>`` tokens.
"""

from __future__ import annotations

import binascii
import math
import struct
from dataclasses import dataclass

#: Bytes of an image's payload decoded to find its size. PNG, GIF and WebP need
#: their first 30 bytes; a JPEG's start-of-frame follows its APPn segments
#: (EXIF with a thumbnail: up to 64 KiB; ICC profiles: a few hundred KiB at
#: most), so 512 KiB covers real files while a crafted one costs one bounded
#: base64 decode (~1 ms) before it falls back to the conservative estimate.
HEADER_SCAN_BYTES = 512 * 1024

#: JPEG segments walked before giving up: real files have 5-20 before their
#: start-of-frame; the bound keeps a crafted stream of tiny segments cheap.
MAX_JPEG_SEGMENTS = 1024

_PNG_SIG = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True, slots=True)
class ImageRule:
    """Prompt tokens of one image: one per ``patch_px`` x ``patch_px`` square
    (after scaling down to at most ``max_tokens``), at least ``min_tokens``,
    plus ``overhead_tokens`` of markers around it."""

    patch_px: int = 28
    min_tokens: int = 4
    max_tokens: int = 16384
    overhead_tokens: int = 2

    def tokens(self, width: int, height: int) -> int:
        p = self.patch_px
        n = math.ceil(width / p) * math.ceil(height / p)
        if n > self.max_tokens:
            # Resize keeping the aspect ratio until it fits, as the processors do.
            s = math.sqrt(self.max_tokens / n)
            n = max(1, math.floor(width * s / p)) * max(1, math.floor(height * s / p))
            n = min(n, self.max_tokens)
        return max(n, self.min_tokens) + self.overhead_tokens


def _png(b: bytes) -> tuple[int, int] | None:
    if len(b) >= 24 and b[:8] == _PNG_SIG and b[12:16] == b"IHDR":
        return struct.unpack(">II", b[16:24])
    return None


def _gif(b: bytes) -> tuple[int, int] | None:
    if len(b) >= 10 and b[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", b[6:10])
    return None


def _webp(b: bytes) -> tuple[int, int] | None:
    if len(b) < 30 or b[:4] != b"RIFF" or b[8:12] != b"WEBP":
        return None
    chunk = b[12:16]
    if chunk == b"VP8 " and b[23:26] == b"\x9d\x01\x2a":      # lossy: key frame start code
        w, h = struct.unpack("<HH", b[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and b[20] == 0x2F:                   # lossless: 14-bit sizes - 1
        bits = int.from_bytes(b[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":                                      # extended: 24-bit canvas sizes - 1
        return int.from_bytes(b[24:27], "little") + 1, int.from_bytes(b[27:30], "little") + 1
    return None


def _jpeg(b: bytes) -> tuple[int, int] | None:
    if b[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(b)
    for _ in range(MAX_JPEG_SEGMENTS):
        if i >= n or b[i] != 0xFF:         # every segment starts with a marker
            return None
        while i < n and b[i] == 0xFF:      # (fill bytes before it are allowed)
            i += 1
        if i >= n:
            return None
        marker = b[i]
        i += 1
        if marker == 0xD8 or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue                       # standalone markers: no length
        if marker == 0xD9 or i + 2 > n:    # end of image, or truncated
            return None
        length = (b[i] << 8) | b[i + 1]
        if length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):   # SOFn
            if i + 7 > n:
                return None
            h, w = struct.unpack(">HH", b[i + 3:i + 7])
            return w, h
        i += length
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, JPEG, WebP or GIF from its header; None when
    the bytes are none of these, are truncated or claim a zero size."""
    for parse in (_png, _jpeg, _webp, _gif):
        size = parse(data)
        if size is not None:
            return size if size[0] > 0 and size[1] > 0 else None
    return None


def data_url_head(url: str, limit: int = HEADER_SCAN_BYTES) -> bytes | None:
    """The first ``limit`` decoded bytes of a base64 ``data:`` URL, else None."""
    if not url.startswith("data:"):
        return None
    meta, sep, payload = url.partition(",")
    if not sep or not meta.endswith(";base64"):
        return None
    chunk = payload[: (limit // 3 + 1) * 4]
    for trim in range(4):  # whitespace inside may leave a partial last quad
        try:
            return binascii.a2b_base64(chunk[: len(chunk) - trim] if trim else chunk)[:limit]
        except binascii.Error:
            continue
    return None


def b64_size(text: str) -> int:
    """Decoded size of base64 ``text`` (without decoding it)."""
    return len(text) * 3 // 4 - text[-2:].count("=")


def data_url_bytes(url: str) -> int:
    """Decoded size of a base64 ``data:`` URL's payload (0 when it is not one)."""
    meta, sep, payload = url.partition(",")
    if not url.startswith("data:") or not sep or not meta.endswith(";base64"):
        return 0
    return b64_size(payload)

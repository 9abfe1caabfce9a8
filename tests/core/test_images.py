"""Image sizes from PNG/JPEG/WebP/GIF headers (real encoder output and crafted
bytes), the vision token rule, and media estimates of content parts."""

from __future__ import annotations

import base64
import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config import Config
from extproc.core import images as I
from extproc.core import media as M

# Pillow (a dependency of matplotlib, which the project requires) writes the
# real images the parser reads.
from PIL import Image as PIL  # noqa: E402


def encode(fmt: str, w: int, h: int, **kw) -> bytes:
    buf = io.BytesIO()
    PIL.new("RGB", (w, h), (200, 30, 30)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}),
                                    ("GIF", {}), ("WEBP", {}), ("WEBP", {"lossless": True})])
@pytest.mark.parametrize("w,h", [(1, 1), (28, 28), (1000, 750), (4000, 3)])
def test_real_images_sized_from_header(fmt, kw, w, h):
    assert I.image_size(encode(fmt, w, h, **kw)) == (w, h)


def test_jpeg_with_big_exif_and_icc_before_the_frame():
    raw = encode("JPEG", 640, 480)
    app = lambda n, body: b"\xff" + bytes([n]) + struct.pack(">H", len(body) + 2) + body  # noqa: E731
    big = raw[:2] + app(0xE1, b"Exif\x00\x00" + b"\x00" * 60_000) + app(0xE2, b"ICC" * 20_000) + raw[2:]
    assert I.image_size(big) == (640, 480)
    assert I.image_size(I.data_url_head(data_url(big, "image/jpeg"))) == (640, 480)


def test_webp_extended_canvas():
    vp8x = b"RIFF" + struct.pack("<I", 22) + b"WEBPVP8X" + struct.pack("<I", 10) + b"\x00" * 4 \
        + (3999).to_bytes(3, "little") + (2999).to_bytes(3, "little")
    assert I.image_size(vp8x) == (4000, 3000)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated_headers_give_none(fmt):
    raw = encode(fmt, 300, 200)
    needed = {"PNG": 24, "GIF": 10, "WEBP": 30}.get(fmt)
    cuts = range(0, needed) if needed else range(0, raw.index(b"\xff\xc0") + 9)
    for n in cuts:
        assert I.image_size(raw[:n]) is None, (fmt, n)


def test_malicious_headers():
    assert I.image_size(b"") is None
    assert I.image_size(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + b"\x00" * 8) is None  # 0 x 0
    assert I.image_size(b"GIF89a\x00\x00\x10\x00") is None                                   # width 0
    # A JPEG whose segments never reach a frame: a length of 0, a loop of tiny segments, a bare EOI.
    assert I.image_size(b"\xff\xd8\xff\xe0\x00\x00") is None
    assert I.image_size(b"\xff\xd8" + b"\xff\xe0\x00\x02" * 100_000) is None
    assert I.image_size(b"\xff\xd8\xff\xd9") is None
    assert I.image_size(b"\xff\xd8garbage") is None
    # Huge claimed sizes are sizes: the token rule caps them.
    huge = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + struct.pack(">II", 2**31 - 1, 2**31 - 1)
    assert I.image_size(huge) == (2**31 - 1, 2**31 - 1)
    assert I.ImageRule().tokens(2**31 - 1, 2**31 - 1) <= 16384 + 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_never_raise(data):
    for prefix in (b"", b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"GIF89a"):
        size = I.image_size(prefix + data)
        assert size is None or (size[0] > 0 and size[1] > 0)


def test_token_rule_qwen2_vl_like():
    r = I.ImageRule()  # 28 px, 4..16384 tokens, +2 markers
    assert r.tokens(28, 28) == 4 + 2          # the minimum
    assert r.tokens(1000, 750) == 36 * 27 + 2
    assert r.tokens(56 * 28, 28) == 56 + 2
    big = r.tokens(8000, 6000)                 # scaled down to the cap, aspect kept
    assert 0.9 * 16384 < big - 2 <= 16384
    vit = I.ImageRule(patch_px=14, min_tokens=1, max_tokens=576, overhead_tokens=0)
    assert vit.tokens(336, 336) == 576 and vit.tokens(14, 14) == 1


def test_data_url_head_is_bounded_and_lenient():
    raw = encode("PNG", 64, 32)
    url = data_url(raw)
    assert I.data_url_head(url)[:24] == raw[:24]
    assert len(I.data_url_head(data_url(b"\x00" * 3_000_000))) == I.HEADER_SCAN_BYTES
    spaced = "data:image/png;base64," + "\n".join(url.split(",", 1)[1][i:i + 76] for i in range(0, 200, 76))
    assert I.image_size(I.data_url_head(spaced)) == (64, 32)
    assert I.data_url_head("https://example.com/cat.png") is None
    assert I.data_url_head("data:image/png,notbase64") is None
    assert I.data_url_head("data:image/png;base64,@@@") in (None, b"")


def test_media_estimate_kinds_and_flags():
    m = Config().media
    rule = M.image_rule(m, "any-model")
    png = data_url(encode("PNG", 1000, 750))
    parts = [
        {"type": "image_url", "image_url": {"url": png}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"\x00" * 320 * 2000).decode(), "format": "wav"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64," + "A" * 400}},
        {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
        {"type": "image_embeds"},
    ]
    est = M.estimate(parts, rule, m, 4.0)
    assert est.flags == "image:1,image_unsized:2,audio:1,file:1,video:1,other:1"
    assert est.tokens == (36 * 27 + 2) + 2 * m.remote_image_tokens + 2000 + m.file_tokens * 3


def test_per_model_image_rule():
    cfg = Config().replace(media={"models": {"llava": {"image_patch_px": 14, "image_max_tokens": 576}}})
    assert M.image_rule(cfg.media, "llava") == I.ImageRule(14, 4, 576, 2)
    assert M.image_rule(cfg.media, "other") == I.ImageRule()

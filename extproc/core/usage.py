"""Find ``usage`` in vLLM responses: whole JSON bodies and SSE streams.

Pure and incremental: feed body chunks as Envoy streams them, in any split.

* JSON (non-streamed): the body is kept (up to a bound) and parsed once at
  end of stream; vLLM writes ``usage`` after ``choices``.
* SSE (``stream: true``): events are ``data: <json>`` lines ended by a blank
  line; ``\\r\\n`` and ``\\r`` line ends are legal (WHATWG SSE), an event can
  be split anywhere across chunks, and the stream ends with ``data: [DONE]``.
  vLLM sends usage only in the last chunk and only with
  ``stream_options.include_usage``; we keep the last usage seen. Only events
  whose text contains ``"prompt_tokens"`` are JSON-parsed, so scanning a
  stream costs one substring search per event.

Optionally (when the router added ``include_usage`` itself) the usage-only
chunk is cut out of what the client receives: then complete events are
passed on and a partial trailing event waits for its end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from ..defaults import MAX_RESPONSE_SCAN_BYTES

#: Longest SSE line we keep while waiting for its end. A usage chunk is a few
#: hundred bytes; a line longer than this is content, and content lines are
#: only scanned, never kept whole (bounded memory per stream).
MAX_SSE_LINE_BYTES = 1024 * 1024

_USAGE_MARK = b'"prompt_tokens"'


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None
    completion_tokens: int | None


def usage_from_obj(obj: object) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if not isinstance(u, dict):
        return None

    def num(key: str) -> int | None:
        v = u.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None

    pt, ct = num("prompt_tokens"), num("completion_tokens")
    if pt is None and ct is None:
        return None
    return Usage(pt, ct)


#: vLLM's context-length errors, by version. Each form is (versions, regex
#: whose group 1 is the prompt length, whether that length is only a lower
#: bound). vLLM 0.32 stops tokenizing one token past max_model_len, so it
#: reports "at least N" with N = max_model_len + 1, not the real length.
#: tests/core/test_usage.py keeps the full texts seen from each version.
CONTEXT_ERROR_FORMS: tuple[tuple[str, bytes, bool], ...] = (
    # v0.5-v0.10: "However, you requested M tokens (P in the messages, C in the completion)."
    ("0.5-0.10 (with max_tokens)", rb"However, you requested \d+ tokens \((\d+) in the (?:messages|input|prompt)",
     False),
    # v0.5-v0.10 without max_tokens: "However, you requested P tokens in the messages,"
    ("0.5-0.10 (prompt alone)", rb"However, you requested (\d+) tokens in the (?:messages|input|prompt)", False),
    # later releases before 0.32: "However, your request has P input tokens."
    ("later pre-0.32 (prompt alone)", rb"However, your request has (\d+) input tokens", False),
    # ... and their max_tokens check: "... and your request has P input tokens (C > N - P)."
    ("later pre-0.32 (prompt + max_tokens)", rb"and your request has (\d+) input tokens", False),
    # v0.32 (renderers/params.py): "However, your prompt contains at least P input
    # tokens, which exceeds this limit even without any output tokens. Please reduce
    # the length of the input prompt. (parameter=input_tokens, value=P)". Text
    # prompts are tokenized only up to max_model_len + 1, so P is that bound
    # ("at least"); token-id prompts give the exact count (no "at least").
    ("0.32 (prompt alone, tokenizing stopped)", rb"your prompt contains at least (\d+) input tokens", True),
    ("0.32 (prompt alone, exact)", rb"your prompt contains (\d+) input tokens", False),
    # v0.32, text longer than max_model_len x the tokenizer's longest token:
    # "... your prompt contains C characters (more than X characters, which is
    # the upper bound for N input tokens)": more than N tokens.
    ("0.32 (prompt text over the character bound)", rb"which is the upper bound for (\d+) input tokens", True),
)

_CONTEXT_MARK = re.compile(rb"maximum context length is \d+ tokens")
_CONTEXT_FORMS = tuple((re.compile(rx), lower) for _, rx, lower in CONTEXT_ERROR_FORMS)


@dataclass(frozen=True, slots=True)
class ContextError:
    """What a context-length error says about the prompt."""

    prompt_tokens: int
    lower_bound: bool  # True: the prompt has at least this many tokens


def context_error(body: bytes) -> ContextError | None:
    """The prompt length vLLM reports in its context-length error, if any."""
    if not _CONTEXT_MARK.search(body):
        return None
    for rx, lower in _CONTEXT_FORMS:
        m = rx.search(body)
        if m:
            return ContextError(int(m.group(1)), lower)
    return None


def context_error_prompt_tokens(body: bytes) -> int | None:
    """The prompt length (or its lower bound) in a context-length error."""
    e = context_error(body)
    return None if e is None else e.prompt_tokens


#: A choice that ended on its length limit (vLLM's JSON has no spaces; a
#: space is tolerated for other servers). Searched only in events/bodies
#: that contain the cheap mark first.
_LENGTH_MARK = b'"length"'
_FINISH_LENGTH = re.compile(rb'"finish_reason"\s*:\s*"length"')


def finished_on_length(data: bytes) -> bool:
    """Does this chunk or body end a choice with finish_reason "length"?"""
    return _LENGTH_MARK in data and _FINISH_LENGTH.search(data) is not None


class JSONUsage:
    """Collects a JSON response body and reads its usage at the end."""

    def __init__(self, limit: int = MAX_RESPONSE_SCAN_BYTES):
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.overflow = False
        self.usage: Usage | None = None
        self.done = False
        self.text = b""  # the whole body, kept after the end (bounded by limit)
        self.truncated = False  # a choice ended with finish_reason "length"

    def feed(self, chunk: bytes, end: bool) -> None:
        if self.done:
            return
        if chunk and not self.overflow:
            self.size += len(chunk)
            if self.size > self.limit:
                self.overflow = True
                self.parts = []
            else:
                self.parts.append(chunk)
        if end:
            self.done = True
            if not self.overflow and self.parts:
                self.text = b"".join(self.parts)
                self.truncated = finished_on_length(self.text)
                try:
                    self.usage = usage_from_obj(orjson.loads(self.text))
                except orjson.JSONDecodeError:
                    self.usage = None
            self.parts = []


class SSEUsage:
    """Incremental SSE scanner keeping the last usage seen.

    ``feed`` returns None when the client should get the chunk unchanged, or
    the bytes to send instead (only when ``strip_usage_chunk`` is set).
    """

    def __init__(self, strip_usage_chunk: bool = False):
        self.strip = strip_usage_chunk
        self.usage: Usage | None = None
        self.done = False          # saw data: [DONE]
        self.truncated = False     # a choice ended with finish_reason "length"
        self._line = bytearray()   # partial line
        self._line_overflow = False
        self._data: list[bytes] = []  # data lines of the current event
        self._event = bytearray()  # raw bytes of the current event (strip mode)
        self._event_has_usage = False
        self._cr = False           # previous chunk ended with "\r"
        self._cr_event_ended = False    # ... and that "\r" ended an event
        self._cr_event_stripped = False  # ... which was cut out

    def _on_line(self, line: bytes) -> bool:
        """Handle one complete line (without its end). Returns True at the
        blank line that ends an event."""
        if not line:
            if self._data:
                self._dispatch(b"\n".join(self._data))
                self._data = []
            return True
        if line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            self._data.append(value)
        return False

    def _dispatch(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        if not self.truncated and finished_on_length(data):
            self.truncated = True
        if _USAGE_MARK not in data:
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        u = usage_from_obj(obj)
        if u is not None:
            self.usage = u
            if isinstance(obj, dict) and not obj.get("choices"):
                self._event_has_usage = True

    def _take_line(self, piece: bytes) -> bytes | None:
        """The complete line ending with ``piece``; None if it overflowed."""
        if self._line_overflow:
            self._line_overflow = False
            return None
        if self._line:
            line = bytes(self._line) + piece
            self._line.clear()
            return line
        return piece

    def _keep_partial(self, piece: bytes) -> None:
        if self._line_overflow:
            return
        if len(self._line) + len(piece) > MAX_SSE_LINE_BYTES:
            self._line_overflow = True
            self._line.clear()
        else:
            self._line += piece

    def _end_event(self, out: bytearray) -> None:
        if not self._event_has_usage:
            out += self._event
        self._event = bytearray()
        self._event_has_usage = False

    def feed(self, chunk: bytes, end: bool = False) -> bytes | None:
        out = bytearray()
        if not chunk and not end:
            # Nothing to scan; a pending "\r" still waits for a possible "\n".
            return b"" if self.strip else None
        pos, n = 0, len(chunk)
        if self._cr and chunk[:1] == b"\n":
            # The "\n" of a "\r\n" split across chunks ends no new line; it
            # belongs with the bytes before it (dropped if they were).
            pos = 1
            if self.strip:
                if self._cr_event_ended:
                    if not self._cr_event_stripped:
                        out += b"\n"
                else:
                    self._event += b"\n"
        self._cr = False
        while pos < n:
            i = chunk.find(b"\n", pos)
            j = chunk.find(b"\r", pos, i if i >= 0 else n)
            eol = j if j >= 0 else i
            if eol < 0:
                self._keep_partial(chunk[pos:])
                if self.strip:
                    self._event += chunk[pos:]
                    if len(self._event) > MAX_SSE_LINE_BYTES:
                        # Far larger than a usage-only chunk (a few hundred
                        # bytes): it cannot be one, so let it through now.
                        out += self._event
                        self._event = bytearray()
                break
            nxt = eol + 1
            if eol == j:
                if nxt < n:
                    if chunk[nxt] == 0x0A:
                        nxt += 1
                else:
                    self._cr = True
            line = self._take_line(chunk[pos:eol])
            if self.strip:
                self._event += chunk[pos:nxt]
            ended = line is not None and self._on_line(line)
            if ended and self.strip:
                self._cr_event_stripped = self._event_has_usage
                self._end_event(out)
            self._cr_event_ended = ended
            pos = nxt
        if end:
            line = self._take_line(b"") if self._line else None
            if line:
                self._on_line(line)
            if self._data:
                self._dispatch(b"\n".join(self._data))
                self._data = []
            if self.strip:
                self._end_event(out)
        return bytes(out) if self.strip else None

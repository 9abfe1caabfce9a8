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


#: vLLM's context-length error: "This model's maximum context length is N
#: tokens. However, you requested M tokens (P in the messages, C in the
#: completion)." or, without max_tokens, "However, you requested P tokens in
#: the messages" (vllm/entrypoints/openai/serving_engine.py); newer releases
#: word it "... However, your request has P input tokens" or "... and your
#: request has P input tokens (X > N - P)": all these forms are accepted.
_CONTEXT_ERROR = re.compile(
    rb"maximum context length is \d+ tokens(?:\. However, you requested (?:\d+ tokens \((\d+)|(\d+) tokens) "
    rb"(?:tokens )?in the (?:messages|input|prompt)|\.? (?:However, y|and y)our request has (\d+) input tokens)")


def context_error_prompt_tokens(body: bytes) -> int | None:
    """The prompt length vLLM reports in its context-length error, if any."""
    m = _CONTEXT_ERROR.search(body)
    if not m:
        return None
    return int(m.group(1) or m.group(2) or m.group(3))


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

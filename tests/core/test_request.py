"""request.parse: what text the model sees, and why a request is not routable."""

from __future__ import annotations

import json

import orjson
import pytest

from extproc.core.request import CHAT_PATH, COMPLETIONS_PATH, NO_MODEL, NotRoutable, ParsedRequest, parse


def chat(messages, **kw) -> bytes:
    return orjson.dumps({"model": "llama", "messages": messages, **kw})


def test_chat_string_content_joined_by_newline():
    r = parse(CHAT_PATH, chat([{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi there"}]))
    assert isinstance(r, ParsedRequest)
    assert r.path == CHAT_PATH
    assert r.model == "llama"
    assert r.text == b"Be brief.\nHi there"
    assert r.n_chars == len("Be brief.\nHi there")
    assert r.n_messages == 2
    assert r.has_tools is False
    assert r.max_output is None
    assert r.stream is False and r.include_usage is False
    assert r.exact_prompt_tokens is None


def test_chat_text_parts_name_and_non_text_parts():
    r = parse(CHAT_PATH, chat([{
        "role": "user", "name": "alice",
        "content": [{"type": "text", "text": "look at"},
                    {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    {"type": "text", "text": "this"}],
    }]))
    assert r.text == b"look at\nthis\nalice"
    assert r.n_messages == 1


def test_chat_tool_calls_arguments_and_tools_definitions():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            {"id": "c2", "type": "function",
             "function": {"name": "get_time", "arguments": {"tz": "CET"}}},  # non-string args
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
    ]
    r = parse(CHAT_PATH, chat(msgs, tools=tools))
    expected = "\n".join([
        "Weather in Paris?", "get_weather", "{\"city\": \"Paris\"}", "get_time", "{\"tz\":\"CET\"}",
        "18C", orjson.dumps(tools).decode(),
    ])
    assert r.text == expected.encode()
    assert r.n_messages == 3
    assert r.has_tools is True


def test_chat_legacy_functions_and_function_call():
    fns = [{"name": "f", "parameters": {}}]
    r = parse(CHAT_PATH, chat([{"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}],
                              functions=fns))
    assert r.has_tools is True
    assert r.text == (orjson.dumps({"name": "f", "arguments": "{}"}) + b"\n" + orjson.dumps(fns))


def test_empty_tools_list_is_not_tools():
    r = parse(CHAT_PATH, chat([{"role": "user", "content": "x"}], tools=[]))
    assert r.has_tools is False and r.text == b"x"


def test_chat_options_max_output_stream_usage_model():
    r = parse(CHAT_PATH, chat([{"role": "user", "content": "x"}], max_tokens=100,
                              max_completion_tokens=50, stream=True,
                              stream_options={"include_usage": True}))
    assert r.max_output == 50  # max_completion_tokens preferred
    assert r.stream is True and r.include_usage is True
    r = parse(CHAT_PATH, chat([{"role": "user", "content": "x"}], max_tokens=100, stream="yes",
                              stream_options={"include_usage": 1}))
    assert r.max_output == 100
    assert r.stream is False and r.include_usage is False
    for bad in (-1, True, 1.5, "10"):
        assert parse(CHAT_PATH, chat([{"role": "user", "content": "x"}], max_tokens=bad)).max_output is None
    r = parse(CHAT_PATH, orjson.dumps({"messages": [{"role": "user", "content": "x"}]}))
    assert r.model == NO_MODEL
    r = parse(CHAT_PATH, orjson.dumps({"model": 3, "messages": [{"role": "user", "content": "x"}]}))
    assert r.model == NO_MODEL


def test_path_query_string_is_ignored():
    r = parse(CHAT_PATH + "?api-version=1", chat([{"role": "user", "content": "x"}]))
    assert isinstance(r, ParsedRequest) and r.path == CHAT_PATH


def test_completions_prompt_forms():
    r = parse(COMPLETIONS_PATH, orjson.dumps({"model": "m", "prompt": "Once upon a time", "max_tokens": 7}))
    assert r.text == b"Once upon a time" and r.n_messages == 1 and r.max_output == 7
    assert r.exact_prompt_tokens is None
    r = parse(COMPLETIONS_PATH, orjson.dumps({"prompt": ["short", "the longest one", "mid one"]}))
    assert r.text == b"the longest one"
    r = parse(COMPLETIONS_PATH, orjson.dumps({"prompt": [1, 2, 3, 4, 5]}))
    assert r.exact_prompt_tokens == 5 and r.text == b""
    r = parse(COMPLETIONS_PATH, orjson.dumps({"prompt": [[1, 2], [1, 2, 3, 4, 5, 6, 7], [9]]}))
    assert r.exact_prompt_tokens == 7


@pytest.mark.parametrize("prompt", [None, [], 5, {"a": 1}, ["a", 1], [1, "a"]])
def test_completions_bad_prompt_not_routable(prompt):
    body = {"model": "m"} if prompt is None else {"model": "m", "prompt": prompt}
    r = parse(COMPLETIONS_PATH, orjson.dumps(body))
    assert isinstance(r, NotRoutable)
    assert "prompt" in r.reason


def test_cjk_counts_utf8_bytes_not_escaped_body_bytes():
    text = "请用中文详细介绍一下长城的历史，包括修建的朝代和主要目的。" * 20
    body = json.dumps({"model": "qwen", "messages": [{"role": "user", "content": text}]},
                      ensure_ascii=True).encode()
    assert body.isascii() and len(body) > 6 * len(text)  # \uXXXX escapes: 6 bytes per char
    r = parse(CHAT_PATH, body)
    assert r.text == text.encode("utf-8")
    assert r.n_chars == len(text)
    # ~3 bytes per character (all these characters are 3 bytes in UTF-8)
    assert len(r.text) == 3 * len(text)
    assert len(r.text) < len(body) / 2


def test_non_ascii_char_count():
    text = "naïve café — ok"
    r = parse(CHAT_PATH, chat([{"role": "user", "content": text}]))
    assert r.n_chars == len(text)
    assert len(r.text) == len(text.encode())


@pytest.mark.parametrize("path, body, fragment", [
    (CHAT_PATH, b"{not json", "not valid JSON"),
    (CHAT_PATH, b"", "not valid JSON"),
    (CHAT_PATH, b"[1, 2]", "not a JSON object"),
    (CHAT_PATH, b"\"hello\"", "not a JSON object"),
    (CHAT_PATH, b"{\"model\": \"m\"}", "messages"),
    (CHAT_PATH, b"{\"messages\": []}", "messages"),
    (CHAT_PATH, b"{\"messages\": \"hi\"}", "messages"),
    (CHAT_PATH, b"{\"messages\": [\"hi\"]}", "not an object"),
    ("/v1/embeddings", b"{\"input\": \"x\"}", "not an LLM endpoint"),
    ("/health", b"", "'/health'"),
    ("/v1/chat/completions/extra", b"{}", "not an LLM endpoint"),
])
def test_not_routable_with_reason(path, body, fragment):
    r = parse(path, body)
    assert isinstance(r, NotRoutable)
    assert fragment in r.reason

"""The simulated vLLM backend over real HTTP: the official openai client and
raw requests against a server started in-process on a free port."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import orjson
import pytest

from extproc.backend.pool import PoolConfig
from extproc.backend import tokens
from extproc.backend.server import (COMPAT_06, EXPORTED_METRICS, ApiError, BackendSettings, BackgroundServer,
                                    parse_request)

MAX_MODEL_LEN = 4096
ENC = tokens.get_encoding(tokens.DEFAULT_TOKENIZER)


def ntok(text: str) -> int:
    return len(ENC.encode_ordinary(text))


def chat_overhead(n_messages: int) -> int:
    return tokens.REQUEST_OVERHEAD + tokens.PER_MESSAGE_OVERHEAD * n_messages


@pytest.fixture(scope="module")
def server():
    settings = BackendSettings(
        name="short", time_scale=0.0,
        pool=PoolConfig(max_model_len=MAX_MODEL_LEN, kv_cache_tokens=65536))
    with BackgroundServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=10)


def raw(server, path: str, body: bytes | None = None, method: str | None = None):
    """(status, headers, body bytes) of a raw HTTP request."""
    req = urllib.request.Request(server.url + path, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def metric(server, name: str, **labels: str) -> float:
    status, _, body = raw(server, "/metrics")
    assert status == 200
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in body.decode().splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


# --- prompt token accounting ------------------------------------------------

def test_chat_prompt_tokens_are_tiktoken_plus_template(client):
    system = "You are a terse assistant."
    user = "Explain continuous batching in vLLM in two sentences, please."
    r = client.chat.completions.create(
        model="whatever-model", max_tokens=7,
        messages=[{"role": "system", "content": system},
                  {"role": "user", "content": user}])
    assert r.usage.prompt_tokens == ntok(system) + ntok(user) + chat_overhead(2)
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.model == "whatever-model"          # any model name is echoed
    assert r.choices[0].finish_reason == "length"
    assert ntok(r.choices[0].message.content) == 7


def test_chat_counts_parts_names_tool_calls_and_tools(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    args = '{"city": "Paris"}'
    messages = [
        {"role": "user", "name": "alice",
         "content": [{"type": "text", "text": "What is the weather"},
                     {"type": "text", "text": " in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    r = client.chat.completions.create(model="m", messages=messages, tools=tools,
                                       max_tokens=3)
    expected = (ntok("What is the weather") + ntok(" in Paris?") + ntok("alice")
                + ntok("get_weather") + ntok(args) + ntok("18 C, sunny")
                + ntok(orjson.dumps(tools).decode()) + chat_overhead(3))
    assert r.usage.prompt_tokens == expected


def test_completion_prompt_forms(client):
    text = "The quick brown fox jumps over the lazy dog"
    r = client.completions.create(model="m", prompt=text, max_tokens=4)
    assert r.usage.prompt_tokens == ntok(text) + tokens.COMPLETION_BOS_TOKENS
    assert r.usage.completion_tokens == 4 and ntok(r.choices[0].text) == 4

    r = client.completions.create(model="m", prompt=[1, 2, 3, 4, 5], max_tokens=2)
    assert r.usage.prompt_tokens == 5

    r = client.completions.create(model="m", prompt=["hello there", "good bye"],
                                  max_tokens=3)
    assert len(r.choices) == 2
    assert r.usage.prompt_tokens == ntok("hello there") + ntok("good bye") + 2
    assert r.usage.completion_tokens == 6


def test_default_output_length_is_deterministic_and_honest(client):
    msgs = [{"role": "user", "content": "Tell me a story."}]
    a = client.chat.completions.create(model="m", messages=msgs, seed=42)
    b = client.chat.completions.create(model="m", messages=msgs, seed=42)
    assert a.usage.completion_tokens == b.usage.completion_tokens
    assert a.choices[0].message.content == b.choices[0].message.content
    assert ntok(a.choices[0].message.content) == a.usage.completion_tokens
    assert 1 <= a.usage.completion_tokens <= MAX_MODEL_LEN - a.usage.prompt_tokens
    lengths = {client.chat.completions.create(model="m", messages=msgs, seed=s)
               .usage.completion_tokens for s in range(8)}
    assert len(lengths) > 1                      # a distribution, not a constant


def test_default_output_capped_by_context(client):
    prompt = " the" * (MAX_MODEL_LEN - 3)  # leaves 2 tokens (BOS counted)
    r = client.completions.create(model="m", prompt=prompt, seed=1)
    assert r.usage.prompt_tokens == MAX_MODEL_LEN - 2
    assert r.usage.completion_tokens <= 2


# --- streaming -------------------------------------------------------------------

def test_stream_with_include_usage(client):
    stream = client.chat.completions.create(
        model="m", max_tokens=50, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count to fifty."}])
    chunks = list(stream)
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 50
    assert last.usage.prompt_tokens == ntok("Count to fifty.") + chat_overhead(1)
    assert all(c.usage is None for c in body)
    assert len(body) >= 3                          # role chunk + several content chunks
    assert body[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert ntok(text) == 50
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])


def test_stream_without_usage_has_no_usage_chunk(server):
    body = orjson.dumps({"model": "m", "max_tokens": 20, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
    status, headers, data = raw(server, "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in data.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all("usage" not in p and p["choices"] for p in payloads)


def test_completion_stream(client):
    chunks = list(client.completions.create(
        model="m", prompt="Once upon a time", max_tokens=33, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 33 and chunks[-1].choices == []
    assert ntok("".join(c.choices[0].text for c in chunks[:-1])) == 33


# --- errors ------------------------------------------------------------------------

def test_prompt_plus_max_tokens_over_max_model_len_is_clipped(client, server):
    """vLLM 0.32: the answer is cut at max_model_len (200, finish_reason length)."""
    words = " the" * 4000
    p = 4000 + chat_overhead(1)
    r = client.chat.completions.create(model="m", max_tokens=200,
                                       messages=[{"role": "user", "content": words}])
    assert r.usage.prompt_tokens == p and r.usage.completion_tokens == MAX_MODEL_LEN - p
    assert r.choices[0].finish_reason == "length"
    # max_completion_tokens takes precedence over max_tokens, like vLLM.
    r = client.chat.completions.create(model="m", max_tokens=1, max_completion_tokens=200,
                                       messages=[{"role": "user", "content": words}])
    assert r.usage.completion_tokens == MAX_MODEL_LEN - p


def test_max_tokens_over_max_model_len_is_vllm_032_400(server):
    status, headers, data = raw(server, "/v1/chat/completions", orjson.dumps(
        {"model": "m", "max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]}))
    assert status == 400 and headers["x-pool-name"] == "short"
    assert json.loads(data) == {"error": {
        "message": f"max_tokens=5000 cannot be greater than max_model_len={MAX_MODEL_LEN}. Please request "
                   f"fewer output tokens. (parameter=max_tokens, value=5000)",
        "type": "BadRequestError", "param": "max_tokens", "code": 400}}


def test_vllm_compat_06_refuses_prompt_plus_max_tokens():
    """--vllm-compat 0.6: the older servers' 400 and flat error body."""
    counter = tokens.TokenCounter()
    body = orjson.dumps({"model": "m", "max_tokens": 200, "messages": [{"role": "user", "content": " the" * 4000}]})
    p = 4000 + chat_overhead(1)
    with pytest.raises(ApiError) as exc:
        parse_request("chat", body, counter, MAX_MODEL_LEN, "m", compat=COMPAT_06)
    expected = (f"This model's maximum context length is {MAX_MODEL_LEN} tokens. "
                f"However, you requested {p + 200} tokens ({p} in the messages, "
                f"200 in the completion). Please reduce the length of the messages "
                f"or completion.")
    assert exc.value.body(COMPAT_06) == {"object": "error", "message": expected,
                                         "type": "BadRequestError", "param": None, "code": 400}
    assert parse_request("chat", body, counter, MAX_MODEL_LEN, "m").choices[0].output_tokens == MAX_MODEL_LEN - p


def test_vllm_compat_06_server_flag(tmp_path):
    from extproc.backend import cli
    import argparse
    ns = cli.configure_parser(argparse.ArgumentParser()).parse_args(
        ["--vllm-compat", "0.6", "--served-model-name", "a", "b", "--max-model-len", "4096"])
    st = cli.settings_from_args(ns)
    assert st.compat == COMPAT_06 and st.served_names == ("a", "b")


def test_prompt_alone_too_long_without_max_tokens(server):
    n = MAX_MODEL_LEN - tokens.COMPLETION_BOS_TOKENS  # prompt == max_model_len
    status, _, data = raw(server, "/v1/completions", orjson.dumps(
        {"model": "m", "prompt": " the" * n}))
    assert status == 400
    err = json.loads(data)["error"]
    assert err["message"] == (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your prompt contains at "
        f"least {MAX_MODEL_LEN + 1} input tokens, which exceeds this limit even without any output tokens. "
        f"Please reduce the length of the input prompt. (parameter=input_tokens, value={MAX_MODEL_LEN + 1})")
    assert err["param"] == "input_tokens" and err["type"] == "BadRequestError"
    # One token less fits: the completion gets the single token left.
    status, _, data = raw(server, "/v1/completions", orjson.dumps(
        {"model": "m", "prompt": " the" * (n - 1)}))
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 1
    # Token ids are counted exactly (no "at least").
    status, _, data = raw(server, "/v1/completions", orjson.dumps(
        {"model": "m", "prompt": [1] * (MAX_MODEL_LEN + 7)}))
    assert status == 400 and json.loads(data)["error"]["message"].endswith(
        f"(parameter=input_tokens, value={MAX_MODEL_LEN + 7})")


def test_unknown_model_is_404_when_names_are_served():
    settings = BackendSettings(name="short", served_names=("tiny", "probe"))
    with BackgroundServer(settings) as srv:
        status, _, data = raw(srv, "/v1/chat/completions", orjson.dumps(
            {"model": "nope", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}))
        assert status == 404
        assert json.loads(data) == {"error": {"message": "The model `nope` does not exist. Valid aliases: "
                                                         "tiny, probe.", "type": "NotFoundError",
                                              "param": "model", "code": 404}}
        status, _, _ = raw(srv, "/v1/chat/completions", orjson.dumps(
            {"model": "probe", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}))
        assert status == 200
        status, _, data = raw(srv, "/v1/models")
        assert [m["id"] for m in json.loads(data)["data"]] == ["tiny", "probe"]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", b"[1, 2]"),
    ("/v1/chat/completions", b'{"model": "m"}'),
    ("/v1/chat/completions", b'{"messages": "hi"}'),
    ("/v1/chat/completions", b'{"messages": []}'),
    ("/v1/chat/completions", b'{"messages": [{"content": "no role"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}'),
    ("/v1/completions", b""),
    ("/v1/completions", b'{"prompt": {"a": 1}}'),
    ("/v1/completions", b'{"prompt": [[]]}'),
    ("/v1/completions", b'{"max_tokens": 3}'),
])
def test_malformed_requests_are_400_json(server, path, body):
    status, headers, data = raw(server, path, body, method="POST")
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    err = json.loads(data)["error"]
    assert err["code"] == 400 and err["type"] == "BadRequestError" and err["message"]


# --- other endpoints and metrics -------------------------------------------------

def test_health_models_and_pool_header(server, client):
    status, headers, data = raw(server, "/health")
    assert status == 200 and data == b"" and headers["x-pool-name"] == "short"
    models = client.models.list()
    assert [m.id for m in models.data] == ["llama-3-8b-sim"]
    status, headers, _ = raw(server, "/no/such/path")
    assert status == 404 and headers["x-pool-name"] == "short"


def test_metrics_have_vllm_names_and_count(server, client):
    status, headers, data = raw(server, "/metrics")
    text = data.decode()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total",
                 "vllm:kv_cache_usage_perc", "vllm:request_success_total",
                 "vllm:admission_rejections_total",
                 "vllm:time_to_first_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count"):
        assert f"{name}{{" in text, name
    assert 'model_name="llama-3-8b-sim"' in text and 'engine="0"' in text
    assert "vllm:gpu_cache_usage_perc" not in text  # gone from vLLM (V1 engine)
    assert {ln.split("{")[0] for ln in text.splitlines() if ln.startswith("vllm:")} == set(EXPORTED_METRICS) | {
        "vllm:time_to_first_token_seconds_count", "vllm:time_to_first_token_seconds_sum",
        "vllm:e2e_request_latency_seconds_count", "vllm:e2e_request_latency_seconds_sum"}
    assert headers["x-pool-name"] == "short"

    before_ok = metric(server, "vllm:request_success_total", finished_reason="length")
    before_gen = metric(server, "vllm:generation_tokens_total")
    before_prompt = metric(server, "vllm:prompt_tokens_total")
    before_ttft = metric(server, "vllm:time_to_first_token_seconds_count")
    prompt = 0
    for i in range(5):
        r = client.chat.completions.create(model="m", max_tokens=10 + i,
                                           messages=[{"role": "user", "content": f"q{i}"}])
        prompt += r.usage.prompt_tokens
    assert metric(server, "vllm:request_success_total", finished_reason="length") == before_ok + 5
    assert metric(server, "vllm:generation_tokens_total") == before_gen + sum(range(10, 15))
    assert metric(server, "vllm:prompt_tokens_total") == before_prompt + prompt
    assert metric(server, "vllm:time_to_first_token_seconds_count") == before_ttft + 5
    assert metric(server, "vllm:num_requests_running") == 0


# --- real-time behaviour (time_scale > 0) ---------------------------------------------

def test_realtime_streaming_and_queue_rejection():
    """Slots 1, queue bound 1: a burst gets 503s; streams arrive over time."""
    import aiohttp

    settings = BackendSettings(
        name="long", time_scale=0.05,
        pool=PoolConfig(max_model_len=8192, max_num_seqs=1, max_waiting=1, gpu="a100"))
    with BackgroundServer(settings) as srv:
        async def one(session, max_tokens: int, stream: bool):
            t0 = time.monotonic()
            body = {"model": "m", "max_tokens": max_tokens, "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(srv.base_url + "/chat/completions", json=body) as r:
                times = []
                async for _ in r.content.iter_any():
                    times.append(time.monotonic() - t0)
                return r.status, r.headers.get("x-pool-name"), times

        async def burst():
            async with aiohttp.ClientSession() as s:
                first = asyncio.create_task(one(s, 200, True))  # 2 s simulated
                await asyncio.sleep(0.02)
                rest = await asyncio.gather(*(one(s, 5, False) for _ in range(4)))
                return await first, rest

        (status, pool, times), rest = asyncio.run(asyncio.wait_for(burst(), 20))
        assert status == 200 and pool == "long"
        # 200 tokens at ~85 tok/s (Llama-3-8B on one A100: ~11.8 ms a step)
        # = 2.4 s simulated = 0.12 s wall; the first bytes come at TTFT, the
        # rest spread over the decode.
        assert len(times) >= 3
        assert times[-1] >= 0.08 and times[0] < times[-1] / 2
        statuses = sorted(r[0] for r in rest)
        assert statuses.count(200) == 1 and statuses.count(503) == 3
        status, _, data = raw(srv, "/metrics")
        rejected = [l for l in data.decode().splitlines()
                    if l.startswith("vllm:admission_rejections_total") and "max_num_queued_reqs" in l]
        assert rejected and float(rejected[0].split()[-1]) == 3.0


def test_realtime_openai_stream(tmp_path):
    settings = BackendSettings(name="short", time_scale=0.02,
                               pool=PoolConfig(max_model_len=2048))
    with BackgroundServer(settings) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=10)
        t0 = time.monotonic()
        stream = c.chat.completions.create(
            model="m", max_tokens=100, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "hello"}])
        chunks = list(stream)
        elapsed = time.monotonic() - t0
        assert chunks[-1].usage.completion_tokens == 100 and chunks[-1].choices == []
        # 100 tokens at ~125 tok/s (Llama-3-8B on one H100: ~8 ms a step)
        # = 0.8 s simulated = 16 ms wall at scale 0.02.
        assert 0.015 <= elapsed < 5


def test_client_disconnect_aborts_sequence():
    """A stream abandoned by its client frees its slot at once (vLLM aborts
    the request on disconnect): with one slot, the next request is not
    stuck behind 8000 tokens of decode (8 s of wall time here)."""
    import aiohttp

    settings = BackendSettings(name="short", time_scale=0.05,
                               pool=PoolConfig(max_num_seqs=1))
    with BackgroundServer(settings) as srv:
        async def scenario():
            body = {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                    "max_tokens": 8000}
            async with aiohttp.ClientSession() as s:
                r = await s.post(srv.base_url + "/chat/completions", json=body)
                await r.content.readany()
                r.close()
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            async with aiohttp.ClientSession() as s:
                body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
                async with s.post(srv.base_url + "/chat/completions", json=body) as r:
                    await r.read()
                    return r.status, time.monotonic() - t0

        status, elapsed = asyncio.run(asyncio.wait_for(scenario(), 20))
        assert status == 200 and elapsed < 2.0
        assert metric(srv, "vllm:request_success_total", finished_reason="length") == 1


# --- CLI ------------------------------------------------------------------------------

def test_cli_parser_and_settings():
    import argparse

    from extproc.backend import cli

    parser = argparse.ArgumentParser(prog="budget-router")
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    args = parser.parse_args(["backend", "--name", "long", "--max-model-len", "131072",
                              "--max-num-seqs", "16", "--time-scale", "0.01",
                              "--per-message-overhead", "4"])
    assert args.func is cli.main
    s = cli.settings_from_args(args)
    assert s.name == "long" and s.pool.max_model_len == 131072
    assert s.pool.max_num_seqs == 16 and s.pool.waiting_bound == 64
    assert s.pool.kv_cache_tokens is None           # what one H100 leaves for Llama-3-8B
    assert s.pool.instance_config().kv_tokens == 443536
    assert s.time_scale == 0.01 and s.template.per_message_overhead == 4
    kv = cli.settings_from_args(parser.parse_args(["backend", "--kv-tokens", "262144"]))
    assert kv.pool.instance_config().kv_tokens == 262144
    assert cli.main(parser.parse_args(["backend", "--max-model-len", "300000"])) == 2  # over the context
    bad = parser.parse_args(["backend", "--max-model-len", "65536", "--kv-tokens", "32768"])
    assert cli.main(bad) == 2                       # KV cache smaller than one sequence
    with pytest.raises(SystemExit):
        parser.parse_args(["backend", "--time-scale", "-1"])


def test_cli_subprocess_serves(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.backend.cli", "backend", "--port", "0",
         "--name", "short", "--time-scale", "0"],
        stderr=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[2]))
    try:
        line = proc.stderr.readline()
        assert "serving" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200 and r.headers["x-pool-name"] == "short"
    finally:
        proc.terminate()
        proc.wait(timeout=10)

"""Contract: the same requests against the simulated pool and a real vLLM
server of the same shape (max_model_len 2048, model tiny-qwen2); status
codes, error type/param, usage presence, finish reasons, clipping and the
SSE chunk shapes must agree. The table is printed (pytest -s)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from extproc.backend.pool import PoolConfig
from extproc.backend.server import BackendSettings, BackgroundServer
from extproc.tools import vllm_pool as V

MODEL = V.VLLM_MODEL
LEN = V.CPU_SHORT_MAX_MODEL_LEN


def _chat(content: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "ignore_eos": True, **kw}


#: (case, path, body). Prompt sizes hold for both tokenizers (Qwen2 and the
#: simulator's cl100k both count " the" as one token).
CASES = [
    ("chat", "/v1/chat/completions", _chat("Say hello.", max_tokens=4)),
    ("completion", "/v1/completions", {"model": MODEL, "prompt": "Hello, world!", "max_tokens": 3,
                                       "ignore_eos": True}),
    ("stream + include_usage", "/v1/chat/completions",
     _chat("Say hello.", max_tokens=3, stream=True, stream_options={"include_usage": True})),
    ("stream, no usage", "/v1/chat/completions", _chat("Say hello.", max_tokens=3, stream=True)),
    ("prompt > max_model_len", "/v1/chat/completions", _chat(" the" * 2600, max_tokens=10)),
    ("prompt + max_tokens > max_model_len", "/v1/chat/completions", _chat(" the" * 1500, max_tokens=1000)),
    ("max_tokens > max_model_len", "/v1/chat/completions", _chat("hi", max_tokens=4000)),
    ("unknown model", "/v1/chat/completions", {**_chat("hi", max_tokens=2), "model": "no-such-model"}),
    ("stream_options without stream", "/v1/chat/completions",
     _chat("hi", max_tokens=2, stream_options={"include_usage": True})),
]


def _post(base: str, path: str, body: dict) -> tuple[int, str, bytes]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


def _sse_shape(data: bytes) -> str:
    """Chunk kinds in order: role, finish (the choice's last chunk; +usage if
    it carries usage), usage (choices [] + usage), DONE. Content chunks in
    between are left out: how many there are depends on timing (vLLM sends
    one per step, the simulator batches tokens)."""
    kinds: list[str] = []
    for event in data.decode().split("\n\n"):
        if not event.startswith("data: "):
            continue
        payload = event[6:]
        if payload == "[DONE]":
            kinds.append("DONE")
            continue
        obj = json.loads(payload)
        ch = obj.get("choices") or []
        if not ch:
            kinds.append("usage" if obj.get("usage") else "empty")
        elif ch[0].get("finish_reason"):
            kinds.append("finish" + ("+usage" if obj.get("usage") else ""))
        elif (ch[0].get("delta") or {}).get("role"):
            kinds.append("role")
    return ",".join(kinds)


def observe(base: str, path: str, body: dict) -> dict:
    """What the contract compares for one request."""
    status, ctype, data = _post(base, path, body)
    row: dict = {"status": status}
    if ctype.startswith("text/event-stream"):
        row["shape"] = _sse_shape(data)
        return row
    obj = json.loads(data)
    if status != 200:
        err = obj.get("error") if isinstance(obj.get("error"), dict) else {}
        row.update(shape="error" if err else "flat error", type=err.get("type"), param=err.get("param"))
        return row
    u = obj.get("usage") or {}
    row.update(shape="usage" if u else "no usage", finish=obj["choices"][0]["finish_reason"],
               at_limit=(u.get("prompt_tokens", 0) + u.get("completion_tokens", 0)) == LEN)
    return row


@pytest.fixture(scope="module")
def simulated():
    settings = BackendSettings(name="short", model=MODEL, served_names=(MODEL,),
                               pool=PoolConfig(max_model_len=LEN, kv_cache_tokens=V.CPU_SHORT_KV_TOKENS,
                                               max_num_seqs=V.CPU_SHORT_MAX_NUM_SEQS))
    with BackgroundServer(settings) as srv:
        yield srv.url


def test_simulated_pool_matches_real_vllm(vllm_stack, simulated):
    real = vllm_stack.pool_url("short")
    rows = [(case, observe(simulated, path, body), observe(real, path, body)) for case, path, body in CASES]
    keys = ("status", "type", "param", "shape", "finish", "at_limit")
    width = max(len(c) for c, _, _ in rows)
    lines = [f"\n[tests/vllm] contract: simulated pool vs real vLLM {V.VLLM_VERSION} (max_model_len {LEN})",
             f"{'case':<{width}} | {'field':<8} | {'simulated':<34} | {'real vLLM':<34} | same"]
    for case, sim, rl in rows:
        for k in keys:
            if k in sim or k in rl:
                a, b = sim.get(k), rl.get(k)
                lines.append(f"{case:<{width}} | {k:<8} | {str(a):<34} | {str(b):<34} | "
                             f"{'yes' if a == b else 'NO'}")
    print("\n".join(lines))
    assert [(c, s) for c, s, _ in rows] == [(c, r) for c, _, r in rows]
    by_case = {c: r for c, _, r in rows}
    # the facts the router depends on, stated outright
    assert by_case["prompt + max_tokens > max_model_len"] == {
        "status": 200, "shape": "usage", "finish": "length", "at_limit": True}
    assert by_case["stream + include_usage"]["shape"] == "role,finish,usage,DONE"
    assert by_case["prompt > max_model_len"]["param"] == "input_tokens"


def test_router_refuses_a_long_prompt_with_vllms_own_body(vllm_stack):
    """Issue 17: one error shape for "prompt too long" whoever answers: the
    router's body is the real server's, numbers aside."""
    import re
    from extproc.core import errors
    _, _, data = _post(vllm_stack.pool_url("short"), "/v1/chat/completions", _chat(" the" * 2600, max_tokens=10))
    real = json.loads(data)
    ours = json.loads(errors.context_length_exceeded(2600, LEN))
    numbers = re.compile(r"\d+")
    assert set(ours) == set(real) == {"error"} and set(ours["error"]) == set(real["error"])
    for k in ("type", "param", "code"):
        assert ours["error"][k] == real["error"][k]
    # the router knows a lower bound only: vLLM's own "at least " wording
    assert (numbers.sub("N", ours["error"]["message"]).replace("at least ", "")
            == numbers.sub("N", real["error"]["message"]).replace("at least ", ""))

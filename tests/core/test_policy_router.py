"""Policy and the Router facade: route / want_sample / learn / snapshot / restore."""

from __future__ import annotations

import json
import random

import orjson
import pytest

from extproc import defaults as D
from extproc.core import policy as P
from extproc.config import Config
from extproc.core.request import CHAT_PATH, COMPLETIONS_PATH
from extproc.core.router import NEAR_THRESHOLD_BOOST, Router


def chat_body(text: str, model: str = "llama", **kw) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}], **kw})


def tokens_body(n: int, **kw) -> bytes:
    return orjson.dumps({"model": "llama", "prompt": list(range(n)), **kw})


# --- policy functions ------------------------------------------------------------------

def test_choose_boundary_and_margin():
    cfg = Config()
    b = cfg.b_short
    assert P.choose(cfg, b - 100, 100, 0.0) == ("short", P.R_SHORT)
    assert P.choose(cfg, b - 100, 101, 0.0) == ("long", P.R_LONG)
    # with a 10% margin the prompt counts 10% more
    assert P.choose(cfg, 1000, b - 1100, 0.10) == ("short", P.R_SHORT)
    assert P.choose(cfg, 1000, b - 1099, 0.10) == ("long", P.R_LONG)


def test_margin_for():
    cfg = Config()
    assert P.margin_for(cfg, 0.0) == cfg.policy.min_margin
    assert P.margin_for(cfg, 0.1) == pytest.approx(cfg.policy.margin_sigmas * 0.1)


def test_surely_too_long():
    cfg = Config()
    lim = cfg.long.max_model_len
    assert P.surely_too_long(cfg, lim, exact=True)
    assert not P.surely_too_long(cfg, lim - 1, exact=True)
    assert not P.surely_too_long(cfg, lim, exact=False)  # could be 25% over-estimated
    assert P.surely_too_long(cfg, lim / (1 - cfg.policy.reject_margin) + 1, exact=False)
    assert not P.surely_too_long(cfg, lim / (1 - cfg.policy.reject_margin) - 1, exact=False)


# --- routing -----------------------------------------------------------------------------

def test_exact_token_prompt_boundary():
    r = Router(Config())
    b = r.cfg.b_short
    d = r.route(COMPLETIONS_PATH, tokens_body(b - 100, max_tokens=100))
    assert (d.pool, d.reason, d.estimate, d.output, d.budget) == ("short", P.R_SHORT, b - 100, 100, b)
    assert d.exact and d.margin == 0.0 and d.category == "tokens" and d.output_source == "request"
    d = r.route(COMPLETIONS_PATH, tokens_body(b - 100, max_tokens=101))
    assert (d.pool, d.reason) == ("long", P.R_LONG)


def test_text_prompt_short_long_around_b_short_with_margin():
    r = Router(Config())
    b = r.cfg.b_short
    text = "The quick brown fox jumps over the lazy dog. " * 300  # 13,500 bytes
    d0 = r.route(CHAT_PATH, chat_body(text, max_tokens=0))
    est = len(text) / 4 + 5 + 6  # the prior
    assert d0.estimate == round(est)
    assert d0.margin == pytest.approx(max(D.MIN_MARGIN, D.MARGIN_SIGMAS * D.PRIOR_REL_ERROR))
    assert d0.category == "prose" and d0.model == "llama" and d0.n_bytes == len(text)
    fits = int((b - est * (1 + d0.margin)) // 1)  # largest output that still fits
    d = r.route(CHAT_PATH, chat_body(text, max_tokens=fits))
    assert (d.pool, d.reason, d.output) == ("short", P.R_SHORT, fits)
    d = r.route(CHAT_PATH, chat_body(text, max_tokens=fits + 1))
    assert (d.pool, d.reason) == ("long", P.R_LONG)
    # without the margin it would have fitted: the margin decides
    assert round(est) + fits + 1 < b
    # no max_tokens: the default output budget (1024) is used
    d = r.route(CHAT_PATH, chat_body(text))
    assert (d.output, d.output_source, d.capped) == (D.DEFAULT_OUTPUT_TOKENS, "default", False)


def test_context_length_exceeded_is_openai_shaped_400():
    r = Router(Config())
    lim = r.cfg.long.max_model_len
    d = r.route(COMPLETIONS_PATH, tokens_body(lim, max_tokens=5))
    assert d.status == P.STATUS_BAD_REQUEST == 400 and d.reason == P.R_CONTEXT and d.pool == "long"
    err = json.loads(d.error)
    assert set(err) == {"error"}
    assert set(err["error"]) == {"message", "type", "param", "code"}
    # vLLM 0.32's body for the same refusal (issue 17: one shape whoever answers)
    assert err["error"]["type"] == "BadRequestError"
    assert err["error"]["code"] == 400
    assert err["error"]["param"] == "input_tokens"
    assert err["error"]["message"] == (
        f"This model's maximum context length is {lim} tokens. However, your prompt contains at least {lim} "
        "input tokens, which exceeds this limit even without any output tokens. Please reduce the length of "
        f"the input prompt. (parameter=input_tokens, value={lim})")
    # text: needs an estimate 25% above the limit even at the prior
    text = "a" * int(4 * lim / 0.75 + 400)
    d = r.route(CHAT_PATH, chat_body(text))
    assert d.status == 400 and json.loads(d.error)["error"]["param"] == "input_tokens"
    low = int(d.estimate * (1 - r.cfg.policy.reject_margin))
    assert f"at least {low} input tokens" in json.loads(d.error)["error"]["message"]
    # just long (over the limit at the prior, not surely): routed long, not refused
    d = r.route(CHAT_PATH, chat_body("a" * (4 * lim + 100)))
    assert d.status is None and d.pool == "long" and d.reason == P.R_LONG


def test_too_large_body_is_413():
    cfg = Config().replace(router={"max_body_bytes": 64 * 1024})
    r = Router(cfg)
    body = chat_body("x" * (64 * 1024))
    d = r.route(CHAT_PATH, body)
    assert d.status == P.STATUS_TOO_LARGE == 413 and d.reason == P.R_TOO_LARGE and d.pool == "long"
    err = json.loads(d.error)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "request_too_large"
    assert f"{len(body)} bytes" in err["message"] and str(64 * 1024) in err["message"]
    assert not r.want_sample(d, 0.0)
    d = r.too_large(None)  # size unknown (Envoy's chunked 413 says the same)
    assert json.loads(d.error)["error"]["message"] == f"Request body is too large: the limit is {64 * 1024} bytes."


@pytest.mark.parametrize("path, body", [
    ("/v1/embeddings", b'{"input": "hi"}'),
    (CHAT_PATH, b"{nope"),
    (CHAT_PATH, b'{"messages": []}'),
    (COMPLETIONS_PATH, b'{"prompt": 3}'),
])
def test_not_llm_routes_long(path, body):
    r = Router(Config())
    d = r.route(path, body)
    assert d.pool == "long" and d.reason == P.R_NOT_LLM and d.detail
    assert d.status is None and not d.routable
    assert not r.want_sample(d, 0.0)
    assert r.learn(d, 100, 10) is None
    assert r.estimator.models == {} and r.outputs.sketches == {}


def test_decision_header_and_metadata():
    r = Router(Config())
    d = r.route(COMPLETIONS_PATH, tokens_body(1000, max_tokens=24))
    assert d.header_value() == "pool=short; est=1000; budget=1024; margin=0.000; cat=tokens; reason=budget_fits_short"
    md = d.metadata()
    assert md == {"pool": "short", "reason": "budget_fits_short", "estimate": 1000, "budget": 1024,
                  "category": "tokens", "model": "llama", "margin": 0.0, "decision": d.header_value()}
    d = r.route("/x", b"")
    assert d.metadata()["category"] == "-" and d.metadata()["model"] == "-"


# --- sampling ---------------------------------------------------------------------------

def _teach(r: Router, text: str, n: int, model="llama"):
    for _ in range(n):
        d = r.route(CHAT_PATH, chat_body(text, model=model))
        r.learn(d, d.n_bytes // 4 + 11, 50)


def test_want_sample_always_while_unconfident_then_rate_limited():
    cfg = Config()
    r = Router(cfg)
    text = "Short question about the weather in Paris today?"
    n = cfg.estimator.min_samples_confident
    for i in range(n):
        d = r.route(CHAT_PATH, chat_body(text))
        assert d.samples == i
        assert r.want_sample(d, 0.999999)  # always, whatever the draw
        r.learn(d, 20, 30)
    d = r.route(CHAT_PATH, chat_body(text))
    assert d.samples == n
    rate = cfg.router.sample_rate
    assert r.want_sample(d, 0.0)
    assert r.want_sample(d, rate - 1e-9)
    assert not r.want_sample(d, rate)
    assert not r.want_sample(d, 0.99)


@pytest.mark.parametrize("model, text", [
    ("llama", "def f(x):\n    return {x: [x]}\n" * 5),      # same model, new category (code)
    ("llama", "请用中文详细介绍一下长城的历史。"),              # same model, new category (cjk)
    ("qwen", "Short question about the weather in Paris today?"),  # new model, same category
])
def test_want_sample_always_for_unlearned_model_category(model, text):
    cfg = Config()
    r = Router(cfg)
    for _ in range(cfg.estimator.min_samples_confident):
        r.learn(r.route(CHAT_PATH, chat_body("Short question about the weather in Paris today?")), 20, 30)
    d = r.route(CHAT_PATH, chat_body(text, model=model))
    assert (d.model, d.category) != ("llama", "prose")
    assert not r.estimator.confident(model, d.category)
    assert d.samples == 0
    assert r.want_sample(d, 0.99)


def test_want_sample_boosted_near_threshold():
    cfg = Config()
    r = Router(cfg)
    text = "The quick brown fox jumps over the lazy dog. " * 150
    _teach(r, text, cfg.estimator.min_samples_confident)
    d = r.route(CHAT_PATH, chat_body(text))
    assert d.samples >= cfg.estimator.min_samples_confident
    b = cfg.b_short
    far = r.route(CHAT_PATH, chat_body(text, max_tokens=0))
    assert abs(far.estimate * (1 + far.margin) - b) > 0.25 * b
    u = cfg.router.sample_rate * 2
    assert not r.want_sample(far, u)
    near = r.route(CHAT_PATH, chat_body(text, max_tokens=b - 2000))
    assert abs(near.estimate * (1 + near.margin) + near.output - b) <= 0.25 * b
    assert r.want_sample(near, u)
    assert not r.want_sample(near, cfg.router.sample_rate * NEAR_THRESHOLD_BOOST)


def test_want_sample_exact_uses_rate():
    r = Router(Config())
    d = r.route(COMPLETIONS_PATH, tokens_body(10))
    assert r.want_sample(d, 0.0) and not r.want_sample(d, r.cfg.router.sample_rate)


def test_want_sample_never_for_immediate_responses():
    r = Router(Config())
    d = r.route(COMPLETIONS_PATH, tokens_body(r.cfg.long.max_model_len))
    assert d.status == 400 and not r.want_sample(d, 0.0)


# --- learning -------------------------------------------------------------------------------

def test_learn_updates_estimate_and_outputs():
    r = Router(Config())
    text = "The quick brown fox jumps over the lazy dog. " * 100  # 4500 bytes
    d = r.route(CHAT_PATH, chat_body(text))
    assert d.estimate == round(4500 / 4 + 11)
    rel = r.learn(d, 1500, 77)
    assert rel == pytest.approx((4500 / 4 + 11 - 1500) / 1500)
    d2 = r.route(CHAT_PATH, chat_body(text))
    assert d2.samples == 1 and d2.estimate > d.estimate
    for _ in range(60):
        r.learn(r.route(CHAT_PATH, chat_body(text)), 1500, 77)
    d3 = r.route(CHAT_PATH, chat_body(text))
    assert d3.estimate == pytest.approx(1500, rel=0.02)
    assert (d3.output_source, d3.output) == ("learned", pytest.approx(77, rel=0.1))
    assert d3.output >= 77
    assert d3.rel_error < 0.1


def test_capped_request_does_not_teach_output():
    r = Router(Config())
    for _ in range(50):
        d = r.route(CHAT_PATH, chat_body("hello there", max_tokens=10))
        r.learn(d, 12, 10)
    assert all(s.samples == 0 for s in r.outputs.sketches.values())
    d = r.route(CHAT_PATH, chat_body("hello there"))
    assert d.output_source == "default"


@pytest.mark.parametrize("pt", [None, True, 0, -3, 2.5, "10"])
def test_learn_ignores_unusable_prompt_tokens(pt):
    r = Router(Config())
    d = r.route(CHAT_PATH, chat_body("hello there"))
    assert r.learn(d, pt, None) is None
    assert all(f.samples == 0 for f in r.estimator.fits.values())


def test_snapshot_restore_same_decisions():
    rng = random.Random(3)
    cfg = Config()
    r = Router(cfg)
    words = "alpha beta gamma delta, epsilon; zeta (eta) theta 42".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 3000))) for _ in range(80)]
    for t in texts:
        d = r.route(CHAT_PATH, chat_body(t, model=rng.choice(["a", "b"])))
        r.learn(d, max(1, round(d.n_bytes / 3.1 + 20)), rng.randint(1, 900))
    snap = orjson.loads(orjson.dumps(r.snapshot()))
    r2 = Router(cfg)
    r2.restore(snap)
    for t in texts[:20]:
        for m in ("a", "b", "c"):
            for mt in (None, 500):
                body = chat_body(t, model=m, **({} if mt is None else {"max_tokens": mt}))
                a, b = r.route(CHAT_PATH, body), r2.route(CHAT_PATH, body)
                assert (a.pool, a.estimate, a.output, a.margin, a.samples) == \
                       (b.pool, b.estimate, b.output, b.margin, b.samples)


def test_reconfigure_keeps_learning_and_applies_new_b_short():
    r = Router(Config())
    text = "The quick brown fox jumps over the lazy dog. " * 100
    _teach(r, text, 40)
    before = r.route(CHAT_PATH, chat_body(text))
    cfg2 = Config().replace(policy={"b_short": 1000})
    r.reconfigure(cfg2)
    after = r.route(CHAT_PATH, chat_body(text))
    assert after.estimate == before.estimate and after.samples == before.samples
    assert before.pool == "short" and after.pool == "long"
    assert r.estimator.margin_min_tokens == max(1000, 0.5 * 1000)

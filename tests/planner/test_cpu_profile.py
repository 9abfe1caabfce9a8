"""The measured CPU profile (planner.sim.cpu_profile) and the pure half of the
fidelity check (tools/fidelity.py): the fit, the profile inside the instance
model, vLLM 0.32's lone-request threshold rule, the comparison."""
import numpy as np
import pytest

from extproc.planner.sim import cpu_profile as CP
from extproc.planner.sim.fleet import FleetSpec, PoolSpec, simulate
from extproc.planner.sim.hardware import MODELS, ConfigError, make_config
from extproc.planner.sim.traces import Trace
from extproc.tools import fidelity as F

PROF = CP.CPUProfile(step_overhead_s=0.008, per_token_s=20e-6, per_ctx_s=25e-9, request_overhead_s=0.009)


def cfg(**kw):
    kw.setdefault("max_num_batched_tokens", 512)
    return CP.cpu_config("tiny-qwen2", 8192, profile=PROF, kv_tokens=32768, max_num_seqs=8,
                       enable_prefix_caching=False, **kw)


def run(c, arrival, prompt, output):
    tr = Trace("t", np.asarray(arrival, float), np.asarray(prompt, np.int64), np.asarray(output, np.int64))
    return simulate(tr, FleetSpec((PoolSpec("p", c, 1),)), check=True)


def test_the_cpu_registry_gives_a_config_with_the_measured_profile():
    c = CP.cpu_config("tiny-qwen2", 2048)
    assert isinstance(c, CP.CPUInstanceConfig) and c.gpu_key() == "cpu"
    c.validate()
    assert c.kv_tokens == 4 * 2048
    assert "--kv-cache-memory-bytes=8388608" in c.vllm_args()  # 1 KiB per token
    assert c.step_coeffs().overhead == CP.CPU_PROFILES["tiny-qwen2"].step_overhead_s
    with pytest.raises(ConfigError):
        CP.cpu_config("llama-3-70b")


def test_fit_recovers_the_terms_it_was_made_from():
    feats = [CP.prefill_features(n, 512) for n in (32, 512, 1024, 3072, 7680)]
    feats += [CP.decode_features(b, 64, 32) for b in (1, 4, 8)]
    secs = [CP.predict(PROF, f) for f in feats]
    got = CP.fit(feats, secs)
    for k in CP.TERMS:
        assert getattr(got, k) == pytest.approx(getattr(PROF, k), rel=1e-6)


def test_fit_keeps_every_term_non_negative():
    feats = [CP.prefill_features(n, 512) for n in (32, 512, 1024, 3072)]
    feats += [CP.decode_features(1, 64, 32), CP.decode_features(8, 64, 32)]
    feats += [CP.prefill_features(512, 512, woken=True)]
    secs = [0.02, 0.02, 0.021, 0.019, 0.03, 0.028, 0.018]  # flat: no per-token or context cost visible
    got = CP.fit(feats, secs)
    assert min(getattr(got, k) for k in CP.TERMS) >= 0.0
    with pytest.raises(ValueError):
        CP.fit(feats[:3], secs[:3])


def test_fit_recovers_the_new_shape_per_sequence_and_wake_costs():
    prof = CP.CPUProfile(0.008, 20e-6, 25e-9, 0.009, new_shape_s=0.012, per_seq_s=0.0004, wake_s=0.01)
    feats = [CP.prefill_features(n, 512) for n in (32, 512, 1024, 3072, 7680)]
    feats += [CP.decode_features(b, 64, 32) for b in (1, 4, 8)]
    feats += [CP.prefill_features(n, 512, new_shapes=1) for n in (130, 390)]
    feats += [CP.prefill_features(512, 512, woken=True)]
    got = CP.fit(feats, [CP.predict(prof, f) for f in feats])
    for k in CP.TERMS:
        assert getattr(got, k) == pytest.approx(getattr(prof, k), rel=1e-6)


def test_a_step_at_a_new_token_count_pays_the_shape_build_once():
    """vLLM CPU builds a oneDNN primitive per row count (LRU of SHAPE_CACHE):
    the first lone prompt of 300 tokens pays new_shape_s, the next one at 300
    does not, one at 301 does; after SHAPE_CACHE other counts 300 pays again.
    The GPU configs have no shape cache."""
    pen = 0.05
    c = CP.cpu_config("tiny-qwen2", 8192, profile=CP.CPUProfile(0.008, 20e-6, 25e-9, 0.009, new_shape_s=pen),
                      kv_tokens=32768, max_num_seqs=8, enable_prefix_caching=False, max_num_batched_tokens=512)
    base = run(cfg(), [0.0], [300], [1]).first_token[0]
    sizes = [300, 300, 301] + list(range(100, 100 + CP.SHAPE_CACHE)) + [300]
    r = run(c, [10.0 * i for i in range(len(sizes))], sizes, [1] * len(sizes))
    ttft = r.first_token - r.arrival
    assert ttft[0] == pytest.approx(base + pen, rel=1e-9)
    assert ttft[1] == pytest.approx(base, rel=1e-9)
    assert ttft[2] > base + pen * 0.99
    assert ttft[-1] == pytest.approx(base + pen, rel=1e-9)
    assert getattr(make_config("h100", next(iter(MODELS))), "shape_cache", None) is None


@pytest.mark.parametrize("n", [32, 512, 1500, 7680])
def test_the_instance_model_prices_a_lone_prefill_as_the_fit_does(n):
    """The fit's features and the simulator's steps are the same model: a lone
    prompt's engine TTFT is the profile's prediction less the request overhead."""
    r = run(cfg(), [0.0], [n], [1])
    assert r.first_token[0] == pytest.approx(CP.predict(PROF, CP.prefill_features(n, 512))
                                             - PROF.request_overhead_s, rel=1e-9)


def test_the_instance_model_prices_a_decode_batch_as_the_fit_does():
    b, p, o = 4, 64, 32
    r = run(cfg(), [0.0] * b, [p] * b, [o] * b)
    tpot = (r.finish - r.first_token) / (o - 1)
    want = CP.predict(PROF, CP.decode_features(b, p, o))
    assert np.allclose(tpot, want, rtol=0.01)


def test_long_prefill_threshold_is_off_for_a_lone_request():
    """vLLM 0.32 (v1/core/sched/scheduler.py): the threshold applies only when
    more than one request is running or waiting."""
    lone = run(cfg(long_prefill_token_threshold=128), [0.0], [2048], [1])
    free = run(cfg(), [0.0], [2048], [1])
    assert lone.first_token[0] == pytest.approx(free.first_token[0])  # 4 steps of 512, not 16 of 128
    # with a second request waiting, the long prompt is cut to 128 tokens a step
    two = run(cfg(long_prefill_token_threshold=128), [0.0, 0.0], [2048, 64], [1, 2])
    two_off = run(cfg(), [0.0, 0.0], [2048, 64], [1, 2])
    assert two.first_token[1] < two_off.first_token[1]  # the short one no longer waits behind it
    assert two.first_token[0] > two_off.first_token[0]


def test_latency_counts_tpot_as_vllms_benchmark_does():
    ttft = np.array([0.1, 0.2, np.nan, 0.1])
    e2e = np.array([0.5, 0.2, 1.0, 1.1])
    out = np.array([5, 1, 3, 11])
    m = F.latency(ttft, e2e, out)
    assert m["requests"] == 3
    assert m["tpot_p50_ms"] == pytest.approx(100.0)  # (0.5-0.1)/4 and (1.1-0.1)/10; 1-token excluded
    assert m["ttft_p50_ms"] == pytest.approx(100.0)


def test_compare_ratios_and_ranking():
    def m(t50, t90, p50, p90):
        return {"requests": 1, "ttft_p50_ms": t50, "ttft_p90_ms": t90, "tpot_p50_ms": p50, "tpot_p90_ms": p90}
    cfgs = [{"name": "a", "real": m(100, 200, 10, 20), "sim": m(110, 210, 9, 19)},
            {"name": "b", "real": m(50, 100, 10, 20), "sim": m(60, 90, 10, 30)}]
    doc = F.compare(cfgs)
    assert doc["configs"][0]["ratio"]["ttft_p50_ms"] == pytest.approx(1.1)
    assert doc["ranking_agrees"]  # b < a on TTFT p90 in both
    assert not doc["all_ratios_in_band"]  # 30/20 = 1.5
    cfgs[1]["sim"]["ttft_p90_ms"] = 300
    assert not F.compare(cfgs)["ranking_agrees"]


def test_the_fidelity_trace(traces_dir):
    tr = F.build_trace(traces_dir.rsplit("/", 1)[0])
    assert len(tr) == F.N_REQUESTS >= 300
    assert (tr.prompt + tr.output <= F.SINGLE_LEN).all()
    assert tr.prompt.max() > 0.8 * F.SINGLE_LEN  # prompts reach toward the long pool's context
    ia = np.diff(tr.arrival)
    assert ia.std() / ia.mean() > 1.5  # bursts (Poisson has CV 1)
    assert (F.route(tr, F.DESIGNS[2]) == 1).sum() >= 20  # the split's long server gets real work


def test_every_request_scheduled_in_a_step_pays_the_per_sequence_cost():
    """A decode batch of b pays per_seq_s b times a step (the fit's decode
    feature); a step of the threshold-on design with two partial prefills
    pays it twice."""
    seq = 0.0005
    prof = CP.CPUProfile(0.008, 20e-6, 25e-9, 0.009, per_seq_s=seq)
    c = CP.cpu_config("tiny-qwen2", 8192, profile=prof, kv_tokens=32768, max_num_seqs=8,
                      enable_prefix_caching=False, max_num_batched_tokens=512)
    b, p, o = 8, 64, 32
    r = run(c, [0.0] * b, [p] * b, [o] * b)
    tpot = (r.finish - r.first_token) / (o - 1)
    assert np.allclose(tpot, CP.predict(prof, CP.decode_features(b, p, o)), rtol=0.01)
    r0 = run(cfg(), [0.0] * b, [p] * b, [o] * b)  # the same profile without the term
    assert np.allclose(tpot - (r0.finish - r0.first_token) / (o - 1), b * seq, rtol=0.01)
    lone = run(c, [0.0], [2048], [1]).first_token[0]
    assert lone == pytest.approx(CP.predict(prof, CP.prefill_features(2048, 512)) - prof.request_overhead_s)
    two = run(CP.cpu_config("tiny-qwen2", 8192, profile=prof, kv_tokens=32768, max_num_seqs=8,
                            enable_prefix_caching=False, max_num_batched_tokens=512,
                            long_prefill_token_threshold=128), [0.0, 0.0], [1024, 1024], [1, 1])
    two0 = run(cfg(long_prefill_token_threshold=128), [0.0, 0.0], [1024, 1024], [1, 1])
    # both prompts prefill side by side in chunks of 128: 8 steps of two requests each
    assert two.first_token[1] - two0.first_token[1] == pytest.approx(8 * 2 * seq, rel=1e-6)


def test_a_request_after_an_idle_second_pays_the_wake_cost_once():
    """vLLM's engine sleeps after IDLE_SPIN_S idle: the first step after pays
    wake_s; a request arriving sooner, or joining a busy engine, does not."""
    wake = 0.01
    prof = CP.CPUProfile(0.008, 20e-6, 25e-9, 0.009, wake_s=wake)
    c = CP.cpu_config("tiny-qwen2", 8192, profile=prof, kv_tokens=32768, max_num_seqs=8,
                      enable_prefix_caching=False, max_num_batched_tokens=512)
    base = run(cfg(), [0.0], [300], [1]).first_token[0]
    gap = CP.IDLE_SPIN_S
    r = run(c, [0.0, 0.5 * gap, 2.5 * gap, 2.5 * gap + 0.001], [300, 300, 300, 300], [1, 1, 1, 1])
    ttft = r.first_token - r.arrival
    assert ttft[0] == pytest.approx(base) and ttft[1] == pytest.approx(base)  # start, and 0.5 s idle
    assert ttft[2] == pytest.approx(base + wake)  # after 2.5 s idle
    assert ttft[3] > ttft[2] - 0.001  # queued behind it, the wake paid once (in the step before its own)
    assert r.finish[3] - r.arrival[2] == pytest.approx(2 * base + wake, rel=1e-6)
    assert getattr(make_config("h100", next(iter(MODELS))), "idle_wake", None) is None

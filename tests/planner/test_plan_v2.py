"""Planner v2: equal per-class SLOs, real balancers, pinned baseline, seeds,
plan.json contract, --emit validated by the real Envoy."""
import json
import math
import os

import numpy as np
import pytest

from extproc.planner.sizing import slo as S
from extproc.planner.sim.balancers import BALANCERS, REALISTIC_BALANCERS
from extproc.planner.sim.fleet import FleetSpec, PoolSpec, simulate
from extproc.planner.sim.hardware import GPUS, MODELS, make_config
from extproc.planner.sim.metrics import summarize
from extproc.planner.report.plan_json import plan_json
from extproc.planner.sizing.plan import plan as plan_typed
from extproc.planner.sizing.space import Baseline, Space, parse_baseline
from extproc.planner.sim.traces import Trace, perturb, poisson_arrivals, synthetic

from .test_planner import A100, conserve
from tests.planner.cli_helpers import plan_parser, small_plan_argv, synthetic_trace

SCHEMA = os.path.join(os.path.dirname(__file__), "..", "schemas", "plan.schema.json")
SMALL_SPACE = Space(seqs=(256,), mbts=(8192,))


def plan(*a, **kw) -> dict:
    """A plan as plan.json has it."""
    return plan_json(plan_typed(*a, **kw))


def small_trace(n=500, seed=7):
    return synthetic(n, 4, 2500, 200, seed=seed, max_total=60000, name="small")


@pytest.fixture(scope="module")
def small_plan():
    return plan(small_trace(), b_shorts=[8192], space=SMALL_SPACE, workers=1)


# --- 1. per-class SLOs, the same for every design ------------------------------------

def test_every_design_judged_by_the_same_targets(small_plan):
    res = small_plan
    tg = res["slo"]["targets"]
    assert {d["kind"] for d in res["designs"]} == {"homogeneous", "split"}
    for d in res["designs"]:
        for c, m in d["classes"].items():
            # identical targets: a relaxed target on either design fails here
            assert m["ttft_slo_ms"] == S.SLO_TTFT_P99_MS[c] == tg[c]["ttft_slo_ms"]
            assert m["tpot_slo_ms"] == S.SLO_TPOT_P99_MS[c] == tg[c]["tpot_slo_ms"]
            assert m["ttft_target_ms"] == tg[c]["ttft_target_ms"]
            # and `meets` is exactly the comparison with them
            within = (m["requests"] == 0 or (m["ttft_p99_ms"] <= tg[c]["ttft_target_ms"]
                      and not m["tpot_p99_ms"] > tg[c]["tpot_target_ms"]))
            assert m["meets_effective"] == within
        assert d["meets_effective"] == (all(m["meets_effective"] for m in d["classes"].values())
                                        and d["preempt_per_1k"] <= res["slo"]["preempt_per_1k"])
        # the numbers behind `classes` are the fleet's own, by true budget
        n = sum(m["requests"] for m in d["classes"].values())
        assert n == res["requests"]


def test_no_relaxation_infeasible_is_reported_for_both():
    tr = small_trace(300)
    slo = S.SLO(ttft_ms={"short": 2000.0, "long": 50.0})  # 50 ms: no long prompt prefills that fast
    res = plan(tr, slo=slo, b_shorts=[8192], space=SMALL_SPACE, workers=1, seeds=1)
    t = res["slo"]["targets"]["long"]
    assert t["infeasible"] and res["slo"]["infeasible"]
    assert t["idle_ttft_p99_ms"] > 50.0
    assert t["ttft_target_ms"] == pytest.approx(S.INFEASIBLE_SLACK * t["idle_ttft_p99_ms"])
    for d in res["designs"]:
        c = d["classes"]["long"]
        assert c["infeasible"] and not c["meets"] and not d["meets"]
        assert c["ttft_target_ms"] == t["ttft_target_ms"]  # same held-to figure for every design
    assert not res["slo"]["targets"]["short"]["infeasible"]


def test_parse_classes():
    assert S.parse_classes("short=1500", S.SLO_TTFT_P99_MS) == {"short": 1500.0, "long": 60000.0}
    with pytest.raises(ValueError):
        S.parse_classes("medium=1", S.SLO_TTFT_P99_MS)
    with pytest.raises(ValueError):
        S.parse_classes("short=-1", S.SLO_TTFT_P99_MS)


# --- 2. balancers ------------------------------------------------------------------------

def uniform_trace(n=4000, rate=60.0):
    return Trace("uniform", poisson_arrivals(n, rate, 1), np.full(n, 1000), np.full(n, 200))


@pytest.mark.parametrize("bal", BALANCERS)
def test_balancers_conserve_and_spread(bal):
    tr = uniform_trace()
    r = simulate(tr, FleetSpec((PoolSpec("p", A100, 8),), balancer=bal), seed=3, check=True)
    conserve(r)
    counts = np.bincount(r.inst, minlength=8)
    assert counts.sum() == len(tr)
    assert counts.max() <= 2 * counts.mean(), counts


def test_balancer_rng_is_injected():
    tr = uniform_trace(1500)
    spec = FleetSpec((PoolSpec("p", A100, 6),), balancer="least-request")
    a, b, c = (simulate(tr, spec, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.inst, b.inst)
    assert not np.array_equal(a.inst, c.inst)


def test_oracle_is_only_an_explicit_upper_bound():
    assert FleetSpec((PoolSpec("p", A100, 1),)).balancer == "least-request"
    assert "least-work" not in BALANCERS and "oracle-least-work" in BALANCERS


def test_prefill_aware_keeps_short_requests_off_a_long_prefill():
    """One 128K-token prompt then short ones at a steady rate on 2 instances:
    least-request sees one active request on each side and keeps feeding the
    instance stuck in the long prefill half the time; prefill-aware (estimated
    prompt tokens outstanding) sends the short ones to the other instance."""
    n = 400
    arrival = np.concatenate([[0.0], 0.01 + np.arange(n - 1) * 0.02])
    prompt = np.concatenate([[120_000], np.full(n - 1, 500)])
    tr = Trace("one-long", arrival, prompt, np.full(n, 20))
    cfg = make_config("a100", "llama-3-70b", max_model_len=131072)
    spec = lambda b: FleetSpec((PoolSpec("p", cfg, 2),), balancer=b)  # noqa: E731
    pa = simulate(tr, spec("prefill-aware"), seed=1, check=True)
    conserve(pa)
    long_inst = pa.inst[0]
    assert np.count_nonzero(pa.inst[1:40] == long_inst) == 0  # none behind the long prefill
    lr = simulate(tr, spec("least-request"), seed=1)
    assert np.count_nonzero(lr.inst[1:40] == lr.inst[0]) > 0


def test_mitigated_single_pools_use_thresholds_that_take_effect():
    """vLLM V1: a threshold only caps a chunk below the step budget, and
    max_num_partial_prefills is ignored, so the search never sets it."""
    sp = Space(seqs=(256,), mbts=(2048, 8192, 16384))
    base = make_config("a100", "llama-3-70b", max_model_len=131072)
    cs = sp.configs("llama-3-70b", base, 131072, mitigation=True)
    got = {(c.max_num_batched_tokens, c.long_prefill_token_threshold) for c in cs}
    assert got == {(2048, 256), (2048, 1024), (8192, 256), (8192, 1024), (8192, 4096),
                   (16384, 256), (16384, 1024), (16384, 4096)}
    assert all(c.max_num_partial_prefills == 0 for c in cs)
    assert all(c.long_prefill_token_threshold == 0 for c in sp.configs("llama-3-70b", base, 131072))


def test_recommendation_names_the_best_single_pool(small_plan):
    r, ds = small_plan["recommendation"], {d["name"]: d for d in small_plan["designs"]}
    assert all(d["balancer"] == small_plan["balancer"] for d in ds.values())
    b = r["best_single_pool"]
    if b is not None:
        singles = [d for d in ds.values() if d["kind"] == "homogeneous" and d["meets_effective"] and d["feasible"]]
        cheapest = min(singles, key=lambda d: d["usd_per_hour"])
        assert b["design"] == cheapest["name"] and b["gpus"] == cheapest["gpus"]
        rec = ds[r["design"]]
        assert r["saving_vs_best_single_pool"] == pytest.approx(1 - rec["usd_per_hour"] / cheapest["usd_per_hour"])
    sized = small_plan["sized_candidates"]
    assert sum(c["role"] == "homogeneous" for c in sized) >= 2  # several single pools SLO-sized, all reported


# --- 3. baseline and config search -------------------------------------------------------

def test_parse_baseline(tmp_path):
    b = parse_baseline("gpu=h100,tp=4,max_num_seqs=128,max_num_batched_tokens=4096,"
                       "gpu_memory_utilization=0.85,instances=12")
    assert b == Baseline("h100", 4, None, 128, 4096, 0.85, 12)
    f = tmp_path / "b.toml"
    f.write_text("[baseline]\ngpu = 'a100'\ninstances = 3\n")
    assert parse_baseline(str(f)).instances == 3
    for bad in ("gpu=tpu", "foo=1", "tp=x", "instances=0", "gpu"):
        with pytest.raises(ValueError):
            parse_baseline(bad)


def test_pinned_baseline_is_evaluated_as_is():
    res = plan(small_trace(300), baseline=Baseline(instances=5), b_shorts=[8192], space=SMALL_SPACE,
               workers=1, seeds=1)
    base = res["designs"][0]
    assert base["name"] == "baseline" and base["instances"] == {"all": 5} and base["gpus"] == 20
    assert base["savings_vs_baseline"] == 0.0
    assert "pinned" in base["what"]


def test_long_prefill_threshold_helps_short_requests_behind_long_ones():
    n = 200
    t = np.arange(n) * 1.0
    P = np.where(np.arange(n) % 20 == 0, 60000, 500)
    tr = Trace("mix", t, P, np.full(n, 50))
    cfg = make_config("a100", "llama-3-70b", max_model_len=65536)
    mit = cfg.with_(long_prefill_token_threshold=2048, max_num_partial_prefills=4)
    short = P < 1000

    def p99(c):
        r = simulate(tr, FleetSpec((PoolSpec("p", c, 1),)), check=True)
        conserve(r)
        return np.percentile((r.first_token - r.arrival)[short], 99)
    assert p99(mit) < 0.8 * p99(cfg)
    assert "--long-prefill-token-threshold=2048" in mit.vllm_args()


def test_models_and_gpus():
    for m in ("llama-3-8b", "qwen3-32b", "qwen3-30b-a3b"):
        assert m in MODELS
    assert MODELS["qwen3-30b-a3b"].experts == 128
    # H200: nvidia-smi's ~140 GiB, not 141e9 bytes
    assert GPUS["h200"].memory_bytes / 2**30 == pytest.approx(140.4, abs=0.1)
    assert {"b200", "mi300x"} <= set(GPUS)
    cfg = make_config("h200", "qwen3-32b").validate()
    assert cfg.tp == 1 and cfg.kv_tokens > 131072


# --- 4. seeds ------------------------------------------------------------------------------

def test_perturb_keeps_the_mix():
    tr = small_trace(1000)
    assert perturb(tr, 0) is tr
    p = perturb(tr, 1)
    assert sorted(p.prompt.tolist()) == sorted(tr.prompt.tolist())
    assert np.all(np.diff(p.arrival) >= 0) and p.arrival[0] == 0
    assert not np.array_equal(p.prompt, tr.prompt)
    assert abs(p.duration - tr.duration) < 0.05 * tr.duration


def test_plan_is_deterministic_per_seed(small_plan):
    again = plan(small_trace(), b_shorts=[8192], space=SMALL_SPACE, workers=2)
    strip = lambda res: [(d["name"], d["instances"], d["classes"], d["preempt_per_1k"]) for d in res["designs"]]  # noqa: E731
    assert strip(again) == strip(small_plan)
    assert small_plan["seeds"] == [0, 1, 2]
    for d in small_plan["designs"]:
        assert len(d["per_seed"]) == 3 and d["seed_spread_gpus"] >= 0
        lo, hi = d["seed_band_gpus"]
        assert lo <= hi


def test_recommendation_needs_a_margin(small_plan):
    r = small_plan["recommendation"]
    assert r["why"]
    if r["split"]:
        assert r["margin"] > 0


def test_utilisation_over_trace_window():
    tr = uniform_trace(2000)
    s = summarize(simulate(tr, FleetSpec((PoolSpec("p", A100, 40),))))["fleet"]
    assert 0 < s["gpu_busy"] <= 1.0 and s["drain_s"] >= 0


# --- 8. plan.json contract, plots, 7. --emit validated by Envoy -----------------------------

def test_cli_plan_balancer_matrix(tmp_path, capsys):
    """--balancer realistic: every design under each realistic balancer, the
    verdict against the cheapest meeting single pool of all of them."""
    jsonschema = pytest.importorskip("jsonschema")
    ap = plan_parser()
    f = synthetic_trace(tmp_path / "m.jsonl", 200, seed=1, gap_ms=250, max_output=300)
    out = tmp_path / "p"
    args = ap.parse_args(small_plan_argv(f, 1, "--balancer", "realistic", "--out", str(out)))
    assert args.func(args) == 0
    assert "GPUs by balancer" in capsys.readouterr().out
    res = json.loads((out / "plan.json").read_text())
    jsonschema.validate(res, json.loads(open(SCHEMA).read()))
    assert set(res["balancer_matrix"]) == set(REALISTIC_BALANCERS)
    assert {d["balancer"] for d in res["designs"]} == set(REALISTIC_BALANCERS)
    r = res["recommendation"]
    ok = [d for d in res["designs"] if d["meets_effective"] and d["feasible"]]
    singles = [d for d in ok if d["kind"] == "homogeneous"]
    if singles:
        best = min(singles, key=lambda d: d["usd_per_hour"])
        assert r["best_single_pool"]["gpus"] == best["gpus"]
        assert r["best_single_pool"]["balancer"] in REALISTIC_BALANCERS
        assert r["saving_vs_best_single_pool"] >= 0  # the single pool is itself a candidate
    assert os.path.exists(out / "balancer_matrix.png")


def test_cli_plan_json_schema_plots_and_emit(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    ap = plan_parser()
    f = synthetic_trace(tmp_path / "m.jsonl", 300, seed=0, gap_ms=250, max_output=300)
    out, emit_dir = tmp_path / "p", tmp_path / "deploy"
    args = ap.parse_args(small_plan_argv(f, 3, "--slo-ttft-p99-ms", "short=3000,long=60000",
                          "--out", str(out), "--emit", str(emit_dir)))
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "recommendation:" in text and "short TTFT99" in text
    res = json.loads((out / "plan.json").read_text())
    jsonschema.validate(res, json.loads(open(SCHEMA).read()))
    assert res["slo"]["ttft_p99_ms"]["short"] == 3000
    assert os.path.exists(out / "class_latency.png") and os.path.exists(out / "cost_vs_b_short.png")
    assert os.path.exists(out / "preemptions.png") == any(d["preempt_per_1k"] > 0 for d in res["designs"])
    # the emitted deployment: router TOML loads, Envoy accepts the rendered config
    from extproc import config as C
    from extproc.envoy.bootstrap import EnvoyNotFound, validate_file
    cfg = C.load(str(emit_dir / "budget-router.toml"))
    dep = json.loads((emit_dir / "deployment.json").read_text())
    rec = next(d for d in res["designs"] if d["name"] == res["recommendation"]["design"])
    assert [p["instances"] for p in dep["pools"]] == [p["count"] for p in rec["pools"]]
    assert len(cfg.long.endpoints) == rec["pools"][-1]["count"]
    for p in rec["pools"]:
        assert (emit_dir / f"vllm-{p['name']}.args").read_text().startswith("vllm serve")
    try:
        v = validate_file(emit_dir / "envoy.yaml")
    except EnvoyNotFound as e:
        pytest.skip(str(e))
    assert v.returncode == 0, v.stdout + v.stderr
    # a broken schema instance is refused (the schema can fail)
    bad = dict(res, designs=[dict(res["designs"][0], gpus=0)])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(open(SCHEMA).read()))
    args = ap.parse_args(["plan", "--trace", str(tmp_path / "nope.csv"), "--no-progress"])
    assert args.func(args) == 2
    assert math.isfinite(res["designs"][0]["usd_per_hour"])


# --- 5. prefix caching ------------------------------------------------------------------------

def test_prefix_cache_lru_never_serves_uninserted():
    from extproc.planner.sim.prefix_cache import PrefixCache
    c = PrefixCache(3)
    c.inserted = set()
    assert c.lookup((1, 2)) == 0
    c.insert((1, 2, 3))
    assert c.lookup((1, 2, 9)) == 2 and c.lookup((9, 1)) == 0
    c.insert((4,))  # evicts the least recently used: 3
    assert c.peek((1, 2, 3)) == 2 and c.peek((4,)) == 1
    assert c.hits == 2 and c.queries == 7


def test_prefix_caching_on_mooncake_style_trace():
    rng = np.random.default_rng(0)
    n = 600
    prompts = rng.integers(2000, 12000, n)
    # conversations: every request extends one of 30 shared system prefixes
    hs = np.empty(n, dtype=object)
    hs[:] = [tuple([int(k % 30)] + list(range(1000 + 100 * i, 1000 + 100 * i + int(p) // 512)))
             for i, (k, p) in enumerate(zip(rng.integers(0, 30, n), prompts))]
    tr = Trace("pc", poisson_arrivals(n, 5, 0), prompts, rng.integers(10, 200, n), hashes=hs)
    cfg = make_config("a100", "llama-3-70b", max_model_len=16384)
    spec = FleetSpec((PoolSpec("p", cfg, 2),))
    r = simulate(tr, spec, check=True)
    conserve(r)
    s = summarize(r)["fleet"]
    assert 0 < s["prefix_hit_rate"] < 0.2 and s["prefix_skipped_tokens"] > 0
    off = simulate(tr, FleetSpec((PoolSpec("p", cfg.with_(enable_prefix_caching=False), 2),)))
    assert summarize(off)["fleet"]["prefix_hit_rate"] == 0
    # every hit was a block inserted on that instance (the cache asserts it)
    from extproc.planner.sim import instance as I
    orig = I.PrefixCache.__init__

    def tracking(self, cap):
        orig(self, cap)
        self.inserted = set()
    I.PrefixCache.__init__ = tracking
    try:
        conserve(simulate(tr, spec))
    finally:
        I.PrefixCache.__init__ = orig


def test_split_recommended_only_above_spread_and_tolerance():
    from extproc.planner.report.plan_json import recommendation_json
    from extproc.planner.sizing.bisect import SIZE_TOLERANCE
    from extproc.planner.sizing.design import Design, Judged, SizedPool
    from extproc.planner.sizing.recommend import recommend

    def d(name, kind, instances, spread):  # A100 TP4: 4 GPUs an instance
        pool = SizedPool("all", A100, instances, True, 1.0, 1.0)
        des = Design(name, kind, (pool,), name, b_short=8192 if kind == "split" else None,
                     alpha=0.5, rho=1.0, closed_form=0.0)
        summary = {"fleet": {"preemptions_per_1k": 0.0}}
        return Judged(des, summary, (), {}, True, True, 1 - instances / 25, spread, (0, 0))

    noise = (4 + 4) / 100 + 2 * SIZE_TOLERANCE  # 12%
    near = recommendation_json(recommend([d("baseline", "homogeneous", 25, 4), d("split-8192", "split", 23, 4)]))
    assert near["design"] == "baseline" and not near["split"] and "within" in near["why"]
    far = recommendation_json(recommend([d("baseline", "homogeneous", 25, 4), d("split-8192", "split", 20, 4)]))
    assert far["design"] == "split-8192" and far["split"]
    assert far["margin"] == pytest.approx(0.20 - noise)
    assert f"{0.20 - noise:.1%}" in far["why"]
    assert far["savings_vs_baseline"] == pytest.approx(0.20)
    worse = recommendation_json(recommend([d("baseline", "homogeneous", 25, 0), d("split-8192", "split", 30, 0)]))
    assert worse["design"] == "baseline" and "costs 20.0% more" in worse["why"]
    none = recommendation_json(recommend([replace_meets(d("baseline", "homogeneous", 25, 0))]))
    assert none["design"] is None and none["margin"] is None and not none["split"]


def replace_meets(j):
    from dataclasses import replace
    return replace(j, meets_effective=False)


# --- issue 10 point 5: plan compares 1, 2 and 3 tiers with and without spillover ----------

def test_cli_plan_tiers_and_spillover_judged_by_identical_targets(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    ap = plan_parser()
    tr = small_trace(400)
    tr.prompt[::40] = 50000  # some traffic for the third tier (32K-128K)
    tr.prompt[5::40] = 20000
    f = tmp_path / "m.jsonl"
    f.write_text("".join(f'{{"timestamp": {int(a * 1000)}, "input_length": {int(p)}, "output_length": {int(o)}}}\n'
                         for a, p, o in zip(tr.arrival, tr.prompt, tr.output)))
    out = tmp_path / "p"
    args = ap.parse_args(small_plan_argv(f, 2, "--tiers", "8192,32768,131072", "--spillover", "--out", str(out)))
    assert args.func(args) == 0
    assert "tiers-8192-32768-131072+spillover" in capsys.readouterr().out
    res = json.loads((out / "plan.json").read_text())
    jsonschema.validate(res, json.loads(open(SCHEMA).read()))
    by = {d["name"]: d for d in res["designs"]}
    assert {"baseline", "homogeneous-best", "split-8192", "tiers-8192-32768-131072",
            "split-8192+spillover", "tiers-8192-32768-131072+spillover"} <= set(by)
    assert len(by["homogeneous-best"]["pools"]) == 1 and len(by["split-8192"]["pools"]) == 2
    three = by["tiers-8192-32768-131072"]
    assert [p["config"]["max_model_len"] for p in three["pools"]] == [8192, 32768, 131072]
    assert list(three["instances"]) == ["short", "tier1", "long"]
    tg = res["slo"]["targets"]
    for d in res["designs"]:
        # every design, closed loop or not, is held to the very same class targets
        for c, m in d["classes"].items():
            assert (m["ttft_slo_ms"], m["tpot_slo_ms"], m["ttft_target_ms"], m["tpot_target_ms"]) == \
                (tg[c]["ttft_slo_ms"], tg[c]["tpot_slo_ms"], tg[c]["ttft_target_ms"], tg[c]["tpot_target_ms"])
        assert sum(m["requests"] for m in d["classes"].values()) == res["requests"]
        # the closed-loop designs ran the router's spillover (fleet.loop_hook), the others did not
        assert (" spillover" in d["summary"]["spec"]) == d["name"].endswith("+spillover")
    for name in ("split-8192", "tiers-8192-32768-131072"):  # spillover never needs more in the first tier
        assert by[name + "+spillover"]["instances"]["short"] <= by[name]["instances"]["short"] or \
            not by[name]["meets_effective"]
    # the 3-tier closed-loop design deploys as [[tiers]] with spillover on
    from extproc import config as C
    from extproc.planner.report.emit import emit
    emit(res, str(tmp_path / "deploy"), "tiers-8192-32768-131072+spillover")
    cfg = C.load(str(tmp_path / "deploy" / "budget-router.toml"))
    assert [t.name for t in cfg.tiers] == ["short", "tier1", "long"]
    assert [t.budget_limit for t in cfg.tiers] == [8192, 32768, None] and cfg.spillover.enabled
    assert [len(t.endpoints) for t in cfg.tiers] == list(by["tiers-8192-32768-131072+spillover"]["instances"].values())
    emit(res, str(tmp_path / "static"), "tiers-8192-32768-131072")
    assert not C.load(str(tmp_path / "static" / "budget-router.toml")).spillover.enabled

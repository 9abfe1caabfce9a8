"""Issue 16 items 8 and 2: the sizing search's early exit and pruning change
no size, and the candidate throughput estimate does not thrash."""
import numpy as np
import pytest

from extproc.planner.sim.fleet import FleetSpec, PoolSpec, simulate
from extproc.planner.sim.metrics import CLASSES
from extproc.planner.sim.stop import MissRule
from extproc.planner.sim.traces import perturb, synthetic
from extproc.planner.sizing import closed_form
from extproc.planner.sizing.bisect import size_pool
from extproc.planner.sizing.design import SizingContext, SizingJob
from extproc.planner.sizing.presize import screen_count
from extproc.planner.sizing.slo import SLO, ok, targets
from extproc.planner.sizing.space import SEARCH_MBTS, Baseline, cost
from extproc.planner.sizing.steady import busy_seconds
from extproc.planner.sizing.workers import EvalJob, evaluate

CFG = Baseline().config("llama-3-70b")


def _case(n=900, rate=12.0, seed=7):
    tr = synthetic(n, rate, 2500, 200, seed=seed, max_total=60000, name="small")
    slo = SLO()
    tg = targets(slo, CFG, tr.prompt, tr.total)
    return tr, SizingContext(tg, slo, (0, 1, 2), "least-request", warmup=5.0)


def _stop(ctx):
    from extproc.planner.sizing.bisect import stop_targets
    return stop_targets(ctx)


def test_early_exit_gives_the_same_size_as_the_full_run():
    tr, ctx = _case()
    job = SizingJob("all", "all", CFG, closed_form.throughput(CFG, tr), tr)
    full = size_pool(job, ctx, early_exit=False)
    fast = size_pool(job, ctx, early_exit=True)
    assert (fast.count, fast.feasible, fast.per_seed) == (full.count, full.feasible, full.per_seed)
    # the search took the same path: the same counts, each with the same verdict per seed
    assert [(t["count"], t["ok"], t["seed_ok"]) for t in fast.tried] == \
           [(t["count"], t["ok"], t["seed_ok"]) for t in full.tried]
    # and the early exit did stop some runs (else this test tests nothing)
    assert any("early_exit" in t for t in fast.tried)
    assert all("early_exit" not in t for t in full.tried)


@pytest.mark.parametrize("count", [3, 9, 18, 22, 30])  # 3: over capacity; 9, 18: miss; 22, 30: meet
def test_a_stopped_run_surely_misses_and_an_unstopped_one_is_unchanged(count):
    tr, ctx = _case(n=600)
    spec = FleetSpec((PoolSpec("all", CFG, count),))
    fast = evaluate(EvalJob(tr, spec, 1, ctx.slo.boundary, ctx.warmup, _stop(ctx)))
    full = evaluate(EvalJob(tr, spec, 1, ctx.slo.boundary, ctx.warmup))
    assert ("stopped" in fast) == (count < 20)
    if "stopped" in fast:
        assert not ok(full, ctx.tg, ctx.slo) and not ok(fast, ctx.tg, ctx.slo)
    else:
        for k in ("sim_wall_s", "sim_req_per_s"):
            fast.pop(k), full.pop(k)
        assert fast == full


def test_miss_rule_order_statistic_bound():
    """The rule fires exactly when enough requests are over target that the
    P99 (numpy's linear percentile) must be over it."""
    n = 1000
    arrival = np.zeros(n)
    rule = MissRule(arrival, np.zeros(n, dtype=int), np.ones(n, dtype=bool), np.zeros(n, dtype=bool),
                    [1000.0, 1000.0], 10.0)
    need = rule.classes[0][2]
    for over in (need - 1, need):
        ft = [0.5] * (n - over) + [2.0] * over
        fired = rule.check(0.0, ft, [0] * n) is not None
        assert fired == (over >= need)
        if fired:  # whatever the other requests' TTFTs, the P99 is over 1,000 ms
            assert 1e3 * np.percentile(np.array(ft[: n - over] + [2.0] * over), 99) > 1000.0
    # a request still waiting counts with TTFT >= now - arrival
    assert rule.check(1.5, [float("nan")] * n, [0] * n) is not None
    assert rule.check(0.9, [float("nan")] * n, [0] * n) is None
    # preemptions only grow: past the SLO the run misses
    assert rule.check(0.0, [0.1] * n, [1] * 11 + [0] * (n - 11)) == "preemptions"


def test_miss_rule_tpot_counts_unfinished_requests_from_their_first_token():
    n = 1000
    out = np.full(n, 11)  # 10 token gaps each
    rule = MissRule(np.zeros(n), np.zeros(n, dtype=int), np.ones(n, dtype=bool), np.zeros(n, dtype=bool),
                    [1e9, 1e9], 10.0, out, [100.0, 100.0])
    ft = [0.1] * n
    # not finished at t = 1.0: TPOT >= (1.0 - 0.1) / 10 = 90 ms, not surely over 100 ms
    assert rule.check(1.0, ft, [0] * n, [float("nan")] * n) is None
    # at t = 1.2 every one is surely over (>= 110 ms)
    assert rule.check(1.2, ft, [0] * n, [float("nan")] * n) == "tpot class 0"
    # finished ones count with their own TPOT (50 ms here), so no miss
    assert rule.check(5.0, ft, [0] * n, [0.6] * n) is None
    # one-token requests have no TPOT (metrics: requests with >= 2 output tokens)
    rule1 = MissRule(np.zeros(n), np.zeros(n, dtype=int), np.ones(n, dtype=bool), np.zeros(n, dtype=bool),
                     [1e9, 1e9], 10.0, np.ones(n, dtype=int), [100.0, 100.0])
    assert rule1.check(100.0, ft, [0] * n, [float("nan")] * n) is None


def test_over_capacity_stops_before_the_first_step():
    tr, ctx = _case(n=600)
    r = simulate(perturb(tr, 0), FleetSpec((PoolSpec("all", CFG, 1),)), seed=0,
                 stop=_over_capacity_rule(tr, ctx))
    assert r.stopped.startswith("over capacity")
    assert sum(s["steps"] for s in r.inst_stats) == 0


def _over_capacity_rule(tr, ctx):
    from extproc.planner.sizing.workers import miss_rule
    return miss_rule(tr, EvalJob(tr, FleetSpec((PoolSpec("all", CFG, 1),)), 0, ctx.slo.boundary,
                                 ctx.warmup, _stop(ctx)))


def test_throughput_estimate_does_not_thrash_and_ranks_larger_step_budgets_higher():
    """Long prompts (Mooncake-like: 15K-token mean against a 475K-token KV
    cache): the estimate is the cost model's busy time at a batch the KV cache
    holds, so it rises with the step budget; the old offline run (every
    request queued at t=0) thrashed and ranked them backwards."""
    tr = synthetic(800, 1.0, 15000, 300, seed=3, max_total=120000, name="long")
    mus = []
    for mbt in (2048, 4096, 8192, 16384):
        cfg = CFG.with_(max_num_batched_tokens=mbt).validate()
        mu = closed_form.throughput(cfg, tr)
        s = closed_form.sample(tr)
        fit = (s.prompt + s.output) <= cfg.max_model_len
        pre, dec = busy_seconds(cfg, s.prompt[fit], s.output[fit])
        assert mu == pytest.approx(fit.sum() / (pre + dec))
        mus.append(mu)
    assert mus == sorted(mus) and mus[-1] > mus[0]
    # the offline run's thrashing, for the record: recomputed tokens beyond the prompts
    s = closed_form.sample(tr, 300)
    r = simulate(s, FleetSpec((PoolSpec("m", CFG, 1),)))
    assert r.inst_stats[0]["recomputed_tokens"] > 0.5 * s.prompt.sum()


def test_default_grid_spans_2k_to_16k_step_budgets():
    assert {2048, 4096, 8192, 16384} <= set(SEARCH_MBTS)


def test_screen_count_is_cheaper_than_the_best_by_more_than_the_tolerance():
    from extproc.planner.sizing.bisect import SIZE_TOLERANCE
    for best_n in (10, 100, 740):
        best = cost(CFG, best_n)
        n = screen_count(CFG, best)
        bar = best * (1 - SIZE_TOLERANCE)
        assert cost(CFG, n) < bar <= cost(CFG, n + 1)
    assert screen_count(CFG, cost(CFG, 1)) == 0


def test_pruned_candidates_are_dominated():
    """A single-pool candidate pruned by the second wave, sized in full
    anyway, needs more instances than the count it was screened at (cheaper
    than the best single pool by more than the search's resolution)."""
    from extproc.planner.sizing.plan import plan
    tr = synthetic(500, 4, 2500, 200, seed=7, max_total=60000, name="small")
    res = plan(tr, b_shorts=[8192], workers=1, verify=False)
    singles = [p for o, p in res.sized if o.role in ("homogeneous", "baseline")]
    pruned = [x for x in res.pruned if x.owner.role == "homogeneous" and x.count > 0]
    assert pruned, "nothing pruned: the test would test nothing"
    assert all(x.best_cost >= min(p.cost for p in singles if p.feasible) for x in pruned)
    x = pruned[0]
    job = SizingJob("all", "all", x.cfg, x.mu, res.search)
    full = size_pool(job, res.inputs.ctx, early_exit=False)
    assert full.count > x.count  # it misses where it was screened: it cannot beat the best by more than 2%


def test_a_pool_whose_max_model_len_rejects_nothing_runs_as_the_single_pool():
    """The cache behind the sizing and the verification (`workers.run_key`,
    `presize.size_key`): a split's short pool that gets every request is the
    single pool under another name and max_model_len, so one run serves both,
    and the summary handed to each is the one its own run would give."""
    from extproc.planner.sizing.workers import Workers, evaluate_unique
    tr, ctx = _case(n=400)
    assert int(tr.total.max()) <= 60000
    short = Baseline(max_model_len=65536).config("llama-3-70b")
    specs = [FleetSpec((PoolSpec("all", CFG, 20),)), FleetSpec((PoolSpec("short", short, 20),))]
    jobs = [EvalJob(tr, sp, 1, ctx.slo.boundary, ctx.warmup) for sp in specs]
    cache: dict = {}
    shared = evaluate_unique(Workers(1), jobs, cache)
    assert len(cache) == 1
    for got, job in zip(shared, jobs):
        own = evaluate(job)
        for s in (got, own):
            s.pop("sim_wall_s"), s.pop("sim_req_per_s")
        assert got == own
    # a max_model_len that rejects some requests is its own run
    tight = Baseline(max_model_len=8192).config("llama-3-70b")
    evaluate_unique(Workers(1), [EvalJob(tr, FleetSpec((PoolSpec("short", tight, 20),)), 1, ctx.slo.boundary)], cache)
    assert len(cache) == 2


def test_second_wave_screens_split_tiers_when_asked(monkeypatch):
    """The second wave is per role: a split tier's other step budgets are
    screened against that tier's best when its role is listed."""
    from extproc.planner.sizing import plan as P
    monkeypatch.setattr(P, "SECOND_WAVE_ROLES", ("homogeneous", "short", "long"))
    tr = synthetic(300, 3, 2500, 200, seed=5, max_total=60000, name="small")
    res = P.plan(tr, b_shorts=[8192], workers=1, verify=False)
    assert {x.owner.role for x in res.pruned} | {o.role for o, _ in res.sized[5:]} >= {"short"}

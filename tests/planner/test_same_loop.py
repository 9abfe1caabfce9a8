"""One closed loop, three drivers: the planner's fleet simulator and
``budget-router replay`` make the same decisions as the service's Router when
fed the same signals. The planner's decisions (with the tier loads it observed
from its simulated instances) are replayed through ``replay_lines``; if either
driver had its own spillover or threshold logic, the tiers would differ."""

from __future__ import annotations

import io

import orjson

from extproc.core.router import Router
from extproc.planner.sim.fleet import FleetSpec, PoolSpec, simulate
from extproc.planner.sim.hardware import make_config
from extproc.planner.sim.traces import synthetic
from extproc.tools.replay import Summary, replay_lines


def test_planner_and_replay_decide_alike_on_the_same_signals():
    tr = synthetic(1500, 60, 1500, 300, seed=11, max_total=30000)
    short = make_config("a100", "llama-3-70b", max_model_len=4096, max_num_seqs=16)
    medium = make_config("a100", "llama-3-70b", max_model_len=16384, max_num_seqs=16)
    long = make_config("a100", "llama-3-70b", max_model_len=32768)
    spec = FleetSpec((PoolSpec("short", short, 1), PoolSpec("tier1", medium, 1), PoolSpec("long", long, 2)),
                     b_short=4096, limits=(4096, 16384), spillover=True, adaptive=True)
    r = simulate(tr, spec, log=True)
    hook = r.loop
    assert isinstance(hook.router, Router)
    assert r.spilled > 0, "the scenario should make the short tier spill"
    moved = {lim for _, lim in hook.limits_path} - {(4096, 16384)}
    assert moved, "the scenario should move a boundary"
    scrapes = {t: loads for t, loads in hook.observed}
    lines = []
    for k, (t, _, _) in enumerate(hook.log):
        rec = {"path": "/v1/completions",
               "body": {"model": "m", "prompt": [1] * int(tr.prompt[k]), "max_tokens": int(tr.output[k])}}
        if t in scrapes:
            rec["t"] = t
            rec["load"] = {l.name: {"instances": l.instances, "running": l.running, "waiting": l.waiting,
                                    "kv_usage": l.kv_usage, "preemption_rate": l.preemption_rate}
                           for l in scrapes.pop(t) if l.known}
        lines.append(orjson.dumps(rec))
    replayed = Router(hook.cfg)
    out = io.BytesIO()
    replay_lines(replayed, lines, out, Summary())
    rows = [orjson.loads(x) for x in out.getvalue().splitlines()]
    names = [t.name for t in hook.cfg.tiers]
    assert [row["pool"] for row in rows] == [names[j] for _, _, j in hook.log]
    assert sum("from_pool" in row for row in rows) == r.spilled
    assert replayed.spillover.spilled == hook.router.spillover.spilled
    assert replayed.threshold.history == hook.router.threshold.history

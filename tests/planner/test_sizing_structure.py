"""The sizing package stays readable and typed (issue 15): short functions,
no import of `report`, frozen data, cache keys that are values, not reprs."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from extproc.planner.sim.fleet import FleetSpec, PoolSpec
from extproc.planner.sim.hardware import make_config
from extproc.planner.sim.traces import synthetic
from extproc.planner.sizing import design as D
from extproc.planner.sizing.workers import EvalJob, evaluate_unique, Workers

SIZING = Path(__file__).resolve().parents[2] / "extproc" / "planner" / "sizing"

#: Longest function allowed in sizing/ (issue 15: "no function over ~80 lines").
MAX_FUNCTION_LINES = 80


def _modules():
    return sorted(SIZING.glob("*.py"))


def test_no_long_function_in_sizing():
    long = [f"{p.name}:{n.name} {n.end_lineno - n.lineno + 1} lines"
            for p in _modules() for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_sizing_never_imports_report():
    for p in _modules():
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom):
                assert "report" not in (n.module or ""), f"{p.name} imports {n.module}"


@pytest.mark.parametrize("cls", [D.SizingContext, D.SizingJob, D.SizedPool, D.Design, D.Verified,
                                 D.Judged, D.Inputs])
def test_design_data_is_frozen(cls):
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


def test_cache_keys_are_values():
    cfg = make_config("a100", "llama-3-70b", max_model_len=8192)
    a = FleetSpec((PoolSpec("p", cfg, 2),))
    b = FleetSpec((PoolSpec("p", make_config("a100", "llama-3-70b", max_model_len=8192), 2),))
    c = FleetSpec((PoolSpec("p", cfg, 3),))
    tr = synthetic(30, 2, 500, 20, seed=1)
    ja, jb, jc = (EvalJob(tr, s, 0, 8192) for s in (a, b, c))
    assert ja.key == jb.key and hash(ja.key) == hash(jb.key) and ja.key != jc.key
    # the sizing's own key (`presize.size_key`): same requests, same config as a run can tell it
    from extproc.planner.sizing.presize import size_key
    ka, kb = (size_key(D.SizingJob("all", "all", c, 1.0, tr)) for c in (cfg, make_config("a100", "llama-3-70b",
                                                                                          max_model_len=8192)))
    assert ka == kb and hash(ka) == hash(kb)
    # equal keys share one simulation; a different fleet is simulated
    cache: dict = {}
    ra, rb, rc = evaluate_unique(Workers(1), [ja, jb, jc], cache)
    assert len(cache) == 2 and ra is rb and rc is not ra


def test_a_design_grows_into_a_new_value():
    cfg = make_config("a100", "llama-3-70b", max_model_len=8192)
    d = D.Design("split-8192", "split", (D.SizedPool("short", cfg, 3, True, 1.0, 1.0),
                                         D.SizedPool("long", cfg, 5, True, 1.0, 1.0)), "x", b_short=8192,
                 limits=(8192,))
    g = d.with_count(1, 6)
    assert [p.count for p in d.pools] == [3, 5] and [p.count for p in g.pools] == [3, 6]
    assert g.spec("oracle", 0.1, "least-request").tier_limits == (8192,)
    assert d.gpus == 8 * cfg.tp and g.cost > d.cost
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.pools[0].count = 4

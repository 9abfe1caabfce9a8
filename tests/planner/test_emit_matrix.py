"""`plan --balancer realistic --emit`: the emitted deployment names the
balancer the recommended design was sized under (not the matrix), so
`simulate --deployment` re-simulates it as planned."""
import argparse
import json

import numpy as np

from extproc.planner.cli import add_parsers
from extproc.planner.sim.balancers import REALISTIC_BALANCERS


def test_matrix_emit_carries_the_recommended_balancer_and_resimulates(tmp_path, capsys):
    ap = argparse.ArgumentParser()
    add_parsers(ap.add_subparsers(dest="cmd"))
    f = tmp_path / "m.jsonl"
    rng = np.random.default_rng(1)
    f.write_text("".join(f'{{"timestamp": {i * 250}, "input_length": {int(rng.integers(100, 20000))}, '
                         f'"output_length": {int(rng.integers(10, 300))}}}\n' for i in range(200)))
    out, dep_dir = tmp_path / "p", tmp_path / "deploy"
    args = ap.parse_args(["plan", "--trace", str(f), "--b-short", "8192", "--max-num-seqs", "256",
                          "--max-num-batched-tokens", "8192", "--seeds", "1", "--workers", "1",
                          "--p99-horizon", "0", "--balancer", "realistic", "--no-progress",
                          "--out", str(out), "--emit", str(dep_dir)])
    assert args.func(args) == 0
    res = json.loads((out / "plan.json").read_text())
    dep = json.loads((dep_dir / "deployment.json").read_text())
    assert res["balancer"] == "matrix"
    assert dep["balancer"] == res["recommendation"]["balancer"] and dep["balancer"] in REALISTIC_BALANCERS
    capsys.readouterr()
    args = ap.parse_args(["simulate", "--deployment", str(dep_dir / "deployment.json"), "--trace", str(f),
                          "--p99-horizon", "0", "--no-progress", "--out", str(tmp_path / "sim")])
    assert args.func(args) == 0
    sim = json.loads((tmp_path / "sim" / "simulate.json").read_text())
    assert sim["deployment"] == res["recommendation"]["design"]

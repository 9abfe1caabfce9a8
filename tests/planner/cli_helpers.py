"""Shared set-up of the planner CLI tests: the parser and a synthetic trace."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from extproc.planner.cli import add_parsers


def plan_parser() -> argparse.ArgumentParser:
    """The project CLI's `plan` and `simulate` subcommands on a fresh parser."""
    ap = argparse.ArgumentParser()
    add_parsers(ap.add_subparsers(dest="cmd"))
    return ap


def synthetic_trace(path: Path, n: int, *, seed: int, gap_ms: int, max_output: int) -> Path:
    """A Mooncake-format trace of ``n`` requests ``gap_ms`` apart, prompts
    uniform in [100, 20000) tokens and outputs in [10, max_output)."""
    rng = np.random.default_rng(seed)
    path.write_text("".join(f'{{"timestamp": {i * gap_ms}, "input_length": {int(rng.integers(100, 20000))}, '
                            f'"output_length": {int(rng.integers(10, max_output))}}}\n' for i in range(n)))
    return path


def small_plan_argv(trace: Path, seeds: int, *extra: str) -> list[str]:
    """`plan` on ``trace`` with the tests' small fixed search (b_short 8192,
    256 seqs, step budget 8192), one worker, no progress, then ``extra``."""
    return ["plan", "--trace", str(trace), "--b-short", "8192", "--max-num-seqs", "256",
            "--max-num-batched-tokens", "8192", "--seeds", str(seeds), "--workers", "1", "--no-progress", *extra]

"""Shared fixtures. Keep this generic: other test files may add their own."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `pytest` run without the project installed
    sys.path.insert(0, str(ROOT))
# The stack's processes run `python -m extproc.cli ...`: let them import the
# project whatever the current directory is.
if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def start_stack(cfg, workdir: str, *, time_scale: float = 0.0, own_pools: bool = True, **stack_kw):
    """Start an ``extproc.tools.stack.Stack`` with its components started in parallel
    (pools, router and Envoy each wait for their own readiness; Envoy's wait
    covers the router's health check). ``own_pools=False`` starts only the
    router and Envoy: ``cfg``'s pool endpoints must already be serving."""
    from extproc.tools.stack import Stack

    stack = Stack(cfg, workdir=workdir, time_scale=time_scale, **stack_kw)
    jobs = []
    if own_pools:
        jobs += [lambda name=t.name: stack.start_pool(name) for t in cfg.tiers]
    jobs.append(stack.start_router)
    errors: list[BaseException] = []

    def run(job):
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j,), daemon=True) for j in jobs]
    for t in threads:
        t.start()
    # Envoy from the calling thread: Envoy gets SIGTERM when the *thread* that
    # spawned it exits (parent-death signal), so never from a worker thread.
    run(stack.start_envoy)
    for t in threads:
        t.join(timeout=60)
    if errors or any(t.is_alive() for t in threads):
        tails = "\n".join(f"--- {n} ---\n{stack.log_tail(n, 20)}" for n in list(stack.logs))
        stack.stop()
        raise RuntimeError(f"stack did not start: {errors!r}\n{tails}")
    return stack


@pytest.fixture(scope="module")
def stack_factory(tmp_path_factory):
    """``make(pools_from=None, workers=None, time_scale=0.0, **sections)``:
    a running stack on free loopback ports with its own state file, stopped
    at the end of the module. ``sections`` go to ``Config.replace`` (e.g.
    ``router={"sample_rate": 1.0}``). ``pools_from=<stack>`` reuses that
    stack's two simulated pools (saves their start-up; their max_model_len
    is taken over) instead of starting new ones."""
    from extproc.tools.stack import loopback_config

    stacks = []

    def make(*, pools_from=None, workers: int | None = None, time_scale: float = 0.0, **sections):
        workdir = str(tmp_path_factory.mktemp("stack"))
        router = {"state_file": os.path.join(workdir, "state.json"), **sections.pop("router", {})}
        cfg = loopback_config(workers=workers, router=router, **sections)
        if pools_from is not None:
            src = pools_from.cfg
            cfg = cfg.replace(
                long={"endpoints": src.long.endpoints, "max_model_len": src.long.max_model_len},
                short={"endpoints": src.short.endpoints, "max_model_len": src.short.max_model_len},
            )
        stack = start_stack(cfg, workdir, time_scale=time_scale, own_pools=pools_from is None)
        stacks.append(stack)
        return stack

    yield make
    for s in reversed(stacks):  # pool owners were created first: stop them last
        s.stop()

"""Fleet planner: trace loaders, a per-iteration vLLM instance model, a fleet
simulator with routers and balancers, metrics, the closed-form cost model and
the pool-sizing planner behind ``budget-router plan`` / ``simulate``.

Everything below ``cli.py`` is pure and deterministic for a seed.

May import: ``extproc.core`` (the planner routes with the router's own policy
objects), ``extproc.config``/``defaults``, numpy, matplotlib (plots). Must not
import ``extproc.serve``, ``tools`` or ``cli``.
"""

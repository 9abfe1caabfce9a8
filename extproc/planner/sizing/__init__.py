"""Sizing: the smallest fleet of each design that meets the SLOs, and which
design to run. Imports ``planner.sim``; never ``report``, ``serve`` or ``tools``.

One module per step, in the order `plan.plan` runs them:
``space`` (baseline, config grid, tiers) -> ``traffic`` (search window, routes
per B_short) -> ``presize`` (analytic throughput, candidates, sizing jobs) ->
``bisect`` (smallest count per pool) -> ``closed_loop`` (splits with spillover
/ adaptive) -> ``verify`` (whole trace, every seed) -> ``recommend``.
``design`` holds the typed, frozen data they pass (job, sized pool, design,
verified, judged); ``slo`` the targets; ``closed_form`` the paper's model;
``workers`` the process pool and its typed cache keys.
"""

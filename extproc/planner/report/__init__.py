"""Reporting a plan: plan.json (``plan_json``: a typed plan as JSON, in one
place), the text table (``text``), PNG plots (``plots``) and the deployment
files ``--emit`` writes (``emit``). Imports ``planner.sim``/``sizing``,
``config`` and the Envoy renderer."""

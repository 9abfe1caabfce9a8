"""Reporting a plan: text, plots, and the deployment files ``--emit`` writes.
Imports ``planner.sim``/``sizing``, ``config`` and the Envoy renderer."""

"""Commands built on the rest: ``stack`` (``budget-router up``: Envoy, router
and pools as local processes), ``demo`` with its traffic (``demo_traffic``),
and ``replay`` (a request log through the core, offline).

May import everything in the package (core, serve, envoy, backend, planner,
admin); nothing but ``extproc.cli`` imports from here.
"""

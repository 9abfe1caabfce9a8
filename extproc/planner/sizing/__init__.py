"""Sizing: the search space, bisection to the smallest fleet that meets the
SLOs, the closed form, the recommendation. Imports ``planner.sim``; never
``report``, ``serve`` or ``tools``."""

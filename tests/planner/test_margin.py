"""The planner's noise router uses the router's own safety margin (issue 15
point 3: the planner had 2.0 sigmas where the router has 1.25)."""
from __future__ import annotations

import math

import pytest

from extproc import config as C
from extproc import defaults as D
from extproc.planner.sim import fleet


def test_planner_margin_constants_are_the_routers():
    policy = C.from_mapping({}).policy  # what a router started without a config file uses
    assert fleet.MARGIN_SIGMAS == policy.margin_sigmas == D.MARGIN_SIGMAS
    assert fleet.MIN_MARGIN == policy.min_margin == D.MIN_MARGIN


@pytest.mark.parametrize("p90", [0.001, 0.05, 0.10, 0.30])
def test_noise_router_margin_follows_the_routers_rule(p90):
    # MARGIN_SIGMAS x the error's spread, floored at MIN_MARGIN: the rule of core.policy
    spread = fleet.noise_sigma(p90) * math.sqrt(2 / math.pi)
    assert fleet.default_margin(p90) == pytest.approx(max(D.MIN_MARGIN, D.MARGIN_SIGMAS * spread))

"""Plan round-trips: what to_json / to_dict write, from_json / from_dict read back unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import layerswap_fast as lsf
from layerswap_fast.plan import Plan


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_plan_round_trips_through_json_and_dict(trio: dict[str, Path], granularity: str) -> None:
    plan = lsf.analyze(trio["base"], trio["safety"], trio["expert"], granularity=granularity, tau=0.01)
    assert plan.stats, "the analysis carries its statistics"
    assert Plan.from_dict(plan.to_dict(with_stats=True)) == plan
    assert Plan.from_dict(plan.to_dict()) == dataclasses.replace(plan, stats=())
    assert Plan.from_json(plan.to_json()) == dataclasses.replace(plan, stats=())
    assert Plan.from_json(plan.to_json(indent=None)).to_json() == plan.to_json()

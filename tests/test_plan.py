"""Plan round-trips: what to_json / to_dict write, from_json / from_dict read back unchanged."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

import layerswap_fast as lsf
from layerswap_fast import Plan


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_plan_round_trips_through_json_and_dict(trio: dict[str, Path], granularity: str) -> None:
    plan = lsf.analyze(trio["base"], trio["safety"], trio["expert"], granularity=granularity, tau=0.01)
    assert plan.stats, "the analysis carries its statistics"
    without_stats = Plan.from_dict(plan.to_dict(with_stats=True) | {"stats": []})
    assert Plan.from_dict(plan.to_dict(with_stats=True)) == plan
    assert Plan.from_dict(plan.to_dict()) == without_stats and not without_stats.stats
    assert Plan.from_dict(plan.to_dict(), list(plan.stats)) == plan
    assert Plan.from_json(plan.to_json()) == without_stats
    assert Plan.from_json(plan.to_json(indent=None)).to_json() == plan.to_json()
    assert pickle.loads(pickle.dumps(plan)) == plan
    for u in plan.units:
        assert lsf.UnitDecision.from_dict(u.to_dict()) == u and pickle.loads(pickle.dumps(u)) == u
    for s in plan.stats:
        assert lsf.TensorStats.from_dict(s.to_dict()) == s and pickle.loads(pickle.dumps(s)) == s

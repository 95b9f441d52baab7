"""The plan: per unit, the scores, p_S, p_M, d and the decision, exactly as the engine thresholded them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class UnitDecision:
    """One unit (a decoder layer, or its attention or MLP) and what was decided for it.

    Attributes:
        layer: decoder layer index.
        part: ``None`` for a whole layer, ``"attention"`` or ``"mlp"`` in module granularity.
        score_safety, score_expert: raw scores A_S(u), A_M(u).
        p_safety, p_expert: normalised scores p_S(u), p_M(u).
        d: p_S − p_M.
        decision: ``"safety"``, ``"expert"`` or ``"blend"``.
        alpha: the safety expert's weight when the decision is a blend, else None.
        source: where the decision came from: ``measured`` (d and τ), ``band``, ``file`` or ``override``.
    """

    layer: int
    part: Optional[str]
    score_safety: float
    score_expert: float
    p_safety: float
    p_expert: float
    d: float
    decision: str
    alpha: Optional[float] = None
    source: str = "measured"

    @property
    def label(self) -> str:
        return f"layer {self.layer}" if self.part is None else f"layer {self.layer} {self.part}"


@dataclass(frozen=True)
class TensorStats:
    """Sums of squares of one measured tensor: Σ B², Σ (S − B)² and Σ (M − B)²."""

    name: str
    numel: int
    base_ss: float
    safety_ss: float
    expert_ss: float

    @property
    def diff_ss(self) -> tuple[float, float]:
        """(Σ (S − B)², Σ (M − B)²)."""
        return (self.safety_ss, self.expert_ss)


@dataclass(frozen=True)
class Plan:
    """Decisions for one language expert.

    Attributes:
        options: the engine options the plan was made with (granularity, tau, alpha, numerics, ...).
        layout: name of the detected layout.
        n_layers: number of decoder layers.
        units: one :class:`UnitDecision` per unit, in order.
        stats: the per-tensor statistics behind the scores.
    """

    options: dict[str, Any]
    layout: str
    n_layers: int
    units: tuple[UnitDecision, ...]
    stats: tuple[TensorStats, ...] = field(default=(), repr=False)

    @classmethod
    def from_engine(cls, plan: dict[str, Any]) -> "Plan":
        units = tuple(UnitDecision(**u) for u in plan["units"])
        ts = tuple(TensorStats(**s) for s in plan.get("stats", ()))
        return cls(plan["options"], plan["layout"], plan["n_layers"], units, ts)

    @classmethod
    def from_dict(cls, d: dict[str, Any], stats: tuple[TensorStats, ...] = ()) -> "Plan":
        """The inverse of :meth:`to_dict` (units may carry ``alpha`` and ``source``); the statistics
        come from ``d["stats"]`` when it has them (``to_dict(with_stats=True)``), else from ``stats``."""
        if "stats" in d:
            stats = tuple(TensorStats(**s) for s in d["stats"])
        return cls(d["options"], d["layout"], d["n_layers"], tuple(UnitDecision(**u) for u in d["units"]), stats)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """The inverse of :meth:`to_json` (which leaves the statistics out)."""
        return cls.from_dict(json.loads(text))

    @property
    def granularity(self) -> str:
        return self.options["granularity"]

    def decisions(self) -> list[str]:
        """The decision of every unit, in unit order."""
        return [u.decision for u in self.units]

    def counts(self) -> dict[str, int]:
        """Units per decision."""
        out = {"safety": 0, "expert": 0, "blend": 0}
        for u in self.units:
            out[u.decision] += 1
        return out

    def to_dict(self, with_stats: bool = False) -> dict[str, Any]:
        d = {"options": self.options, "layout": self.layout, "n_layers": self.n_layers, "units": [asdict(u) for u in self.units]}
        if with_stats:
            d["stats"] = [asdict(s) for s in self.stats]
        return d

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

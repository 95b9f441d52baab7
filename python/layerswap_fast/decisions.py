"""Decision control: per-unit overrides, fixed bands with transition zones, decisions files and the τ
sweep. Pure Python over the plan's units (no tensor data): the engine measures and writes, this
module only says, per unit, what to take and where that choice came from.

Every unit of a plan ends with three fields:

- ``decision``: ``safety``, ``expert`` or ``blend``;
- ``alpha``: the safety expert's weight when the decision is a blend (``None`` otherwise);
- ``source``: ``measured`` (the paper's rule on d and τ), ``band`` (``select="bands"``), ``file`` (a
  decisions file given to ``merge --decisions``) or ``override`` (``--override``, applied last).

Grammar of an override, ``UNITS=DECISION``:

- ``UNITS``: ``N`` (layer N: in module granularity both its attention and its MLP), ``A-B`` (layers A
  to B inclusive), ``N.attn`` / ``N.mlp`` / ``A-B.attn`` / ``A-B.mlp`` (module granularity), or
  ``*.attn`` / ``*.mlp`` (every layer's attention / MLP, module granularity);
- ``DECISION``: ``safety``, ``expert``, ``blend`` (the run's α) or ``blend:α`` (0 ≤ α ≤ 1).

Later overrides win over earlier ones.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from layerswap_fast.errors import InvalidOptionError

DECISIONS = ("safety", "expert", "blend")
SOURCES = ("measured", "override", "file", "band")
SELECTS: tuple[str, ...] = ("adaptive", "bands")
#: Most τ values one sweep evaluates (each is a pass over the units, not over the models).
MAX_SWEEP = 100_000

_PARTS = {"attn": "attention", "mlp": "mlp"}
_UNITS = re.compile(r"^(?:(?P<star>\*)|(?P<first>\d+)(?:-(?P<last>\d+))?)(?:\.(?P<part>attn|mlp))?$")

UnitKey = tuple[int, Optional[str]]
OverridesLike = Union[None, str, Mapping[str, str], Iterable[Union[str, Sequence[str]]]]


@dataclass(frozen=True)
class Choice:
    """A decision for a unit; ``alpha`` None means the run's α (only meaningful for a blend)."""

    decision: str
    alpha: Optional[float] = None


@dataclass(frozen=True)
class UnitSpec:
    """The ``UNITS`` side of an override, as written: layers ``first..last`` (both None for ``*``),
    and ``part`` (``attention``, ``mlp``, or None for whole layers)."""

    text: str
    first: Optional[int]
    last: Optional[int]
    part: Optional[str]


def parse_decision(text: str, *, context: Optional[str] = None) -> Choice:
    """``safety``, ``expert``, ``blend`` or ``blend:α``; ``context`` starts the error message.

    Raises:
        InvalidOptionError: anything else, or α outside [0, 1].
    """
    where = context or f"decision {text!r}"
    t = str(text).strip()
    if t in DECISIONS:
        return Choice(t)
    head, sep, tail = t.partition(":")
    if head == "blend" and sep:
        try:
            alpha = float(tail)
        except ValueError:
            alpha = math.nan
        if not (0.0 <= alpha <= 1.0):
            raise InvalidOptionError(f"{where}: the blend weight must be a number between 0 and 1")
        return Choice("blend", alpha)
    raise InvalidOptionError(f"{where}: the decision must be safety, expert, blend or blend:ALPHA")


def parse_units(text: str, *, context: Optional[str] = None) -> UnitSpec:
    """The syntax of ``UNITS`` (which units exist is checked by :func:`resolve_units`); ``context``
    starts the error message.

    Raises:
        InvalidOptionError: not ``N``, ``A-B``, ``N.attn``, ``N.mlp``, ``A-B.attn``, ``A-B.mlp``,
            ``*.attn`` or ``*.mlp``, or a range whose end is below its start.
    """
    where = context or f"units {text!r}"
    t = str(text).strip()
    m = _UNITS.match(t)
    if not m or (m["star"] and not m["part"]):
        raise InvalidOptionError(f"{where}: the units must be N, A-B, N.attn, N.mlp, A-B.attn, A-B.mlp, *.attn or *.mlp")
    part = _PARTS[m["part"]] if m["part"] else None
    if m["star"]:
        return UnitSpec(t, None, None, part)
    first = int(m["first"])
    last = int(m["last"]) if m["last"] is not None else first
    if last < first:
        raise InvalidOptionError(f"{where}: the range of layers ends before it starts")
    return UnitSpec(t, first, last, part)


def parse_override(item: Union[str, Sequence[str]]) -> tuple[UnitSpec, Choice]:
    """One override: ``"UNITS=DECISION"`` or a pair ``(UNITS, DECISION)``."""
    if isinstance(item, str):
        units, sep, decision = item.partition("=")
        if not sep:
            raise InvalidOptionError(f"override {item!r} must be UNITS=DECISION (e.g. 3=safety, 2-4.mlp=blend:0.25)")
    else:
        if len(item) != 2:
            raise InvalidOptionError(f"override {item!r} must be a pair (UNITS, DECISION)")
        units, decision = item
    context = f"override '{units}={decision}'"
    return parse_units(units, context=context), parse_decision(decision, context=context)


def normalize_overrides(value: OverridesLike) -> tuple[tuple[str, str], ...]:
    """Overrides in any accepted form as ``((UNITS, DECISION), ...)`` in order, syntax checked.

    Accepts a mapping ``{"3": "safety", "2.mlp": "blend:0.25"}`` (insertion order), a list of
    ``"UNITS=DECISION"`` strings or ``(UNITS, DECISION)`` pairs, or one such string.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, Mapping):
        items = [(str(k), str(v)) for k, v in value.items()]
    else:
        items = list(value)
    out = []
    for item in items:
        spec, _ = parse_override(item)
        decision = item.partition("=")[2] if isinstance(item, str) else item[1]
        out.append((spec.text, str(decision).strip()))
    return tuple(out)


def unit_label(key: UnitKey) -> str:
    """``3`` or ``3.attn`` / ``3.mlp``: a unit in the override grammar."""
    layer, part = key
    return str(layer) if part is None else f"{layer}.{'attn' if part == 'attention' else 'mlp'}"


def unit_keys(n_layers: int, granularity: str) -> list[UnitKey]:
    """The units of a model in plan order."""
    if granularity == "layer":
        return [(i, None) for i in range(n_layers)]
    return [(i, p) for i in range(n_layers) for p in ("attention", "mlp")]


def resolve_units(spec: UnitSpec, n_layers: int, granularity: str, *, context: Optional[str] = None) -> list[UnitKey]:
    """The units ``spec`` names in a model of ``n_layers`` layers; ``context`` starts the error message.

    Raises:
        InvalidOptionError: naming the unit that does not exist (a layer out of range, or ``.attn`` /
            ``.mlp`` in layer granularity).
    """
    where = context or f"units {spec.text!r}"
    if spec.part is not None and granularity == "layer":
        raise InvalidOptionError(
            f"{where}: unit {spec.text} does not exist in layer granularity (attention and MLP units need --granularity module)"
        )
    if spec.first is None:
        layers = range(n_layers)
    else:
        assert spec.last is not None
        if spec.last >= n_layers:
            bad = max(spec.first, n_layers)  # the first layer named that is not there
            raise InvalidOptionError(f"{where}: layer {bad} does not exist (the model has {n_layers} layers, 0-{n_layers - 1})")
        layers = range(spec.first, spec.last + 1)
    if granularity == "layer":
        return [(i, None) for i in layers]
    parts = (spec.part,) if spec.part else ("attention", "mlp")
    return [(i, p) for i in layers for p in parts]


# --- fixed bands (Bandarkar et al.) ---------------------------------------------------------------


def parse_bands(value: Union[None, str, Sequence[int]]) -> Optional[tuple[int, int, int]]:
    """``"BOTTOM,TOP[,TRANSITION]"`` or a sequence of two or three integers ≥ 0."""
    if value is None:
        return None
    parts: list[Any] = str(value).split(",") if isinstance(value, str) else list(value)
    try:
        nums = [int(str(p).strip()) for p in parts]
        if any(isinstance(p, float) and not float(p).is_integer() for p in parts):
            raise ValueError
    except (ValueError, TypeError):
        nums = []
    if len(nums) not in (2, 3) or any(n < 0 for n in nums):
        raise InvalidOptionError(f"bands {value!r} must be BOTTOM,TOP or BOTTOM,TOP,TRANSITION (integers >= 0)")
    return (nums[0], nums[1], nums[2] if len(nums) == 3 else 0)


def band_choices(n_layers: int, bands: tuple[int, int, int]) -> list[Choice]:
    """One choice per layer: ``[0, BOTTOM)`` and ``[L − TOP, L)`` from the language expert, the middle
    from the safety expert, and TRANSITION blended layers at each inner edge of the middle band, the
    j-th layer into the band (j = 1…T) weighing the safety expert α_j = j / (T + 1).

    Raises:
        InvalidOptionError: the bands and transitions do not fit in ``n_layers`` layers.
    """
    bottom, top, t = bands
    middle = n_layers - bottom - top
    if middle < 1 or 2 * t > middle:
        raise InvalidOptionError(
            f"bands {bottom},{top},{t} do not fit a {n_layers}-layer model: the middle band has {max(middle, 0)} layer(s) "
            f"and needs at least {max(1, 2 * t)} (two transition zones of {t})"
        )
    out = []
    for i in range(n_layers):
        if i < bottom or i >= n_layers - top:
            out.append(Choice("expert"))
            continue
        j = min(i - bottom, n_layers - top - 1 - i) + 1  # depth into the middle band, from its nearer edge
        out.append(Choice("blend", j / (t + 1)) if j <= t else Choice("safety"))
    return out


# --- applying the controls to a plan's units -------------------------------------------------------


def measured_decision(d: float, tau: float) -> str:
    """METHOD.md §4 on one unit's d: d > τ safety, d < −τ expert, otherwise (|d| ≤ τ) blend."""
    return "safety" if d > tau else "expert" if d < -tau else "blend"


def _set(unit: dict[str, Any], choice: Choice, source: str, alpha: float) -> None:
    unit["decision"] = choice.decision
    unit["alpha"] = (alpha if choice.alpha is None else choice.alpha) if choice.decision == "blend" else None
    unit["source"] = source


def apply(
    units: list[dict[str, Any]],
    *,
    n_layers: int,
    granularity: str,
    alpha: float,
    select: str = "adaptive",
    bands: Optional[tuple[int, int, int]] = None,
    overrides: Sequence[tuple[str, str]] = (),
    source: str = "measured",
    tau: Optional[float] = None,
) -> list[dict[str, Any]]:
    """The final decision of every unit: the units' own decisions (``source``: ``measured`` from the
    engine's plan, or ``file``), or the bands, then every override in order. With ``tau``, measured
    decisions are re-derived from each unit's d at that τ (for the sweep). Returns new unit dicts
    with ``decision``, ``alpha`` and ``source`` set.

    Raises:
        InvalidOptionError: a unit that does not exist, bands that do not fit, bands in module
            granularity.
    """
    keys = unit_keys(n_layers, granularity)
    out = [dict(u) for u in units]
    if [(u["layer"], u["part"]) for u in out] != keys:
        raise InvalidOptionError(f"the plan's units are not the {len(keys)} {granularity} units of a {n_layers}-layer model")
    for u in out:
        if source == "measured" and tau is not None:
            _set(u, Choice(measured_decision(u["d"], tau)), source, alpha)
        else:
            _set(u, Choice(u["decision"], u.get("alpha") if u["decision"] == "blend" else None), source, alpha)
    if select == "bands":
        if granularity != "layer":
            raise InvalidOptionError("select 'bands' works in layer granularity; drop --granularity module")
        if bands is None:
            raise InvalidOptionError("select 'bands' needs bands BOTTOM,TOP[,TRANSITION] (--bands)")
        for u, c in zip(out, band_choices(n_layers, bands)):
            _set(u, c, "band", alpha)
    index = {k: i for i, k in enumerate(keys)}
    for units_text, decision_text in overrides:
        spec, choice = parse_override((units_text, decision_text))
        for key in resolve_units(spec, n_layers, granularity, context=f"override '{units_text}={decision_text}'"):
            _set(out[index[key]], choice, "override", alpha)
    return out


def counts(units: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Units per decision."""
    out = {d: 0 for d in DECISIONS}
    for u in units:
        out[u["decision"]] += 1
    return out


# --- the τ sweep ----------------------------------------------------------------------------------


def parse_sweep(text: str) -> list[float]:
    """``A:B:N``: N values of τ evenly spaced from A to B, both included (N = 1 gives A).

    Raises:
        InvalidOptionError: not three fields, τ negative or not finite, B < A, N < 1.
    """
    parts = str(text).split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        a, b, n = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise InvalidOptionError(f"sweep {text!r} must be A:B:N (e.g. 0:0.01:11)") from None
    if not (math.isfinite(a) and math.isfinite(b) and 0 <= a <= b):
        raise InvalidOptionError(f"sweep {text!r}: tau must go from A to B with 0 <= A <= B, both finite")
    if not 1 <= n <= MAX_SWEEP:
        raise InvalidOptionError(f"sweep {text!r}: N must be between 1 and {MAX_SWEEP}")
    if n == 1:
        return [a]
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def sweep(units: list[dict[str, Any]], taus: Sequence[float], **controls: Any) -> list[dict[str, Any]]:
    """Decision counts at each τ from the measured d of every unit (one analyze pass for all),
    with the same bands and overrides applied: ``[{"tau": τ, "counts": {...}}, ...]``."""
    return [{"tau": t, "counts": counts(apply(units, tau=t, **controls))} for t in taus]


# --- decisions files ------------------------------------------------------------------------------


def load_decisions(path: Union[str, "os.PathLike[Any]"]) -> dict[str, Any]:
    """Reads a decisions file (the JSON ``analyze --json`` writes, possibly edited) and checks its
    shape: ``layout``, ``n_layers``, ``options.granularity`` (or ``granularity``) and every unit once,
    in order, with a valid decision and, for blends, an optional α in [0, 1].

    Returns:
        ``{"layout", "n_layers", "granularity", "units": [...]}`` with units' ``alpha`` None when the
        file gives none (then the run's α applies).

    Raises:
        InvalidOptionError: naming the file and what is wrong.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise InvalidOptionError(f"{p}: not a JSON decisions file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("units"), list):
        raise InvalidOptionError(f"{p}: a decisions file is the JSON object 'analyze --json' writes (with 'units')")
    granularity = data.get("granularity") or (data.get("options") or {}).get("granularity")
    layout, n_layers = data.get("layout"), data.get("n_layers")
    if granularity not in ("layer", "module") or not isinstance(layout, str) or not isinstance(n_layers, int) or n_layers < 1:
        raise InvalidOptionError(f"{p}: needs 'layout', 'n_layers' and the granularity ('options.granularity') of the plan")
    keys = unit_keys(n_layers, granularity)
    got = []
    for i, u in enumerate(data["units"]):
        if not isinstance(u, dict) or "layer" not in u or "decision" not in u:
            raise InvalidOptionError(f"{p}: unit #{i} needs 'layer', 'part' and 'decision'")
        got.append((u["layer"], u.get("part")))
    if got != keys:
        missing = [unit_label(k) for k in keys if k not in got]
        extra = [str(k) for k in got if k not in keys]
        detail = f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}" if extra else "out of order or repeated"
        raise InvalidOptionError(f"{p}: its units are not the {len(keys)} {granularity} units of a {n_layers}-layer model ({detail})")
    units = []
    for key, u in zip(keys, data["units"]):
        label = f"{p}: unit {unit_label(key)}"
        if u["decision"] not in DECISIONS:
            raise InvalidOptionError(f"{label}: decision {u['decision']!r} is not one of {', '.join(DECISIONS)}")
        alpha = u.get("alpha")
        if u["decision"] == "blend" and alpha is not None:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
                raise InvalidOptionError(f"{label}: alpha {alpha!r} must be a number between 0 and 1")
            alpha = float(alpha)
        # A hand-written file may leave the measured numbers out: they show as 0 (source "file" says why).
        nums = {k: float(u[k]) if isinstance(u.get(k), (int, float)) and not isinstance(u.get(k), bool) else 0.0
                for k in ("score_safety", "score_expert", "p_safety", "p_expert", "d")}
        units.append({"layer": key[0], "part": key[1], **nums, "decision": u["decision"],
                      "alpha": alpha if u["decision"] == "blend" else None, "source": "file"})
    return {"layout": layout, "n_layers": n_layers, "granularity": granularity, "units": units}

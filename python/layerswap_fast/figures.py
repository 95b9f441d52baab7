"""The paper's two figures, drawn with matplotlib (the ``plot`` extra) from the report dict alone:
the decision heatmap, and the ratio plot (p_S, p_M and d per unit with the ±τ blend band).

Unlike the authors' module-level figure, which normalises attention and MLP separately, the ratios
drawn here are exactly the values the decisions were thresholded on (one normalisation over all
units). Drawn on a :class:`matplotlib.figure.Figure` without pyplot, so no GUI backend is touched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from layerswap_fast.errors import InvalidOptionError
from layerswap_fast.report import COLOURS, fragile_units, unit_rows

#: File types the figures can be written as (by the file name's suffix).
FORMATS = (".png", ".svg", ".pdf")
DECISIONS = ("safety", "expert", "blend")


class PlotExtraMissing(ImportError):
    """matplotlib is not installed."""


def _matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotExtraMissing("drawing figures needs matplotlib: pip install 'layerswap-fast[plot]'") from None
    return Figure


def draw(report: dict[str, Any], path: Path, dpi: int = 150) -> Path:
    """Writes both figures (heatmap above, ratio plot below) to ``path``; the format is its suffix
    (``.png``, ``.svg`` or ``.pdf``).

    Raises:
        PlotExtraMissing: matplotlib is not installed.
        InvalidOptionError: the suffix is not one of :data:`FORMATS`.
    """
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise InvalidOptionError(f"{path}: figures are written as {', '.join(FORMATS)}; got '{path.suffix}'")
    Figure = _matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    units: list[dict[str, Any]] = report["units"]
    tau = float((report.get("parameters") or {}).get("tau", 0.001))
    n = max((u["layer"] for u in units), default=-1) + 1
    rows = unit_rows(units)
    fig = Figure(figsize=(max(6.0, min(18.0, 0.28 * len(units) + 2)), 5.8), layout="constrained")
    ax_heat, ax_p, ax_d = fig.subplots(3, 1, height_ratios=[0.4 + 0.35 * len(rows), 1.4, 1.4])

    # Figure 1: decision heatmap (rows: layer, or attention and MLP).
    grid = [[float("nan")] * n for _ in rows]
    for r, (_, us) in enumerate(rows):
        for u in us:
            grid[r][u["layer"]] = DECISIONS.index(u["decision"]) if u["decision"] in DECISIONS else float("nan")
    cmap = ListedColormap([COLOURS[d] for d in DECISIONS])
    ax_heat.imshow(grid, cmap=cmap, vmin=-0.5, vmax=2.5, aspect="auto", interpolation="nearest")
    ax_heat.set_yticks(range(len(rows)), [p or "layer" for p, _ in rows])
    ax_heat.set_xticks(range(n) if n <= 40 else range(0, n, 5))
    ax_heat.set_xlabel("layer")
    fragile = fragile_units(units, tau)
    ax_heat.set_title(f"Decisions ({report.get('granularity')} granularity, τ = {tau:g}; {len(fragile)} fragile)")
    for u in fragile:
        r = next(i for i, (p, _) in enumerate(rows) if p == u.get("part"))
        ax_heat.text(u["layer"], r, "!", ha="center", va="center", color="white", fontweight="bold")
    ax_heat.legend(handles=[Patch(color=COLOURS[d], label=d) for d in DECISIONS], loc="upper left",
                   bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)

    # Figure 2: p_S, p_M and d with the ±τ band, in report order.
    xs = list(range(len(units)))
    labels = [f"{u['layer']}{({'attention': 'a', 'mlp': 'm'}).get(u.get('part') or '', '')}" for u in units]
    ax_p.plot(xs, [u["p_safety"] for u in units], "o-", color=COLOURS["safety"], ms=3, lw=1.2, label="p_S (safety expert)")
    ax_p.plot(xs, [u["p_expert"] for u in units], "o-", color=COLOURS["expert"], ms=3, lw=1.2, label="p_M (language expert)")
    ax_p.set_ylabel("normalised score")
    ax_p.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax_p.set_xticks([])
    ax_d.axhspan(-tau, tau, color="#999999", alpha=0.35, lw=0, label=f"blend band |d| ≤ τ = {tau:g}")
    ax_d.axhline(0, color="#666666", lw=0.8)
    ax_d.bar(xs, [u["d"] for u in units], color=[COLOURS.get(u["decision"], "#888888") for u in units], width=0.7)
    ax_d.set_ylabel("d = p_S − p_M")
    step = max(1, len(units) // 32)
    ax_d.set_xticks(xs[::step], labels[::step], fontsize=7)
    ax_d.set_xlabel("unit (layer; a = attention, m = MLP)" if report.get("granularity") == "module" else "layer")
    ax_d.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax in (ax_p, ax_d):
        ax.set_xlim(-0.6, len(units) - 0.4)
    return _save(fig, path, dpi)


def _save(fig: Any, path: Path, dpi: int) -> Path:
    """Written beside the target and renamed into place: never half a file at ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lower().lstrip("."))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def is_sweep(data: Any) -> bool:
    """Whether ``data`` is what ``analyze --sweep-tau --json`` prints."""
    return (isinstance(data, list) and bool(data)
            and all(isinstance(r, dict) and isinstance(r.get("tau"), (int, float)) and isinstance(r.get("counts"), dict)
                    and all(isinstance(r["counts"].get(d), int) for d in DECISIONS) for r in data))


def draw_sweep(sweep: list[dict[str, Any]], path: Path, dpi: int = 150) -> Path:
    """Writes a τ sweep (``analyze --sweep-tau A:B:N --json``) as a figure: units per decision against
    τ, one line per decision. The format is ``path``'s suffix.

    Raises:
        PlotExtraMissing: matplotlib is not installed.
        InvalidOptionError: the suffix is not one of :data:`FORMATS`, or ``sweep`` is not a sweep.
    """
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise InvalidOptionError(f"{path}: figures are written as {', '.join(FORMATS)}; got '{path.suffix}'")
    if not is_sweep(sweep):
        raise InvalidOptionError('a sweep is a list of {"tau": ..., "counts": {"safety": n, "expert": n, "blend": n}}')
    Figure = _matplotlib()
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    taus = [float(r["tau"]) for r in sweep]
    for d in DECISIONS:
        ax.plot(taus, [r["counts"][d] for r in sweep], "o-", ms=3, lw=1.4, color=COLOURS[d], label=d)
    ax.set_xlabel("τ (threshold on d = p_S − p_M)")
    ax.set_ylabel("units")
    ax.set_title("How τ moves the decisions")
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path, dpi)

"""Human-readable views of plans and merge reports: the decision table and the final summary."""

from __future__ import annotations

from typing import Any, Optional

from layerswap_fast.plan import Plan


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def plural(n: int, word: str) -> str:
    """``1 layer``, ``2 layers``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def decision_table(plan: Plan) -> str:
    """The per-unit table: scores, p_S, p_M, d and decision, exactly as thresholded."""
    return _table(plan.layout, plan.n_layers, plan.options, [u.to_dict() for u in plan.units], plan.counts())


def report_table(report: dict[str, Any]) -> str:
    """:func:`decision_table` from a merge report (which holds every unit's scores and decision)."""
    return _table(report["layout"], report["n_layers"], report["parameters"], report["units"], report["counts"])


def _table(layout: str, n_layers: int, o: dict[str, Any], units: list[dict[str, Any]], c: dict[str, int]) -> str:
    lines = [
        f"layout {layout}, {plural(n_layers, 'layer')}, granularity {o['granularity']}, "
        f"tau {o['tau']:g}, alpha {o['alpha']:g}, numerics {o['numerics']}",
        f"{'unit':<22} {'A_safety':>10} {'A_expert':>10} {'p_safety':>9} {'p_expert':>9} {'d':>10}  {'decision':<12} source",
    ]
    for u in units:
        label = f"layer {u['layer']}" if u.get("part") is None else f"layer {u['layer']} {u['part']}"
        decision = u["decision"] if u.get("alpha") is None else f"{u['decision']} {u['alpha']:g}"
        lines.append(
            f"{label:<22} {u['score_safety']:>10.5f} {u['score_expert']:>10.5f} {u['p_safety']:>9.5f} {u['p_expert']:>9.5f} "
            f"{u['d']:>+10.5f}  {decision:<12} {u.get('source', 'measured')}"
        )
    lines.append(f"units: {c['safety']} safety, {c['expert']} expert, {c['blend']} blend")
    return "\n".join(lines)


def sweep_table(plan: Plan, sweep: list[dict[str, Any]]) -> str:
    """Decision counts per τ, then per unit the τ above which its measured decision becomes a blend
    (|d|; a unit a band or an override decides does not move with τ)."""
    lines = [f"{'tau':>12} {'safety':>7} {'expert':>7} {'blend':>7}"]
    for row in sweep:
        c = row["counts"]
        lines.append(f"{row['tau']:>12.6g} {c['safety']:>7} {c['expert']:>7} {c['blend']:>7}")
    lines.append(f"{'unit':<22} {'blend above tau':>16}  decided by")
    for u in plan.units:
        note = "d and tau" if u.source == "measured" else f"{u.source} ({u.decision if u.alpha is None else f'blend {u.alpha:g}'})"
        lines.append(f"{u.label:<22} {abs(u.d):>16.6g}  {note}")
    return "\n".join(lines)


def merge_summary(report: dict[str, Any], out: str, units: bool = True) -> str:
    """The lines printed after a merge (``units=False`` leaves out the decision counts, for callers
    that have just printed the decision table, which ends with them)."""
    c = report["counts"]
    secs = report["seconds"]
    rate = report["bytes_read"] / secs if secs > 0 else 0.0
    return "\n".join(
        [
            f"wrote {out}: {plural(report['output']['tensors'], 'tensor')} in "
            f"{plural(len([f for f in report['output']['files'] if f.endswith('.safetensors')]), 'shard')}"
            + (f" (a PEFT adapter of {plural(len(report['output']['modules']), 'LoRA module')})" if report["output"].get("kind") == "adapter" else ""),
        ]
        + ([f"units: {c['safety']} safety, {c['expert']} expert, {c['blend']} blend ({report['granularity']} granularity, {report['numerics']} numerics)"]
           if units else [])
        + [
            f"read {fmt_bytes(report['bytes_read'])}, wrote {fmt_bytes(report['output']['bytes_written'])}"
            + (f" (+{fmt_bytes(report['output']['bytes_cloned'])} shared with the inputs)" if report["output"].get("bytes_cloned") else "")
            + " "
            f"in {secs:.2f} s ({fmt_bytes(rate)}/s read); peak memory {fmt_bytes(report['peak_rss_bytes'])}",
        ]
        + [f"note: {n}" for n in report.get("notes", [])]
        + [f"warning: {w}" for w in report.get("warnings", [])]
    )


def bulk_table(summary: dict[str, Any]) -> str:
    """Cross-language table: one row per unit, one column per expert (S safety, E expert, B blend),
    then each expert's status and time."""
    names = list(summary["experts"])
    mark = {"safety": "S", "expert": "E", "blend": "B"}
    width = max([len(n) for n in names] + [2])
    lines = [f"{'unit':<22} " + " ".join(f"{n:>{width}}" for n in names)]
    for unit, row in summary["decisions"].items():
        lines.append(f"{unit:<22} " + " ".join(f"{mark.get(row.get(n, ''), '-'):>{width}}" for n in names))
    lines.append("S = safety expert's unit, E = language expert's, B = blend, - = no output")
    for n, e in summary["experts"].items():
        secs = f" in {e['seconds']:.2f} s" if e.get("seconds") is not None and e["status"] == "ok" else ""
        lines.append(f"{n}: {e['status']}{secs}" + (f" ({e['error']})" if e.get("error") else ""))
    lines.append(f"analyze pass (all experts at once): {summary['statistics_seconds']:.2f} s")
    return "\n".join(lines)


# --- per-unit views shared by the terminal, the HTML page, the model card and the figures ------------

#: One letter per decision, as the strips and tables print them.
LETTERS = {"safety": "S", "expert": "E", "blend": "B"}
#: Colours per decision (Okabe-Ito, readable with the common colour-vision deficiencies).
COLOURS = {"safety": "#0072B2", "expert": "#E69F00", "blend": "#CC79A7"}
#: Terminal colours per decision (foreground, background) for the decision strip.
_TERMINAL = {"safety": ("white", "blue"), "expert": ("black", "yellow"), "blend": ("white", "magenta")}


def unit_label(u: dict[str, Any]) -> str:
    """``layer 3`` or ``layer 3 attention``, as in the decision table."""
    return f"layer {u['layer']}" if u.get("part") is None else f"layer {u['layer']} {u['part']}"


def classify(d: float, tau: float) -> str:
    """METHOD.md §4: d > τ → safety, d < −τ → expert, otherwise (|d| ≤ τ) blend."""
    if d > tau:
        return "safety"
    if d < -tau:
        return "expert"
    return "blend"


def margin(u: dict[str, Any], tau: float) -> float:
    """|d| − τ: how far a unit's d lies outside (positive) or inside (negative) the blend band."""
    return abs(u["d"]) - tau


def is_measured(u: dict[str, Any]) -> bool:
    """Whether the unit's decision came from thresholding its d (not an override, a file or a band)."""
    return u.get("source", "measured") == "measured"


def is_fragile(u: dict[str, Any], tau: float) -> bool:
    """A measured unit whose decision would change if τ were halved or doubled."""
    if not is_measured(u):
        return False
    now = classify(u["d"], tau)
    return classify(u["d"], tau / 2) != now or classify(u["d"], tau * 2) != now


def fragile_units(units: list[dict[str, Any]], tau: float) -> list[dict[str, Any]]:
    return [u for u in units if is_fragile(u, tau)]


def unit_rows(units: list[dict[str, Any]]) -> list[tuple[Optional[str], list[dict[str, Any]]]]:
    """The heatmap's rows: ``[(None, units)]`` in layer granularity, ``[("attention", ...), ("mlp", ...)]``
    in module granularity (each row ordered by layer)."""
    parts: list[Optional[str]] = []
    for u in units:
        if u.get("part") not in parts:
            parts.append(u.get("part"))
    order = {"attention": 0, "mlp": 1}
    parts.sort(key=lambda p: order.get(p, 2) if p is not None else -1)
    return [(p, sorted((u for u in units if u.get("part") == p), key=lambda u: u["layer"])) for p in parts]


def _ruler(n: int, label: str, width: int) -> list[str]:
    """Layer numbers over a strip: units digits, under a row of tens digits once there are more than 10."""
    ruler = ["  " + f"{label:<{width}} " + "".join(str(i % 10) for i in range(n))]
    if n > 10:
        ruler.insert(0, "  " + " " * (width + 1) + "".join(str(i // 10 % 10) if i >= 10 else " " for i in range(n)))
    return ruler


def _strip_lines(units: list[dict[str, Any]], n: int, colour: bool, name: str, width: int) -> list[str]:
    """One line per row of the heatmap: one letter per layer (S safety, E expert, B blend)."""
    import click

    lines = []
    for part, us in unit_rows(units):
        cells = [" "] * n
        for u in us:
            letter = LETTERS.get(u["decision"], "?")
            if colour and u["decision"] in _TERMINAL:
                fg, bg = _TERMINAL[u["decision"]]
                letter = click.style(letter, fg=fg, bg=bg)
            cells[u["layer"]] = letter
        label = " ".join(x for x in (name, part or ("" if name else "layer")) if x)
        lines.append(f"  {label:<{width}} {''.join(cells)}")
    return lines


def decision_strip(units: list[dict[str, Any]], tau: float, colour: bool = True) -> str:
    """Per layer, one letter per unit (S safety, E expert, B blend), one line per row of the heatmap,
    under a ruler of layer numbers; then the count of fragile units. Coloured with ANSI codes when
    ``colour`` (``click.echo`` removes them when the output is not a terminal)."""
    n = max((u["layer"] for u in units), default=-1) + 1
    lines = ["decisions per layer (S safety, E expert, B blend):", *_ruler(n, "layer", 10), *_strip_lines(units, n, colour, "", 10)]
    fragile = fragile_units(units, tau)
    names = ", ".join(unit_label(u) for u in fragile[:8]) + (", ..." if len(fragile) > 8 else "")
    lines.append(f"fragile units (decision flips if tau is halved or doubled): {len(fragile)}" + (f" ({names})" if fragile else ""))
    return "\n".join(lines)


def bulk_strips(reports: dict[str, dict[str, Any]], colour: bool = True) -> str:
    """The decision strip of every expert of a bulk run (``reports``: name -> its merge report), one
    block of rows per expert under one ruler, then each expert's count of fragile units."""
    if not reports:
        return ""
    n = max((u["layer"] for r in reports.values() for u in r["units"]), default=-1) + 1
    width = max(len(f"{name} attention") for name in reports)
    lines = ["decisions per layer (S safety, E expert, B blend):", *_ruler(n, "layer", width)]
    for name, r in reports.items():
        lines += _strip_lines(r["units"], n, colour, name, width)
    counts = ", ".join(f"{name} {len(fragile_units(r['units'], float(r['parameters']['tau'])))}" for name, r in reports.items())
    lines.append(f"fragile units (decision flips if tau is halved or doubled): {counts}")
    return "\n".join(lines)


def input_source(report: dict[str, Any], role: str) -> dict[str, Any]:
    """Where an input came from: ``{"path", "hub_id", "revision", "commit"}`` (only the keys known).

    ``report["inputs"][role]`` is a path string, or a dict that may carry a hub id and the commit it
    resolved to; ``report["hub"][role]`` may carry the same."""
    raw = (report.get("inputs") or {}).get(role)
    out: dict[str, Any] = {}
    if isinstance(raw, dict):
        out.update({k: v for k, v in raw.items() if v is not None})
        for alias in ("repo_id", "id", "hub"):
            if isinstance(out.get(alias), str) and "hub_id" not in out:
                out["hub_id"] = out[alias]
    elif raw is not None:
        out["path"] = str(raw)
    hub = (report.get("hub") or {}).get(role)
    if isinstance(hub, dict):
        out.update({k: v for k, v in hub.items() if v is not None and k not in out})
        if "hub_id" not in out and isinstance(hub.get("repo_id") or hub.get("id"), str):
            out["hub_id"] = hub.get("repo_id") or hub.get("id")
    elif isinstance(hub, str):
        out.setdefault("hub_id", hub)
    return out

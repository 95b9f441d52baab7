"""Human-readable views of plans and merge reports: the decision table and the final summary."""

from __future__ import annotations

from typing import Any

from layerswap_fast._core import Plan


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
        f"{'unit':<22} {'A_safety':>10} {'A_expert':>10} {'p_safety':>9} {'p_expert':>9} {'d':>10}  decision",
    ]
    for u in units:
        label = f"layer {u['layer']}" if u.get("part") is None else f"layer {u['layer']} {u['part']}"
        lines.append(
            f"{label:<22} {u['score_safety']:>10.5f} {u['score_expert']:>10.5f} {u['p_safety']:>9.5f} {u['p_expert']:>9.5f} "
            f"{u['d']:>+10.5f}  {u['decision']}"
        )
    lines.append(f"units: {c['safety']} safety, {c['expert']} expert, {c['blend']} blend")
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
            f"read {fmt_bytes(report['bytes_read'])}, wrote {fmt_bytes(report['output']['bytes_written'])} "
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

"""The HTML pages: one merge's (or analysis's) report, and the cross-language index of a bulk run.

Each page is one self-contained file built from the report dict alone (the JSON report on disk), so
``layerswap-fast report`` can regenerate it later: inline SVG and CSS and a few lines of vanilla
JavaScript to sort the unit table; nothing is fetched (no fonts, scripts, images or styles from
anywhere), so it works offline and from an e-mail attachment. Hovering a cell shows its numbers
(SVG ``<title>``, no script needed).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Optional

from layerswap_fast.report import (
    COLOURS,
    LETTERS,
    fmt_bytes,
    fragile_units,
    input_source,
    is_fragile,
    margin,
    unit_label,
    unit_rows,
)

#: Heatmap geometry (CSS pixels): label column, ruler height, row height.
LABEL_W = 84
RULER_H = 18
ROW_H = 28


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1a1a1a;background:#fff;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin:0 0 12px}
table{border-collapse:collapse;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#f4f4f4;position:sticky;top:0}td.l,th.l{text-align:left}
table.sortable th{cursor:pointer;user-select:none}table.sortable th[data-dir=asc]::after{content:" \\25B2"}
table.sortable th[data-dir=desc]::after{content:" \\25BC"}
.kv td:first-child{text-align:left;color:#555}.kv td{text-align:left}
.legend span{display:inline-block;margin-right:16px;font-size:13px}
.legend i{display:inline-block;width:14px;height:14px;vertical-align:-2px;margin-right:5px;border-radius:2px}
.fragile{color:#b00020;font-weight:600}.warn{color:#b00020}
svg text{font-family:system-ui,sans-serif;font-size:11px;fill:#444}
svg rect.cell:hover{stroke:#000;stroke-width:2}
.d-safety{color:#0072B2}.d-expert{color:#B07800}.d-blend{color:#A0507F}
code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
    var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows),asc=th.dataset.dir!=='asc';
    t.querySelectorAll('th').forEach(function(h){delete h.dataset.dir;});th.dataset.dir=asc?'asc':'desc';
    rows.sort(function(a,b){var x=a.cells[i].dataset.v,y=b.cells[i].dataset.v,nx=parseFloat(x),ny=parseFloat(y);
      var c=(isNaN(nx)||isNaN(ny))?String(x).localeCompare(String(y)):nx-ny;return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});});});});
"""


def _doc(title: str, body: str, script: bool = False) -> str:
    js = f"<script>{_SORT_JS}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n{js}</body></html>\n")


def _legend() -> str:
    items = "".join(f'<span><i style="background:{COLOURS[k]}"></i>{LETTERS[k]} {k}</span>' for k in ("safety", "expert", "blend"))
    return f'<p class="legend">{items}<span>dashed outline: fragile (flips if τ is halved or doubled)</span></p>'


def _num(x: Optional[float], fmt: str = ".6f") -> str:
    return "" if x is None else format(x, fmt)


def _unit_tooltip(u: dict[str, Any], tau: float) -> str:
    lines = [
        f"{unit_label(u)}: {u['decision']}" + (f" (alpha {u['alpha']:g})" if u.get("alpha") is not None and u["decision"] == "blend" else ""),
        f"A_S {u['score_safety']:.6g}   A_M {u['score_expert']:.6g}",
        f"p_S {u['p_safety']:.6f}   p_M {u['p_expert']:.6f}",
        f"d {u['d']:+.6f}   |d|-tau {margin(u, tau):+.6f}",
    ]
    if u.get("source") is not None:
        lines.append(f"source: {u['source']}")
    if is_fragile(u, tau):
        lines.append("fragile: flips if tau is halved or doubled")
    return "\n".join(lines)


def heatmap_svg(units: list[dict[str, Any]], tau: float, n_layers: Optional[int] = None, cell_w: Optional[int] = None,
                id_prefix: str = "cell", ruler: bool = True, labels: bool = True, row_h: int = ROW_H) -> str:
    """The decision heatmap: one row (layer granularity) or an attention row and an MLP row (module
    granularity), one column per layer, a colour per decision; each cell ``id="{prefix}-{layer}-{row}"``
    (row: ``layer``, ``attention`` or ``mlp``) with the unit's numbers as its tooltip."""
    n = n_layers if n_layers is not None else max((u["layer"] for u in units), default=-1) + 1
    cw = cell_w or max(10, min(32, 960 // max(n, 1)))
    rows = unit_rows(units)
    left = LABEL_W if labels else 0
    top = RULER_H if ruler else 0
    rh = row_h
    width, height = left + n * cw + 2, top + rh * len(rows) + 2
    parts = [f'<svg class="heatmap" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    if ruler:
        step = 1 if cw >= 20 else (5 if cw >= 12 else 10)
        for i in range(0, n, step):
            parts.append(f'<text x="{left + i * cw + cw / 2:.1f}" y="{RULER_H - 5}" text-anchor="middle">{i}</text>')
    for r, (part, us) in enumerate(rows):
        y = top + r * rh
        if labels:
            parts.append(f'<text x="0" y="{y + rh / 2 + 4:.1f}">{_e(part or "layer")}</text>')
        for u in us:
            fragile = is_fragile(u, tau)
            stroke = ' stroke="#111" stroke-width="1.5" stroke-dasharray="3 2"' if fragile else ""
            parts.append(
                f'<rect class="cell" id="{_e(id_prefix)}-{u["layer"]}-{_e(part or "layer")}" data-layer="{u["layer"]}" '
                f'data-part="{_e(part or "layer")}" data-decision="{_e(u["decision"])}" x="{left + u["layer"] * cw + 1}" y="{y + 1}" '
                f'width="{cw - 2}" height="{rh - 2}" fill="{COLOURS.get(u["decision"], "#888")}"{stroke}>'
                f"<title>{_e(_unit_tooltip(u, tau))}</title></rect>"
            )
    parts.append("</svg>")
    return "".join(parts)


def ratio_svg(units: list[dict[str, Any]], tau: float) -> str:
    """p_S and p_M per unit (top panel) and d = p_S − p_M with the ±τ blend band (bottom panel), in
    report order and with exactly the values the decisions were thresholded on (one normalisation over
    all units, attention and MLP together)."""
    n = len(units)
    uw = max(6, min(28, 960 // max(n, 1)))
    left, plot_w = 64, n * uw
    width = left + plot_w + 90
    h1, h2, gap, top = 150, 150, 34, 22
    height = top + h1 + gap + h2 + 30
    pmax = max([u["p_safety"] for u in units] + [u["p_expert"] for u in units] + [1e-12])
    dmax = max([abs(u["d"]) for u in units] + [tau * 1.5, 1e-12])
    out = [f'<svg class="ratios" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']

    def x(i: int) -> float:
        return left + i * uw + uw / 2

    def y1(p: float) -> float:
        return top + h1 - p / pmax * h1

    y2_0 = top + h1 + gap + h2 / 2

    def y2(d: float) -> float:
        return y2_0 - d / dmax * (h2 / 2)

    # panel 1: p_S and p_M
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{h1}" fill="#fafafa" stroke="#ddd"/>')
    for v in (0.0, pmax):
        out.append(f'<text x="{left - 4}" y="{y1(v) + 4:.1f}" text-anchor="end">{v:.4f}</text>')
    for key, colour, name in (("p_safety", COLOURS["safety"], "p_S"), ("p_expert", COLOURS["expert"], "p_M")):
        pts = " ".join(f"{x(i):.1f},{y1(u[key]):.1f}" for i, u in enumerate(units))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for i, u in enumerate(units):
            out.append(f'<circle cx="{x(i):.1f}" cy="{y1(u[key]):.1f}" r="2.5" fill="{colour}"><title>{_e(unit_label(u))}: {name} {u[key]:.6f}</title></circle>')
    out.append(f'<text x="{left}" y="{top - 8}"><tspan fill="{COLOURS["safety"]}">● p_S (safety expert)</tspan>'
               f'<tspan dx="14" fill="{COLOURS["expert"]}">● p_M (language expert)</tspan></text>')
    # panel 2: d with the ±τ band
    t2 = top + h1 + gap
    out.append(f'<rect x="{left}" y="{t2}" width="{plot_w}" height="{h2}" fill="#fafafa" stroke="#ddd"/>')
    band_top, band_bottom = y2(tau), y2(-tau)
    out.append(f'<rect class="band" x="{left}" y="{band_top:.2f}" width="{plot_w}" height="{max(band_bottom - band_top, 0.5):.2f}" '
               f'fill="#999" fill-opacity="0.3"><title>blend band: |d| ≤ tau = {tau:g}</title></rect>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y2_0:.1f}" y2="{y2_0:.1f}" stroke="#888" stroke-width="0.8"/>')
    for v in (dmax, 0.0, -dmax):
        out.append(f'<text x="{left - 4}" y="{y2(v) + 4:.1f}" text-anchor="end">{v:+.4f}</text>')
    out.append(f'<text x="{left + plot_w + 4}" y="{y2_0 + 4:.1f}">±τ = {tau:g}</text>')
    for i, u in enumerate(units):
        yv = y2(u["d"])
        y0, hh = (yv, y2_0 - yv) if u["d"] >= 0 else (y2_0, yv - y2_0)
        out.append(f'<rect x="{x(i) - uw * 0.35:.1f}" y="{y0:.1f}" width="{uw * 0.7:.1f}" height="{max(hh, 0.5):.1f}" '
                   f'fill="{COLOURS.get(u["decision"], "#888")}"><title>{_e(_unit_tooltip(u, tau))}</title></rect>')
    out.append(f'<text x="{left}" y="{t2 - 8}">d = p_S − p_M (grey band: blend)</text>')
    step = max(1, n // 24)
    for i in range(0, n, step):
        u = units[i]
        lab = str(u["layer"]) + ({"attention": "a", "mlp": "m"}.get(u.get("part") or "", ""))
        out.append(f'<text x="{x(i):.1f}" y="{t2 + h2 + 14}" text-anchor="middle">{_e(lab)}</text>')
    out.append("</svg>")
    return "".join(out)


def _unit_table(units: list[dict[str, Any]], tau: float) -> str:
    extra_source = any(u.get("source") is not None for u in units)
    extra_alpha = any(u.get("alpha") is not None for u in units)
    head = ["unit", "layer", "part", "A_S", "A_M", "p_S", "p_M", "d", "decision", "|d| − τ", "fragile"]
    head += ["source"] * extra_source + ["α"] * extra_alpha
    rows = []
    for i, u in enumerate(units):
        fragile = is_fragile(u, tau)
        m = margin(u, tau)
        cells = [
            (f'<td class="l" data-v="{i:06d}">{_e(unit_label(u))}</td>'),
            f'<td data-v="{u["layer"]}">{u["layer"]}</td>',
            f'<td class="l" data-v="{_e(u.get("part") or "layer")}">{_e(u.get("part") or "layer")}</td>',
            f'<td data-v="{u["score_safety"]!r}">{u["score_safety"]:.6g}</td>',
            f'<td data-v="{u["score_expert"]!r}">{u["score_expert"]:.6g}</td>',
            f'<td data-v="{u["p_safety"]!r}">{u["p_safety"]:.6f}</td>',
            f'<td data-v="{u["p_expert"]!r}">{u["p_expert"]:.6f}</td>',
            f'<td data-v="{u["d"]!r}">{u["d"]:+.6f}</td>',
            f'<td class="l d-{_e(u["decision"])}" data-v="{_e(u["decision"])}">{_e(u["decision"])}</td>',
            f'<td data-v="{m!r}">{m:+.6f}</td>',
            f'<td class="l{" fragile" if fragile else ""}" data-v="{int(fragile)}">{"fragile" if fragile else ""}</td>',
        ]
        if extra_source:
            cells.append(f'<td class="l" data-v="{_e(u.get("source") or "")}">{_e(u.get("source") or "")}</td>')
        if extra_alpha:
            a = u.get("alpha")
            cells.append(f'<td data-v="{"" if a is None else repr(a)}">{"" if a is None else f"{a:g}"}</td>')
        rows.append(f'<tr id="unit-{u["layer"]}-{_e(u.get("part") or "layer")}">' + "".join(cells) + "</tr>")
    ths = "".join(f'<th class="{"l" if h in ("unit", "part", "decision", "fragile", "source") else ""}">{_e(h)}</th>' for h in head)
    return f'<table class="sortable units"><thead><tr>{ths}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _kv(rows: list[tuple[str, Any]]) -> str:
    return '<table class="kv">' + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _inputs_table(report: dict[str, Any]) -> str:
    files = report.get("input_files") or {}
    head = "<tr><th class='l'>role</th><th class='l'>path or hub id</th><th class='l'>revision / commit</th><th>size</th><th>shards</th><th class='l'>layout</th></tr>"
    rows = []
    for role, name in (("base", "base B"), ("safety", "safety expert S"), ("expert", "language expert M")):
        src = input_source(report, role)
        f = files.get(role) or {}
        where = src.get("hub_id") or src.get("path") or ""
        rev = " ".join(str(x) for x in (src.get("revision"), src.get("commit")) if x)
        size = fmt_bytes(f["bytes"]) if f.get("bytes") is not None else ""
        path_note = f" ({src['path']})" if src.get("hub_id") and src.get("path") else ""
        rows.append(f"<tr><td class='l'>{_e(name)}</td><td class='l'><code>{_e(where)}</code>{_e(path_note)}</td><td class='l'>{_e(rev)}</td>"
                    f"<td>{_e(size)}</td><td>{_e(f.get('shards', ''))}</td><td class='l'>{_e(f.get('layout', ''))}</td></tr>")
    return f"<table class='inputs'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def render(report: dict[str, Any]) -> str:
    """The report page of one merge (or of an analysis, which has no ``output``)."""
    units: list[dict[str, Any]] = report["units"]
    params = report.get("parameters") or {}
    tau = float(params.get("tau", 0.001))
    expert = input_source(report, "expert")
    name = expert.get("hub_id") or Path(str(expert.get("path") or "expert")).name
    counts = report.get("counts") or {k: sum(u["decision"] == k for u in units) for k in ("safety", "expert", "blend")}
    fragile = fragile_units(units, tau)
    kind = "merge" if report.get("output") else "analysis"
    body = [
        f"<h1>layerswap-fast {kind}: {_e(name)}</h1>",
        f'<p class="sub">{counts.get("safety", 0)} safety, {counts.get("expert", 0)} expert, {counts.get("blend", 0)} blend '
        f"— {len(units)} units, {_e(report.get('granularity'))} granularity, τ = {tau:g}, α = {float(params.get('alpha', 0.5)):g}, "
        f"{_e(report.get('numerics'))} numerics, layout {_e(report.get('layout'))}, {report.get('n_layers')} layers. "
        f'<span class="{"fragile" if fragile else ""}">{len(fragile)} fragile unit(s)</span> '
        f"(decision flips if τ is halved or doubled).</p>",
        '<section id="decisions"><h2>Decisions</h2>',
        _legend(),
        heatmap_svg(units, tau, report.get("n_layers")),
        "</section>",
        '<section id="ratios"><h2>Normalised scores p_S, p_M and d = p_S − p_M</h2>',
        '<p class="sub">Exactly the values the decisions were thresholded on: one normalisation over all units'
        + (" (attention and MLP together)" if report.get("granularity") == "module" else "")
        + f". d &gt; τ takes the safety expert's unit, d &lt; −τ keeps the language expert's, the grey band |d| ≤ τ blends.</p>",
        ratio_svg(units, tau),
        "</section>",
        '<section id="units"><h2>Units</h2><p class="sub">Click a column to sort.</p>',
        _unit_table(units, tau),
        "</section>",
        '<section id="run"><h2>Inputs</h2>',
        _inputs_table(report),
        "<h2>Parameters</h2>",
        _kv([(k, v) for k, v in params.items()]),
    ]
    out = report.get("output")
    run_rows: list[tuple[str, Any]] = [("tool", f"{report.get('tool', 'layerswap-fast')} {report.get('version', '')}")]
    if out:
        if out.get("path"):
            run_rows.append(("output", out["path"]))
        run_rows.append(("tensors written", out.get("tensors")))
        run_rows.append(("bytes written", fmt_bytes(out.get("bytes_written", 0))))
        run_rows.append(("files", ", ".join(out.get("files", []))))
    if report.get("bytes_read"):
        run_rows.append(("bytes read", fmt_bytes(report["bytes_read"])))
    if report.get("seconds") is not None:
        run_rows.append(("time", f"{report['seconds']:.3f} s"))
    for k, v in (report.get("timings") or {}).items():
        run_rows.append((f"time: {k}", f"{v:.3f} s" if isinstance(v, (int, float)) else v))
    if report.get("peak_rss_bytes") is not None:
        run_rows.append(("peak memory (RSS)", fmt_bytes(report["peak_rss_bytes"])))
    body += ["<h2>Run</h2>", _kv(run_rows)]
    if report.get("warnings"):
        body.append("<h2>Warnings</h2><ul>" + "".join(f'<li class="warn">{_e(w)}</li>' for w in report["warnings"]) + "</ul>")
    body.append(f'<p class="sub">{_e(report.get("method", "layer-wise swapping (Shin & Hwang, EACL 2026)"))}.</p></section>')
    return _doc(f"layerswap-fast {kind}: {name}", "\n".join(body), script=True)


def render_bulk(summary: dict[str, Any], reports: dict[str, Optional[dict[str, Any]]], links: dict[str, str]) -> str:
    """The index page of a bulk run: one row per language expert (linking to its own report page), its
    decisions per layer as a heatmap strip (attention over MLP in module granularity), status, time and
    counts. ``reports`` holds each expert's report (None when it has none), ``links`` the relative
    address of each expert's page."""
    experts: dict[str, dict[str, Any]] = summary.get("experts") or {}
    n = max([max((u["layer"] for u in (r or {}).get("units", [])), default=-1) + 1 for r in reports.values()] + [1])
    cw = max(8, min(24, 720 // n))
    rows = []
    for name, e in experts.items():
        r = reports.get(name)
        label = f'<a href="{_e(links[name])}">{_e(name)}</a>' if name in links else _e(name)
        if r and r.get("units"):
            tau = float((r.get("parameters") or {}).get("tau", 0.001))
            strip = heatmap_svg(r["units"], tau, n, cw, id_prefix=f"cell-{name}", ruler=False, labels=False,
                                row_h=ROW_H if r.get("granularity") != "module" else ROW_H // 2)
            fr = str(len(fragile_units(r["units"], tau)))
            gran = r.get("granularity", "")
        else:
            strip, fr, gran = "", "", ""
        counts = e.get("counts") or (r or {}).get("counts") or {}
        cstr = ", ".join(f"{counts[k]} {k}" for k in ("safety", "expert", "blend") if k in counts)
        secs = e.get("seconds")
        status = e.get("status", "")
        detail = e.get("error") or e.get("note") or ""
        rows.append(
            f'<tr id="expert-{_e(name)}"><td class="l">{label}</td><td class="l">{strip}</td>'
            f'<td class="l{" warn" if status == "failed" else ""}" title="{_e(detail)}">{_e(status)}</td>'
            f"<td>{'' if secs is None else f'{secs:.2f} s'}</td><td class='l'>{_e(cstr)}</td><td class='l'>{_e(gran)}</td><td>{fr}</td></tr>"
        )
    ruler = "".join(f'<text x="{i * cw + cw / 2:.1f}" y="13" text-anchor="middle">{i}</text>' for i in range(0, n, 1 if cw >= 20 else 5))
    ruler_svg = f'<svg width="{n * cw + 2}" height="{RULER_H}">{ruler}</svg>'
    failed = [n_ for n_, e in experts.items() if e.get("status") == "failed"]
    body = [
        f"<h1>layerswap-fast bulk run: {len(experts)} language expert(s)</h1>",
        f'<p class="sub">Analyze pass (all experts at once): {summary.get("statistics_seconds", 0):.2f} s. '
        f"{len(failed)} failed. Each row links to that expert's own report; hover a cell for its numbers.</p>",
        _legend(),
        '<table class="bulk"><thead><tr><th class="l">expert</th>'
        f'<th class="l">decisions per layer<br>{ruler_svg}</th><th class="l">status</th><th>time</th><th class="l">units</th>'
        '<th class="l">granularity</th><th>fragile</th></tr></thead><tbody>',
        "".join(rows),
        "</tbody></table>",
    ]
    for name in failed:
        body.append(f'<p class="warn">{_e(name)}: {_e(experts[name].get("error", ""))}</p>')
    body.append(f'<p class="sub">{_e(summary.get("tool", "layerswap-fast"))} {_e(summary.get("version", ""))}</p>')
    return _doc("layerswap-fast bulk run", "\n".join(body))


__all__ = ["render", "render_bulk", "heatmap_svg", "ratio_svg"]

"""The HTML report pages (single merge, analysis, bulk index): they parse, fetch nothing, show every
unit and parameter, and, rendered in a real headless Chromium, show each unit's decision colour in the
heatmap cell of that unit. Also the terminal's decision strip and fragile count."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

import layerswap_fast as lsf
from layerswap_fast import bulk, synth
from layerswap_fast.cli import main
from layerswap_fast.report import COLOURS

import browser

CFG = synth.LlamaConfig(n_layers=6)
VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "embed", "source", "track", "wbr"}
SVG_SELF_CLOSING = {"rect", "circle", "line", "polyline", "path"}


def independent_decision(d: float, tau: float) -> str:
    """METHOD.md §4, restated here so that the fragile count is checked against its own computation."""
    return "safety" if d > tau else ("expert" if d < -tau else "blend")


def tau_with_all_three(paths: dict[str, Path], granularity: str) -> float:
    """A τ that gives this trio safety, expert and blend units: between the smallest and largest |d|."""
    ds = sorted(abs(u.d) for u in lsf.analyze(paths["base"], paths["safety"], paths["expert"], granularity=granularity).units)
    return (ds[0] + ds[-1]) / 2


@pytest.fixture(scope="module")
def merges(tmp_path_factory, make_trio) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pages")
    paths = make_trio(config=CFG, shard_bytes={"safety": 90_000})
    out: dict[str, Any] = {"paths": paths}
    for g in ("layer", "module"):
        tau = tau_with_all_three(paths, g)
        lsf.merge(paths["base"], paths["safety"], paths["expert"], root / g, granularity=g, tau=tau)
        out[g] = root / g
    b = make_trio(config=CFG, planting=synth.Planting(safety_layers=[1, 2], expert_layers=[4]))
    specs = [bulk.ExpertSpec("ko", paths["expert"]), bulk.ExpertSpec("sw", b["expert"], lsf.MergeOptions(granularity="module"))]
    bulk.bulk_merge(paths["base"], paths["safety"], specs, root / "bulk")
    out["bulk"] = root / "bulk"
    return out


class _Checker(HTMLParser):
    """Parses a page; records tag balance problems, every URL-like attribute and the visible text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.urls: list[tuple[str, str, str]] = []
        self.text: list[str] = []
        self.ids: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Any]]) -> None:
        self.tags.add(tag)
        for k, v in attrs:
            if k in ("src", "href", "xlink:href", "action", "poster", "srcset", "data") and v is not None:
                self.urls.append((tag, k, v))
            if k == "style" and v and "url(" in v:
                self.urls.append((tag, k, v))
            if k == "id":
                self.ids.append(v)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, Any]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def check_page(path: Path) -> _Checker:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    c = _Checker()
    c.feed(text)
    c.close()
    assert not c.problems, c.problems[:5]
    assert c.stack == [], f"unclosed: {c.stack}"
    # Nothing is fetched: no external src/href, no url() in styles, no @import, no <link>/<img>/<iframe>.
    for tag, attr, value in c.urls:
        assert attr == "href" and tag == "a" and not re.match(r"^[a-z][a-z0-9+.-]*:|^//", value.strip(), re.I), (tag, attr, value)
        assert not Path(value).is_absolute()
    assert "url(" not in text and "@import" not in text
    assert not (c.tags & {"link", "img", "iframe", "object", "embed", "video", "audio", "source"}), c.tags
    assert not re.search(r"<script[^>]*\bsrc\s*=", text)
    return c


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_page_parses_fetches_nothing_and_shows_every_unit_and_parameter(merges, granularity):
    out = merges[granularity]
    report = json.loads((out / "layerswap_report.json").read_text())
    c = check_page(out / "layerswap_report.html")
    text = " ".join(c.text)
    assert {u["decision"] for u in report["units"]} == {"safety", "expert", "blend"}, "the fixture should show every decision"
    for u in report["units"]:
        row = "layer" if u["part"] is None else u["part"]
        assert f"unit-{u['layer']}-{row}" in c.ids  # in the table
        assert f"cell-{u['layer']}-{row}" in c.ids  # in the heatmap
        assert f"{u['d']:+.6f}" in text and f"{u['p_safety']:.6f}" in text and f"{u['p_expert']:.6f}" in text
        assert f"{abs(u['d']) - report['parameters']['tau']:+.6f}" in text  # the margin |d| - tau
    for k, v in report["parameters"].items():
        assert k in text and str(v) in text, k
    for role in ("base", "safety", "expert"):
        assert report["inputs"][role] in text
        assert str(report["input_files"][role]["shards"]) in text
    assert report["version"] in text and "peak memory" in text


def test_input_sizes_and_shards_are_the_files_on_disk(merges):
    """input_files in the report (shown on the page and in the card) agree with the folders."""
    report = json.loads((merges["module"] / "layerswap_report.json").read_text())
    for role in ("base", "safety", "expert"):
        shards = sorted(Path(merges["paths"][role]).glob("*.safetensors"))
        assert report["input_files"][role]["shards"] == len(shards)
        assert report["input_files"][role]["layout"] == "llama"
        assert 0 < report["input_files"][role]["bytes"] <= sum(p.stat().st_size for p in shards)


def check_cells_in_browser(page: Path, expected: dict[str, str], tmp: Path) -> dict[str, dict[str, float]]:
    """Screenshots ``page`` in Chromium and checks that the cell with each id shows the colour of the
    decision ``expected[id]`` (centre pixel, exact sRGB)."""
    png = browser.screenshot(page, tmp / "shot.png", tmp / "profile")
    boxes = browser.boxes(page, "rect.cell", tmp)
    assert set(expected) <= set(boxes), sorted(set(expected) - set(boxes))[:5]
    image = Image.open(png).convert("RGB")
    assert len({COLOURS[d] for d in ("safety", "expert", "blend")}) == 3
    for cell_id, decision in expected.items():
        b = boxes[cell_id]
        x, y = int(b["x"] + b["w"] / 2), int(b["y"] + b["h"] / 2)
        assert 0 <= x < image.width and 0 <= y < image.height, f"{cell_id} is outside the screenshot"
        got = image.getpixel((x, y))
        want = browser.hex_rgb(COLOURS[decision])
        assert max(abs(a - b_) for a, b_ in zip(got, want)) <= 2, f"{cell_id}: pixel {got}, {decision} is {want}"
    return boxes


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_heatmap_in_chromium_shows_each_units_decision_colour_in_place(merges, granularity, tmp_path):
    out = merges[granularity]
    report = json.loads((out / "layerswap_report.json").read_text())
    expected = {f"cell-{u['layer']}-{u['part'] or 'layer'}": u["decision"] for u in report["units"]}
    boxes = check_cells_in_browser(out / "layerswap_report.html", expected, tmp_path)
    rows = ["layer"] if granularity == "layer" else ["attention", "mlp"]
    for r, row in enumerate(rows):
        xs = [boxes[f"cell-{i}-{row}"]["x"] for i in range(report["n_layers"])]
        assert xs == sorted(xs) and len(set(xs)) == len(xs), "layers run left to right"
        if r:
            assert boxes[f"cell-0-{row}"]["y"] > boxes[f"cell-0-{rows[r - 1]}"]["y"], "attention row above the MLP row"
            assert xs == [boxes[f"cell-{i}-{rows[0]}"]["x"] for i in range(report["n_layers"])], "a layer's cells share a column"


def test_bulk_index_in_chromium(merges, tmp_path):
    out = merges["bulk"]
    page = out / "index.html"
    c = check_page(page)
    summary = json.loads((out / bulk.SUMMARY).read_text())
    hrefs = [v for tag, attr, v in c.urls if attr == "href"]
    assert sorted(hrefs) == ["ko/layerswap_report.html", "sw/layerswap_report.html"]
    assert all((out / h).is_file() for h in hrefs)
    text = " ".join(c.text)
    expected = {}
    for name in ("ko", "sw"):
        assert summary["experts"][name]["status"] in text
        assert f"{summary['experts'][name]['seconds']:.2f} s" in text
        for u in json.loads((out / name / "layerswap_report.json").read_text())["units"]:
            expected[f"cell-{name}-{u['layer']}-{u['part'] or 'layer'}"] = u["decision"]
    boxes = check_cells_in_browser(page, expected, tmp_path)
    # One row per language: every cell of "sw" lies below every cell of "ko", columns are layers.
    ko = [b for k, b in boxes.items() if k.startswith("cell-ko-")]
    sw = [b for k, b in boxes.items() if k.startswith("cell-sw-")]
    assert max(b["y"] for b in ko) < min(b["y"] for b in sw)
    assert boxes["cell-ko-3-layer"]["x"] == boxes["cell-sw-3-attention"]["x"] == boxes["cell-sw-3-mlp"]["x"]


def test_analyze_html_and_terminal_strip(merges, tmp_path):
    p = merges["paths"]
    report = json.loads((merges["module"] / "layerswap_report.json").read_text())
    tau = report["parameters"]["tau"]
    args = ["analyze", "-b", str(p["base"]), "-s", str(p["safety"]), "-m", str(p["expert"]), "-g", "module", "--tau", repr(tau)]
    res = CliRunner().invoke(main, [*args, "--html", str(tmp_path / "a.html")])
    assert res.exit_code == 0, res.output
    c = check_page(tmp_path / "a.html")
    assert "layerswap-fast analysis" in " ".join(c.text)
    for u in report["units"]:
        assert f"cell-{u['layer']}-{u['part']}" in c.ids
    # Plain letters (not a terminal): one line per row, the letters of the decisions in layer order.
    letters = {"safety": "S", "expert": "E", "blend": "B"}
    for part in ("attention", "mlp"):
        want = "".join(letters[u["decision"]] for u in sorted(report["units"], key=lambda u: u["layer"]) if u["part"] == part)
        assert re.search(rf"^  {part}\s+{want}$", res.output, re.M), res.output
    fragile = sum(
        independent_decision(u["d"], tau / 2) != independent_decision(u["d"], tau)
        or independent_decision(u["d"], 2 * tau) != independent_decision(u["d"], tau)
        for u in report["units"]
    )
    assert fragile > 0, "tau in the middle of the d range makes some units fragile"
    assert f"flips if tau is halved or doubled): {fragile} (" in res.output
    assert "\x1b[" not in res.output
    # In colour (as on a terminal): ANSI backgrounds around the letters.
    res = CliRunner().invoke(main, args, color=True)
    assert res.exit_code == 0 and "\x1b[44m" in res.output and "\x1b[43m" in res.output


def test_merge_prints_the_strip(merges, tmp_path):
    p = merges["paths"]
    res = CliRunner().invoke(main, ["merge", "-b", str(p["base"]), "-s", str(p["safety"]), "-m", str(p["expert"]), "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "layerswap_report.json").read_text())
    want = "".join({"safety": "S", "expert": "E", "blend": "B"}[u["decision"]] for u in report["units"])
    assert re.search(rf"^  layer\s+{want}$", res.output, re.M), res.output
    assert "fragile units" in res.output


def test_analyze_html_never_writes_into_an_input(merges):
    p = merges["paths"]
    target = Path(p["base"]) / "model.safetensors"
    before = target.read_bytes()
    res = CliRunner().invoke(main, ["analyze", "-b", str(p["base"]), "-s", str(p["safety"]), "-m", str(p["expert"]), "--html", str(target)])
    assert res.exit_code == 2 and "input" in res.output
    assert target.read_bytes() == before


def test_report_command_regenerates_the_same_pages(merges, tmp_path):
    out = merges["module"]
    res = CliRunner().invoke(main, ["report", str(out / "layerswap_report.json"), "-o", str(tmp_path / "again.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again.html").read_bytes() == (out / "layerswap_report.html").read_bytes()
    before = (merges["bulk"] / "index.html").read_bytes()
    (merges["bulk"] / "index.html").unlink()
    res = CliRunner().invoke(main, ["report", str(merges["bulk"])])
    assert res.exit_code == 0, res.output
    assert (merges["bulk"] / "index.html").read_bytes() == before


def test_report_command_bad_paths(tmp_path):
    (tmp_path / "r.json").write_text("[1, 2]")
    res = CliRunner().invoke(main, ["report", str(tmp_path / "r.json"), "-o", str(tmp_path / "x.html")])
    assert res.exit_code == 2 and "not a layerswap-fast report" in res.output
    (tmp_path / "r.json").write_text("{")
    assert CliRunner().invoke(main, ["report", str(tmp_path / "r.json")]).exit_code == 2
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "layerswap_report.json" in res.output


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_bulk_merge_prints_every_experts_strip_and_fragile_count(merges, tmp_path, granularity):
    p = merges["paths"]
    tau = tau_with_all_three(p, granularity)
    args = ["merge", "-b", str(p["base"]), "-s", str(p["safety"]), "-m", f"ko={p['expert']}", "-m", f"sw={p['safety']}",
            "-o", str(tmp_path / "bulk"), "-g", granularity, "--tau", repr(tau)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    letters = {"safety": "S", "expert": "E", "blend": "B"}
    counts = []
    for name in ("ko", "sw"):
        report = json.loads((tmp_path / "bulk" / name / "layerswap_report.json").read_text())
        for part in (["attention", "mlp"] if granularity == "module" else [None]):
            want = "".join(letters[u["decision"]] for u in sorted(report["units"], key=lambda u: u["layer"]) if u["part"] == part)
            label = f"{name} {part}" if part else name
            assert re.search(rf"^  {label}\s+{want}$", res.output, re.M), res.output
        fragile = sum(
            independent_decision(u["d"], tau / 2) != independent_decision(u["d"], tau)
            or independent_decision(u["d"], 2 * tau) != independent_decision(u["d"], tau)
            for u in report["units"]
        )
        counts.append(f"{name} {fragile}")
    assert f"flips if tau is halved or doubled): {', '.join(counts)}" in res.output
    assert "\x1b[" not in res.output

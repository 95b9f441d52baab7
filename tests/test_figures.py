"""`layerswap-fast report PATH -o FILE.png|svg|pdf`: the paper's two figures from a report, and a
one-line error when matplotlib (the plot extra) is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import layerswap_fast as lsf
from layerswap_fast import synth
from layerswap_fast.cli import main
from layerswap_fast.report import COLOURS

import browser


@pytest.fixture(scope="module")
def merged(tmp_path_factory, make_trio) -> dict[str, Path]:
    paths = make_trio(config=synth.LlamaConfig(n_layers=6))
    root = tmp_path_factory.mktemp("figs")
    out = {}
    for g in ("layer", "module"):
        ds = sorted(abs(u.d) for u in lsf.analyze(paths["base"], paths["safety"], paths["expert"], granularity=g).units)
        lsf.merge(paths["base"], paths["safety"], paths["expert"], root / g, granularity=g, tau=(ds[0] + ds[-1]) / 2)
        out[g] = root / g
    return out


def colour_share(image: Image.Image, hex_colour: str) -> float:
    px = np.asarray(image.convert("RGB"), dtype=np.int16)
    close = np.abs(px - np.array(browser.hex_rgb(hex_colour), dtype=np.int16)).max(axis=2) <= 3
    return float(close.mean())


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_png_figures_are_drawn_and_not_blank(merged, granularity, tmp_path):
    png = tmp_path / "fig.png"
    res = CliRunner().invoke(main, ["report", str(merged[granularity]), "-o", str(png)])
    assert res.exit_code == 0, res.output
    image = Image.open(png)
    assert image.width > 400 and image.height > 300
    px = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(px, axis=0)) > 50, "the figure is blank"
    # Every decision's colour fills part of the heatmap and the d bars.
    for decision in ("safety", "expert", "blend"):
        assert colour_share(image, COLOURS[decision]) > 0.002, decision


def test_svg_and_pdf_figures(merged, tmp_path):
    for name in ("fig.svg", "fig.pdf"):
        res = CliRunner().invoke(main, ["report", str(merged["module"] / "layerswap_report.json"), "-o", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "fig.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "fig.pdf").read_bytes().startswith(b"%PDF")


def test_unknown_suffix_is_exit_2(merged, tmp_path):
    res = CliRunner().invoke(main, ["report", str(merged["layer"]), "-o", str(tmp_path / "fig.jpg")])
    assert res.exit_code == 2 and ".png" in res.output


def test_without_matplotlib_one_line_says_install_the_extra(merged, tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.figure'] = None\n"
            "from layerswap_fast.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, "report", str(merged["layer"]), "-o", str(tmp_path / "f.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'layerswap-fast[plot]'" in lines[0], proc.stderr
    assert not (tmp_path / "f.png").exists()
    # The HTML page needs no extra.
    proc = subprocess.run([sys.executable, "-c", code, "report", str(merged["layer"]), "-o", str(tmp_path / "p.html")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

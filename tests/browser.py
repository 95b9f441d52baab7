"""A real headless Chromium (Debian's ``chromium``) for the report pages: screenshots, and the boxes
the browser laid each element out in."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SIZE = (1400, 1800)


def _run(args: list[str], profile: Path, size: tuple[int, int] = SIZE) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
           "--force-color-profile=srgb", "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
           f"--window-size={size[0]},{size[1]}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


def screenshot(page: Path, png: Path, profile: Path, size: tuple[int, int] = SIZE) -> Path:
    """Renders ``page`` as it is and saves a screenshot of the window."""
    _run([f"--screenshot={png}", page.resolve().as_uri()], profile, size)
    assert png.is_file(), "chromium wrote no screenshot"
    return png


def boxes(page: Path, selector: str, work: Path, size: tuple[int, int] = SIZE) -> dict[str, dict[str, float]]:
    """The layout box (CSS pixels) of every element matching ``selector``, by id, in a window of the
    same size. A copy of the page with one script added reports them (setting a body attribute moves
    nothing); the screenshot is always taken of the page itself."""
    probe = work / f"probe-{page.name}"
    script = ("<script>var o={};document.querySelectorAll(" + json.dumps(selector) + ").forEach(function(e){"
              "var r=e.getBoundingClientRect();o[e.id]={x:r.x,y:r.y,w:r.width,h:r.height};});"
              "document.body.setAttribute('data-boxes',JSON.stringify(o));</script>")
    text = page.read_text(encoding="utf-8")
    probe.write_text(text.replace("</body>", script + "</body>"), encoding="utf-8")
    dom = _run(["--dump-dom", probe.resolve().as_uri()], work / "profile-probe", size).stdout
    m = re.search(r'data-boxes="([^"]*)"', dom)
    assert m, "the probe script did not run"
    return json.loads(html.unescape(m.group(1)))


def hex_rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)

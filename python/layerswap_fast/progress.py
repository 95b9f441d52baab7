"""Progress display for the engine's ``progress(phase, done, total)`` callback: a one-line bar on a
terminal's stderr, nothing when stderr is not a terminal or when quiet.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from layerswap_fast.report import fmt_bytes


class ProgressBar:
    """Callable progress renderer. Use as ``progress=ProgressBar()`` and call :meth:`close` at the end."""

    def __init__(self, stream: Optional[TextIO] = None, enabled: Optional[bool] = None, width: int = 28) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.width = width
        self.phase = ""
        self.started = time.perf_counter()
        self.drawn = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled or phase == "idle":
            return
        if phase != self.phase:
            self.phase = phase
            self.started = time.perf_counter()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        frac = min(done / total, 1.0) if total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        detail = f"{fmt_bytes(done)}/{fmt_bytes(total)} {fmt_bytes(done / elapsed)}/s" if total else ""
        self.stream.write(f"\r{phase:<10} [{bar}] {frac * 100:5.1f}% {detail}\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False

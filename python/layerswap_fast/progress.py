"""Progress display for the engine's ``progress(phase, done, total)`` callback: a one-line bar on a
terminal's stderr, nothing when stderr is not a terminal or when quiet.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from layerswap_fast.report import fmt_bytes


#: A rate is shown once a phase has run this long (before that it says nothing true).
MIN_RATE_SECONDS = 0.5


class ProgressBar:
    """Callable progress renderer. Use as ``progress=ProgressBar()`` and call :meth:`close` at the end."""

    def __init__(self, stream: Optional[TextIO] = None, enabled: Optional[bool] = None, width: int = 28) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.width = width
        self.phase = ""
        self.started = time.perf_counter()
        self.done_at_start = 0
        self.last_done = 0
        self.drawn = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled or phase == "idle":
            return
        now = time.perf_counter()
        if phase != self.phase or done < self.last_done:  # a new phase, or the same phase again (next expert)
            # The rate is measured from the first update of a phase: bytes done before it (work that
            # started before the callback saw it) would otherwise count as done in no time at all.
            self.phase = phase
            self.started, self.done_at_start = now, done
        self.last_done = done
        elapsed = now - self.started
        frac = min(done / total, 1.0) if total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        rate = f" {fmt_bytes((done - self.done_at_start) / elapsed)}/s" if elapsed >= MIN_RATE_SECONDS else ""
        detail = f"{fmt_bytes(done)}/{fmt_bytes(total)}{rate}" if total else ""
        self.stream.write(f"\r{phase:<10} [{bar}] {frac * 100:5.1f}% {detail}\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False

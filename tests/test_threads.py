"""Concurrency: the engine releases the GIL, and thread count never changes results."""

from __future__ import annotations

import threading
import time
from typing import Callable

import layerswap_fast as lsf
from layerswap_fast import synth


def _ticks_during(work: Callable[[], object]) -> tuple[float, float, list[float]]:
    """Runs ``work`` in one thread and a pure-Python ticker in another; they start together at a
    barrier. Returns the working window of ``work`` and the ticker's timestamps. A call that holds the
    GIL stops the ticker for as long as it works."""
    barrier = threading.Barrier(2)
    window: list[float] = []
    ticks: list[float] = []
    done = threading.Event()

    def worker() -> None:
        barrier.wait()
        window.append(time.perf_counter())
        work()
        window.append(time.perf_counter())
        done.set()

    def ticker() -> None:
        barrier.wait()
        while not done.is_set():
            ticks.append(time.perf_counter())

    threads = [threading.Thread(target=worker), threading.Thread(target=ticker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return window[0], window[1], ticks


def _ran_throughout(start: float, end: float, ticks: list[float]) -> bool:
    """The ticker ran all through the middle half of the working window: it never stopped for as long
    as half of it (the machine's scheduler may pause it for a few milliseconds; a held GIL stops it
    for the whole call)."""
    span = end - start
    lo, hi = start + span / 4, end - span / 4
    points = [lo] + [t for t in ticks if lo <= t <= hi] + [hi]
    return max(b - a for a, b in zip(points, points[1:])) < (hi - lo) / 2


def test_gil_is_released_during_engine_work(make_trio):
    paths = make_trio(config=synth.LlamaConfig(n_layers=6, hidden=512, intermediate=1536, vocab=4096), dtype="f32")
    # The check can fail: a C call that holds the GIL (sum over a range never lets go of it) stops the
    # ticker for its whole working window.
    start, end, ticks = _ticks_during(lambda: sum(range(20_000_000)))
    assert end - start > 0.05 and not _ran_throughout(start, end, ticks)
    # One engine call (no progress callback, so no Python runs on its behalf): the ticker runs all along.
    start, end, ticks = _ticks_during(lambda: lsf.analyze(paths["base"], paths["safety"], paths["expert"], threads=1))
    assert end - start > 0.05, "too little work to tell"
    assert _ran_throughout(start, end, ticks), (end - start, len(ticks))


def test_progress_callback_is_called_with_phases(make_trio):
    paths = make_trio(config=synth.LlamaConfig(n_layers=6, hidden=512, intermediate=1536, vocab=4096), dtype="f32")
    seen = []
    lsf.analyze(paths["base"], paths["safety"], paths["expert"], progress=lambda phase, done, total: seen.append((phase, done, total)))
    assert seen and seen[-1][0] == "analyze" and seen[-1][1] == seen[-1][2] > 0


def test_callback_exception_cancels_and_propagates(make_trio, tmp_path):
    paths = make_trio(config=synth.LlamaConfig(n_layers=6, hidden=512, intermediate=1536, vocab=4096), dtype="f32")

    def boom(phase: str, done: int, total: int) -> None:
        raise RuntimeError("stop here")

    try:
        lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "o", progress=boom)
    except RuntimeError as e:
        assert "stop here" in str(e)
    else:
        raise AssertionError("callback error was swallowed")
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []

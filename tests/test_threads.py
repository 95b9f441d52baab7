"""Concurrency: the engine releases the GIL, and thread count never changes results."""

from __future__ import annotations

import threading
import time

import layerswap_fast as lsf
from layerswap_fast import synth


def test_gil_is_released_during_engine_work(make_trio):
    paths = make_trio(config=synth.LlamaConfig(n_layers=6, hidden=512, intermediate=1536, vocab=4096), dtype="f32")
    done = threading.Event()
    window: dict[str, float] = {}

    def work() -> None:
        window["start"] = time.perf_counter()
        for _ in range(3):
            lsf.analyze(paths["base"], paths["safety"], paths["expert"], threads=1)
        window["end"] = time.perf_counter()
        done.set()

    t = threading.Thread(target=work)
    ticks = []
    t.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    t.join()
    inside = [x for x in ticks if window["start"] < x < window["end"]]
    # Were the GIL held for the engine's work, this loop could not run while it ran.
    assert window["end"] - window["start"] > 0.05
    assert len(inside) > 10_000, (len(inside), window)
    # And the loop ran throughout: no gap longer than the binding's ~100 ms progress tick plus slack.
    gaps = [b - a for a, b in zip(inside, inside[1:])]
    assert max(gaps) < 0.5


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

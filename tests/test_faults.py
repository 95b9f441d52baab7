"""Faults during a merge: a full disk, SIGINT / SIGTERM, an input truncated, rewritten or replaced while
it is read. Each must end in a clean error (no crash, no traceback), no output folder, no staging
leftover, and inputs byte-identical to what they were (except the ones a test damages on purpose,
which are private copies).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest
from click.testing import CliRunner

import layerswap_fast as lsf
from conftest import merge_args, tree_digest
from layerswap_fast import cli, synth
from layerswap_fast.errors import InvalidModelError

# Six Llama layers of hidden 1024: ~165 MB per model in bf16, so that with one thread each pass takes
# long enough (a good fraction of a second) to be caught in the middle.
BIG = synth.LlamaConfig(n_layers=6, hidden=1024, intermediate=2816, heads=8, kv_heads=8, vocab=4096)


def make_big_trio(root: Path, config: synth.LlamaConfig = BIG) -> dict[str, Path]:
    """A large trio written fast: one random block per role, repeated. The values are finite and the
    task vectors small, which is all these tests need."""
    specs = config.tensors()
    rng = np.random.default_rng(5)
    base = rng.standard_normal(1 << 20, dtype=np.float32) * np.float32(0.02)
    blocks = {"base": base}
    for role, scale in (("safety", 0.002), ("expert", 0.003)):
        blocks[role] = base + rng.standard_normal(base.size, dtype=np.float32) * np.float32(scale)
    paths = {}
    for role, values in blocks.items():
        folder = root / role
        folder.mkdir(parents=True)
        raw = synth.encode(values, "bf16")
        with open(folder / "model.safetensors", "wb") as f:
            f.write(synth.header_bytes(specs, "bf16"))
            for _, shape in specs:
                n = int(np.prod(shape)) * 2
                while n > 0:
                    f.write(raw[: min(n, len(raw))])
                    n -= len(raw)
        (folder / "config.json").write_text(json.dumps(config.config_json("bf16")))
        paths[role] = folder
    return paths


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    paths = make_big_trio(tmp_path_factory.mktemp("big"))
    before = {r: tree_digest(p) for r, p in paths.items()}
    yield paths
    assert {r: tree_digest(p) for r, p in paths.items()} == before, "an input was modified"


@pytest.fixture
def small(trio: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """The default small trio; checked unchanged after each test."""
    before = {r: tree_digest(p) for r, p in trio.items()}
    yield trio
    assert {r: tree_digest(p) for r, p in trio.items()} == before, "an input was modified"


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# --- disk full ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `where` (root only; skips otherwise)."""
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up ({proc.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def pages(n: int) -> int:
    return -(-n // 4096)


def test_disk_full_before_any_data_is_written(small: dict[str, Path], tmp_path: Path) -> None:
    """The output shards do not fit: the space reservation fails up front, naming the shard."""
    with tmpfs(tmp_path / "disk", 64 * 1024) as disk:
        out = disk / "merged"
        result = CliRunner().invoke(cli.main, merge_args(small, out))
        assert result.exit_code == 1, result.output
        line = result.stderr.strip()
        assert len(line.splitlines()) == 1 and "No space left on device" in line and "model.safetensors" in line, line
        assert list(disk.iterdir()) == [], "something was left on the full disk"


@pytest.mark.parametrize("shard_size", [None, "100KB"])
def test_disk_full_at_every_step_of_the_write(small: dict[str, Path], tmp_path: Path, shard_size: Optional[str]) -> None:
    """A disk just too small at each successive step (reserving each shard, the index, each side file,
    the report): always exit 1 and an empty disk afterwards; with enough room, a complete model."""
    extra = ["--shard-size", shard_size] if shard_size else []
    data_pages = pages((small["expert"] / "model.safetensors").stat().st_size)
    messages = set()
    for spare in range(-2, 12):
        with tmpfs(tmp_path / f"disk{spare}", (data_pages + spare) * 4096 + (8 * 4096 if shard_size else 0)) as disk:
            out = disk / "merged"
            result = CliRunner().invoke(cli.main, merge_args(small, out, *extra))
            if result.exit_code == 0:
                assert (out / "layerswap_report.json").is_file() and not leftovers(out)
                break
            assert result.exit_code == 1, (spare, result.output, result.exception)
            line = result.stderr.strip()
            assert len(line.splitlines()) == 1 and "No space left on device" in line, line
            assert list(disk.iterdir()) == [], f"leftovers on the full disk: {list(disk.rglob('*'))}"
            messages.add(line.split(": No space")[0].rsplit("/", 1)[-1])
    else:
        pytest.fail("never enough room")
    # The failures happened at different steps: reserving data and later, after the shards were written.
    assert len(messages) >= 3, messages


def test_disk_full_through_the_api_is_an_oserror(small: dict[str, Path], tmp_path: Path) -> None:
    import errno

    with tmpfs(tmp_path / "disk", 64 * 1024) as disk:
        with pytest.raises(OSError) as info:
            lsf.merge(small["base"], small["safety"], small["expert"], disk / "merged")
        assert info.value.errno == errno.ENOSPC
        assert list(disk.iterdir()) == []


# --- signals ------------------------------------------------------------------------------------------


def _default_sigint() -> None:
    # A test run started in the background of a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler in the child: give the child a user's terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_merge(paths: dict[str, Path], out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "layerswap_fast", *merge_args(paths, out, "--threads", "1", *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def in_engine_pass(pid: int) -> bool:
    """The engine's worker pool exists only while an analyze or write pass runs."""
    try:
        return any((t / "comm").read_text().startswith("layerswap-") for t in Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return False


def stop_in(proc: subprocess.Popen, out: Path, phase: str, timeout: float = 30.0) -> None:
    """Stops (SIGSTOP) the child inside the given pass: 'analyze' (pool running, no output shard
    yet) or 'write' (pool running and the output shard created)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"merge ended before the {phase} pass was seen: {proc.returncode} {proc.stderr.read() if proc.stderr else ''}")
        stage = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")]
        os.kill(proc.pid, signal.SIGSTOP)
        shard = bool(stage) and any(stage[0].glob("*.safetensors"))
        if stage and in_engine_pass(proc.pid) and shard == (phase == "write"):
            return
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.002)
    pytest.fail(f"never saw the {phase} pass")


@pytest.mark.parametrize("phase", ["analyze", "write"])
@pytest.mark.parametrize("sig, status, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated"),
                                              (signal.SIGHUP, 129, "terminated by SIGHUP")], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_mid_merge(big: dict[str, Path], tmp_path: Path, phase: str, sig: int, status: int, word: str) -> None:
    out = tmp_path / "merged"
    proc = start_merge(big, out)
    try:
        stop_in(proc, out, phase)
        os.kill(proc.pid, sig)
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=30)
        answered = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, err
    assert err.strip() == f"layerswap-fast: {word}; nothing was written", err
    print(f"{signal.Signals(sig).name} during the {phase} pass: stopped in {answered:.3f}s")
    assert answered < 1.0, f"took {answered:.2f}s to stop"
    assert not out.exists() and not leftovers(out)


# --- inputs that change during the run ----------------------------------------------------------------


@pytest.fixture
def private_expert(big: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """The big trio with a private copy of the expert (which the test may damage)."""
    expert = tmp_path / "expert"
    shutil.copytree(big["expert"], expert)
    return {**big, "expert": expert}


def test_input_truncated_mid_merge_is_a_clean_error(private_expert: dict[str, Path], tmp_path: Path) -> None:
    """No mapped memory, so no SIGBUS: reads past the new end fail and the run stops with exit 2."""
    out = tmp_path / "merged"
    shard = private_expert["expert"] / "model.safetensors"
    proc = start_merge(private_expert, out)
    try:
        stop_in(proc, out, "write")
        os.truncate(shard, shard.stat().st_size // 3)
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, (proc.returncode, err)
    line = err.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in err, err
    assert str(shard) in line and ("truncated or changed" in line or "changed or replaced" in line), line
    assert not out.exists() and not leftovers(out)


def _merge_changing_expert(paths: dict[str, Path], out: Path, change) -> str:
    """Runs the API merge and calls `change()` from the progress callback once the write pass runs."""
    done = []

    def progress(phase: str, n: int, total: int) -> None:
        if phase == "write" and not done:
            change()
            done.append(phase)

    with pytest.raises(InvalidModelError) as info:
        lsf.merge(paths["base"], paths["safety"], paths["expert"], out, threads=1, progress=progress)
    assert done, "the change never happened"
    assert not out.exists() and not leftovers(out)
    return str(info.value)


def test_input_rewritten_in_place_mid_merge_is_detected(private_expert: dict[str, Path], tmp_path: Path) -> None:
    shard = private_expert["expert"] / "model.safetensors"

    def rewrite() -> None:
        with open(shard, "r+b") as f:  # same size, other bytes, past the header
            f.seek(shard.stat().st_size // 2)
            f.write(b"\x00" * 4096)

    message = _merge_changing_expert(private_expert, tmp_path / "merged", rewrite)
    assert str(shard) in message and "changed or replaced while it was being read" in message


def test_input_replaced_mid_merge_is_detected(big: dict[str, Path], tmp_path: Path) -> None:
    """Replacing the file by a rename keeps the old data readable, but the result would no longer
    correspond to the file at that path: refused. (The shared input itself is never touched: the
    test works on a hard link to it.)"""
    expert = tmp_path / "expert"
    expert.mkdir()
    shard = expert / "model.safetensors"
    os.link(big["expert"] / "model.safetensors", shard)
    shutil.copy(big["expert"] / "config.json", expert / "config.json")
    other = tmp_path / f"other-{uuid.uuid4().hex}"
    other.write_bytes(b"not the same file")
    message = _merge_changing_expert({**big, "expert": expert}, tmp_path / "merged", lambda: os.replace(other, shard))
    assert str(shard) in message and "changed or replaced" in message

"""Writing less than the output: the output is laid out like the language expert's own shards, so on a
copy-on-write file system every tensor copied whole shares the input's blocks instead of being
written. Checked on a loop-mounted XFS (reflink=1) against the same merge on this machine's ext4.

Expected values come from the inputs' own headers and from the numpy computation of METHOD.md in
``models.py``, never from the engine's output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

import layerswap_fast as lsf
from layerswap_fast import bulk, synth
from conftest import model_digest
from models import numpy_plan, read_header, read_model, shard_files, tensor_decision

BLOCK = 4096
# Big enough that most tensors span whole 4 KiB blocks (q/k/v/o 32 KiB, MLP 88 KiB, bf16), small
# enough that verifying every merge (tests/verify_all.py) stays quick.
CONFIG = synth.LlamaConfig(n_layers=4, hidden=128, intermediate=352, heads=4, kv_heads=2, vocab=512)
SHARD = 600_000  # four shards per model


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True)


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 768 MiB XFS file system with reflink, in a sparse image file, loop-mounted for this module."""
    if os.geteuid() != 0:
        pytest.skip("loop-mounting an XFS image needs root (CI runs as root)")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs not found: install xfsprogs (.ci/run does)")
    root = tmp_path_factory.mktemp("xfs")
    image, mnt = root / "xfs.img", root / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(768 << 20)
    made = run("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.xfs -m reflink=1 failed: {made.stderr.strip()}")
    mounted = run("mount", "-o", "loop", str(image), str(mnt))
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an XFS image here (container without loop devices?): {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        for _ in range(20):
            if run("umount", str(mnt)).returncode == 0:
                break
            subprocess.run(["sleep", "0.2"])
        image.unlink()


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def headers(folder: Path) -> dict[str, tuple[str, int, int]]:
    """tensor -> (file, absolute offset, size), read from the files' own headers."""
    out = {}
    for f in shard_files(folder):
        header, start = read_header(f)
        header.pop("__metadata__", None)
        for name, v in header.items():
            a, b = v["data_offsets"]
            out[name] = (f.name, start + a, b - a)
    return out


def extents(path: Path) -> list[tuple[int, bool]]:
    """(bytes, shared) of every extent of a file, from `filefrag -v` (4 KiB blocks)."""
    text = run("filefrag", "-b4096", "-v", str(path)).stdout
    out = []
    for line in text.splitlines():
        m = re.match(r"^\s*\d+:\s*\d+\.\.\s*\d+:\s*\d+\.\.\s*\d+:\s*(\d+):", line)
        if m:
            out.append((int(m.group(1)) * BLOCK, "shared" in line))
    return out


def blend_and_copy_bytes(paths: dict[str, Path], expert: Path, granularity: str) -> tuple[int, int, int]:
    """(bytes of blended tensors, bytes of copied tensors, number of copied tensors), from numpy's
    decisions."""
    plan = numpy_plan(paths["base"], paths["safety"], expert, granularity)
    blended = copied = n_copied = 0
    for name, (_, _, raw) in read_model(expert).items():
        if tensor_decision(name, plan, granularity) == "blend":
            blended += len(raw)
        else:
            copied += len(raw)
            n_copied += 1
    return blended, copied, n_copied


def bounds_hold(report: dict[str, Any], blended: int, copied: int, n_copied: int) -> None:
    """Written: the blends and at most the two partial blocks at each copied tensor's edges (and at
    each chunk edge, of which a tensor this small has none); the rest was shared."""
    written, cloned = report["output"]["bytes_written"], report["output"]["bytes_cloned"]
    assert written + cloned == blended + copied
    assert blended <= written <= blended + 2 * BLOCK * n_copied, (written, blended, n_copied)


@pytest.fixture(scope="module")
def trio_on_xfs(xfs: Path) -> dict[str, Path]:
    """The trio plus three more language experts, all saved the same way (same shards, same order)."""
    paths = synth.make_trio(xfs / "models", CONFIG, shard_bytes={r: SHARD for r in synth.ROLES})
    for k in (1, 2, 3):
        planting = synth.Planting(safety_layers=[2, 3], expert_layers=[k - 1, k])
        paths[f"x{k}"] = synth.make_trio(xfs / f"extra-{k}", CONFIG, planting=planting, shard_bytes={"expert": SHARD},
                                         roles=("expert",))["expert"]
    return paths


def test_output_is_laid_out_like_the_expert(trio_on_xfs, tmp_path):
    """On any file system: the same shard files, the same tensors in each, at the same offsets as the
    language expert's; with another output dtype, the plain layout (nothing to share)."""
    p = trio_on_xfs
    lsf.merge(p["base"], p["safety"], p["expert"], tmp_path / "same")
    assert headers(tmp_path / "same") == headers(p["expert"])
    report = lsf.merge(p["base"], p["safety"], p["expert"], tmp_path / "f32", out_dtype="f32")
    assert report["output"]["bytes_cloned"] == 0
    assert {n: s for n, (_, _, s) in headers(tmp_path / "f32").items()} == {n: 2 * s for n, (_, _, s) in headers(p["expert"]).items()}
    # A shard size below the expert's shards: split anew, still every tensor.
    lsf.merge(p["base"], p["safety"], p["expert"], tmp_path / "small", shard_size="200kB")
    assert set(headers(tmp_path / "small")) == set(headers(p["expert"]))
    assert len(list((tmp_path / "small").glob("*.safetensors"))) > len(list(p["expert"].glob("*.safetensors")))


def test_merge_on_xfs_shares_blocks_and_equals_the_ext4_merge(xfs, trio_on_xfs, tmp_path):
    p = trio_on_xfs
    out = xfs / "merged"
    sync_used = used_bytes(xfs)
    report = lsf.merge(p["base"], p["safety"], p["expert"], out, granularity="module")
    os.sync()
    grown = used_bytes(xfs) - sync_used
    ext4 = lsf.merge(p["base"], p["safety"], p["expert"], tmp_path / "ext4", granularity="module")
    # Byte-identical to the same merge on ext4, where nothing is shared.
    a, b = model_digest(out), model_digest(tmp_path / "ext4")
    assert a == b
    assert ext4["output"]["bytes_cloned"] == 0
    blended, copied, n_copied = blend_and_copy_bytes(p, p["expert"], "module")
    assert copied > 3 * blended  # mostly swaps: the case this is for
    bounds_hold(report, blended, copied, n_copied)
    # The file system agrees: every shard has shared extents; the blocks the output has to itself
    # are what was written (rounded out to whole blocks: one per shard header, two per tensor edge);
    # and the file system grew by far less than the output's size (its own preallocations and
    # metadata make the free-space figure move by a few hundred KiB either way).
    shards = sorted(out.glob("*.safetensors"))
    ext = {f: extents(f) for f in shards}
    assert all(any(shared for _, shared in e) for e in ext.values()), ext
    own = sum(n for e in ext.values() for n, shared in e if not shared)
    assert own <= report["output"]["bytes_written"] + BLOCK * (len(shards) + 2 * n_copied), (own, report["output"]["bytes_written"])
    total = sum(f.stat().st_size for f in shards)
    assert own < total / 3 and grown < total / 2, (own, grown, total)


def test_bulk_of_four_on_xfs_writes_only_the_blends(xfs, trio_on_xfs):
    p = trio_on_xfs
    names = ["expert", "x1", "x2", "x3"]
    specs = [bulk.ExpertSpec(n, p[n], lsf.MergeOptions(granularity="module")) for n in names]
    summary = bulk.bulk_merge(p["base"], p["safety"], specs, xfs / "bulk")
    assert {e["status"] for e in summary["experts"].values()} == {"ok"}
    for n in names:
        report = json.loads((xfs / "bulk" / n / "layerswap_report.json").read_text())
        bounds_hold(report, *blend_and_copy_bytes(p, p[n], "module"))
    shutil.rmtree(xfs / "bulk")

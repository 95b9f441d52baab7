"""The output folder in ordinary hands: permissions under the umask, what --force may replace, outputs
that a rename cannot replace, staging leftovers of killed runs, and every written path checked
against every input.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

import layerswap_fast as lsf
from conftest import GOOD, HOSTILE, merge_args, run_cli, tree_digest
from layerswap_fast import bulk, cli
from test_faults import tmpfs



def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def one_error(code: int, err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("layerswap-fast: error: "), (code, err)
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture
def umask022() -> Iterator[int]:
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


# --- permissions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_output_folders_and_files_get_the_umask_permissions(tmp_path: Path, mask: int) -> None:
    """As mkdir and cp would: a model server running as another user can read the merge."""
    old = os.umask(mask)
    try:
        out = tmp_path / "single"
        lsf.merge(GOOD["base"], GOOD["safety"], GOOD["expert"], out)
        bulk.bulk_merge(GOOD["base"], GOOD["safety"], [bulk.ExpertSpec("ko", GOOD["expert"])], tmp_path / "bulk")
    finally:
        os.umask(old)
    for folder in (out, tmp_path / "bulk", tmp_path / "bulk" / "ko"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask, (folder, oct(folder.stat().st_mode))
        for f in folder.iterdir():
            if f.is_file():
                assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, (f, oct(f.stat().st_mode))


# --- what --force may replace ----------------------------------------------------------------------------


def _foreign(root: Path, kind: str) -> Path:
    out = root / "project"
    out.mkdir()
    if kind == "git":
        (out / ".git").mkdir()
        (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    elif kind == "notes":
        (out / "notes.txt").write_text("my notes\n")
    elif kind == "lookalike":  # a model folder made by someone else: still not ours to delete
        shutil.copytree(GOOD["expert"], out, dirs_exist_ok=True)
    return out


@pytest.mark.parametrize("kind", ["git", "notes", "lookalike"])
def test_force_refuses_a_folder_this_tool_did_not_write(tmp_path: Path, kind: str) -> None:
    out = _foreign(tmp_path, kind)
    before = tree_digest(out), hidden(out)
    code, _, err = run_cli(merge_args(GOOD, out, "--force"))
    one_error(code, err, str(out), "not an output of layerswap-fast")
    assert (tree_digest(out), hidden(out)) == before
    assert hidden(tmp_path) == [], "a staging folder was made for a refused run"
    with pytest.raises(lsf.OutputExistsError, match="not an output"):
        lsf.merge(GOOD["base"], GOOD["safety"], GOOD["expert"], out, force=True)
    assert (tree_digest(out), hidden(out)) == before


def test_force_replaces_an_empty_folder_and_a_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    code, _, err = run_cli(merge_args(GOOD, out, "--force"))
    assert code == 0, err
    first = tree_digest(out)
    code, _, err = run_cli(merge_args(GOOD, out, "--force", "--alpha", "0.25"))
    assert code == 0, err
    assert tree_digest(out) != first and json.loads((out / "layerswap_report.json").read_text())["parameters"]["alpha"] == 0.25
    assert hidden(tmp_path) == []


def test_bulk_force_refuses_a_foreign_expert_folder(tmp_path: Path) -> None:
    out = tmp_path / "bulk"
    out.mkdir()
    (out / "layerswap_bulk.json").write_text('{"experts": {}}\n')
    mine = out / "ko"
    mine.mkdir()
    (mine / "thesis.tex").write_text("\\documentclass{article}\n")
    before = tree_digest(mine)
    summary = bulk.bulk_merge(GOOD["base"], GOOD["safety"], [bulk.ExpertSpec("ko", GOOD["expert"])], out, force=True)
    assert summary["experts"]["ko"]["status"] == "failed" and "not an output of layerswap-fast" in summary["experts"]["ko"]["error"]
    assert tree_digest(mine) == before


def test_bulk_out_must_be_new_empty_or_a_bulk_output(tmp_path: Path) -> None:
    out = _foreign(tmp_path, "notes")
    code, _, err = run_cli(["merge", "-b", str(GOOD["base"]), "-s", str(GOOD["safety"]), "-m", f"ko={GOOD['expert']}", "-o", str(out), "-q"])
    one_error(code, err, str(out), "not an output of a bulk run")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# --- outputs a rename cannot replace ---------------------------------------------------------------------


def test_current_directory_as_output_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`-o .` (or a parent of it): renaming it away would pull the folder from under the shell. Refused
    before any staging folder exists; the folder's content is untouched."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "layerswap_report.json").write_text("{}\n")  # a previous output, so --force would apply
    monkeypatch.chdir(work)
    for target in (".", str(work), str(tmp_path)):
        if target == str(tmp_path):
            (tmp_path / "layerswap_report.json").write_text("{}\n")
        code, _, err = run_cli(merge_args(GOOD, Path(target), "--force"))
        one_error(code, err, "current directory")
        assert hidden(work) == [] and hidden(tmp_path) == []
    assert sorted(p.name for p in work.iterdir()) == ["layerswap_report.json"]


def test_mount_point_as_output_is_refused_before_any_work(tmp_path: Path) -> None:
    """A container volume or any mount point: the merge does not run and then fail with 'Device or
    resource busy'; it is refused up front and nothing is left in the parent or the mount."""
    with tmpfs(tmp_path / "volume", 1 << 20) as volume:
        (volume / "layerswap_report.json").write_text("{}\n")
        code, _, err = run_cli(merge_args(GOOD, volume, "--force"))
        one_error(code, err, str(volume), "mount point", str(volume / "merged"))
        assert hidden(tmp_path) == [] and sorted(p.name for p in volume.iterdir()) == ["layerswap_report.json"]
        # The suggested folder inside it works.
        code, _, err = run_cli(merge_args(GOOD, volume / "merged"))
        assert code == 0, err


# --- staging leftovers ------------------------------------------------------------------------------------

_KILLED = """
import os, signal, sys
from pathlib import Path
from layerswap_fast import folder
out = Path(sys.argv[1])
stage = folder.new_stage(out)
(stage / "model.safetensors").write_bytes(b"half written")
if sys.argv[2] == "old":  # killed between moving the old output aside and publishing the new one
    old = folder._mkdtemp(out.parent, out.name, "old")
    os.rename(out, old / out.name)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_run(out: Path, kind: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(out), kind], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_stale_leftovers_of_a_killed_run_are_removed_with_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    _killed_run(out, "partial")
    assert len(hidden(tmp_path)) == 1 and hidden(tmp_path)[0].startswith(".merged.partial-")
    code, _, err = run_cli(merge_args(GOOD, out))
    assert code == 0, err
    assert "warning" in err and "removed the leftover of an earlier run that was killed" in err, err
    assert hidden(tmp_path) == [] and (out / "model.safetensors").is_file()


def test_a_moved_aside_previous_output_is_kept_and_named(tmp_path: Path) -> None:
    """Killed between the two renames of a replacement: the only copy of the previous output is never
    deleted; the warning says where it is."""
    out = tmp_path / "merged"
    lsf.merge(GOOD["base"], GOOD["safety"], GOOD["expert"], out)
    previous = tree_digest(out)
    _killed_run(out, "old")
    assert not out.exists()
    code, _, err = run_cli(merge_args(GOOD, out, "--alpha", "0.3"))
    assert code == 0, err
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.old-")]
    assert len(kept) == 1 and tree_digest(kept[0] / "merged") == previous
    assert str(kept[0] / "merged") in err and "previous output" in err, err
    assert not any(p.name.startswith(".merged.partial-") for p in tmp_path.iterdir())


def test_a_live_runs_staging_folder_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    from layerswap_fast import folder

    live = folder.new_stage(out)  # this process is alive: another run may be writing it
    try:
        code, _, err = run_cli(merge_args(GOOD, out))
        assert code == 0 and "still going" in err and live.name in err, err
        assert live.is_dir()
    finally:
        folder.discard_stage(live)


# --- every written path against every input ---------------------------------------------------------------


@pytest.mark.parametrize("target", ["base_weights", "safety_config", "expert_folder", "layout"])
def test_save_stats_never_overwrites_an_input(trio_copy: dict[str, Path], tmp_path: Path, target: str) -> None:
    layout = tmp_path / "models" / "layout.json"
    layout.write_text(json.dumps(lsf._core.builtin_layouts()["llama"]))
    path = {"base_weights": trio_copy["base"] / "model.safetensors", "safety_config": trio_copy["safety"] / "config.json",
            "expert_folder": trio_copy["expert"] / "stats.json", "layout": layout}[target]
    before = tree_digest(tmp_path / "models")
    code, _, err = run_cli(["analyze", "-b", str(trio_copy["base"]), "-s", str(trio_copy["safety"]), "-m", str(trio_copy["expert"]),
                            "--layout", str(layout), "--save-stats", str(path)])
    one_error(code, err, str(path), "overlaps the input")
    assert tree_digest(tmp_path / "models") == before


def test_save_stats_never_overwrites_an_unrelated_file(tmp_path: Path) -> None:
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    args = ["analyze", "-b", str(GOOD["base"]), "-s", str(GOOD["safety"]), "-m", str(GOOD["expert"]), "--save-stats", str(notes)]
    code, _, err = run_cli(args)
    one_error(code, err, str(notes), "not a statistics file")
    assert notes.read_text() == '{"mine": 1}\n'
    stats = tmp_path / "stats.json"
    for _ in range(2):  # a statistics file may be replaced by a new one
        code, _, err = run_cli(args[:-1] + [str(stats)])
        assert code == 0, err
    assert json.loads(stats.read_text())["layerswap_stats"] == 1


def test_bulk_outputs_never_land_on_an_input(trio_copy: dict[str, Path], tmp_path: Path) -> None:
    """OUT of a bulk run (its manifest, summary and folders) against the models, layout and plan file."""
    plan = tmp_path / "models" / "plan.toml"
    plan.write_text('base = "base"\nsafety = "safety"\nout = "."\n[experts.ko]\npath = "expert"\n')
    before = tree_digest(tmp_path / "models")
    code, _, err = run_cli(["merge", "--plan", str(plan), "-q"])
    one_error(code, err, "overlaps the input")
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(lsf._core.builtin_layouts()["llama"]))
    with pytest.raises(lsf.OutputExistsError, match="overlaps the input"):
        bulk.bulk_merge(trio_copy["base"], trio_copy["safety"], [bulk.ExpertSpec("ko", trio_copy["expert"])], tmp_path, layout=layout)
    assert tree_digest(tmp_path / "models") == before


def test_output_overlapping_the_layout_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    layout = out / "layout.json"
    layout.write_text(json.dumps(lsf._core.builtin_layouts()["llama"]))
    code, _, err = run_cli(merge_args(GOOD, out, "--force", "--layout", str(layout)))
    one_error(code, err, "overlaps the input", "layout.json")
    assert layout.is_file()


# --- bulk: names, Ctrl-C, early failures ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["layerswap_bulk.json", "layerswap_bulk_summary.json", "index.html", "LayerSwap_Bulk.json", "layerswap_card.md"])
def test_expert_names_that_collide_with_the_tools_files_are_refused(tmp_path: Path, name: str) -> None:
    out = tmp_path / "bulk"
    code, _, err = run_cli(["merge", "-b", str(GOOD["base"]), "-s", str(GOOD["safety"]), "-m", f"{name}={GOOD['expert']}",
                            "-m", f"ko={GOOD['expert']}", "-o", str(out), "-q"])
    one_error(code, err, repr(name), "layerswap-fast writes")
    assert not out.exists()


def test_expert_names_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    with pytest.raises(lsf.InvalidOptionError, match="unique"):
        bulk.bulk_merge(GOOD["base"], GOOD["safety"], [bulk.ExpertSpec("ko", GOOD["expert"]), bulk.ExpertSpec("KO", GOOD["expert"])], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_ctrl_c_in_a_bulk_run_says_what_was_published(tmp_path: Path) -> None:
    """Interrupted after the first expert was published: the message names it (and the manifest),
    and the experts not written; the published output is complete and in the manifest."""
    out = tmp_path / "bulk"
    specs = [bulk.ExpertSpec(n, GOOD["expert"]) for n in ("ko", "sw", "te")]

    def on_expert(name: str, entry: dict[str, Any]) -> None:
        if entry["status"] == "ok":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        bulk.bulk_merge(GOOD["base"], GOOD["safety"], specs, out, on_expert=on_expert)
    written = getattr(info.value, "written", "")
    manifest = json.loads((out / "layerswap_bulk.json").read_text())
    published = sorted(manifest["experts"])
    assert published and all((out / n / "layerswap_report.json").is_file() for n in published)
    assert all(str(out / n) in written for n in published) and "layerswap_bulk.json" in written, written
    missing = [s.name for s in specs if s.name not in published]
    assert missing and f"not written: {', '.join(missing)}" in written, written
    assert cli._interrupted(info.value, "interrupted").startswith("layerswap-fast: interrupted; published before the interruption: ")
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a staging folder was left"


def test_ctrl_c_before_anything_was_written(tmp_path: Path) -> None:
    out = tmp_path / "bulk"

    def progress(phase: str, done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        bulk.bulk_merge(GOOD["base"], GOOD["safety"], [bulk.ExpertSpec("ko", GOOD["expert"])], out, progress=progress)
    assert getattr(info.value, "written", "") == "no expert's output was written"
    assert not out.exists()


def test_bulk_run_that_fails_before_any_expert_is_written_leaves_no_out(tmp_path: Path) -> None:
    bad = HOSTILE / "models" / "nan_embedding_expert"
    out = tmp_path / "bulk"
    code, _, err = run_cli(["merge", "-b", str(GOOD["base"]), "-s", str(GOOD["safety"]), "-m", f"ko={bad}", "-m", f"sw={bad}", "-o", str(out), "-q"])
    assert code == 1, err
    assert not out.exists()
    # Failing on saved statistics of another numerics, before the analyze pass.
    stats = tmp_path / "stats.json"
    code, _, err = run_cli(["analyze", "-b", str(GOOD["base"]), "-s", str(GOOD["safety"]), "-m", str(GOOD["expert"]), "--save-stats", str(stats)])
    assert code == 0, err
    code, _, err = run_cli(["merge", "-b", str(GOOD["base"]), "-s", str(GOOD["safety"]), "-m", f"ko={GOOD['expert']}", "-o", str(out),
                            "--stats", str(stats), "--numerics", "official", "-q"])
    one_error(code, err, "numerics")
    assert not out.exists()

"""The binding: one Session opens the models once for the analysis and every write; the frozen result
classes round-trip through dicts, JSON and pickle; each unit's own decision and alpha are what gets
written; an engine error crosses a process pool, and one table names OS errors raised and reported."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest

import layerswap_fast as lsf
from layerswap_fast import _core, bulk
from layerswap_fast.api import open_session

def _copy_expert(trio: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(trio["expert"], dest)
    return dest


def _rewrite_in_place(folder: Path) -> None:
    """Changes one byte of every shard's data (same size, same inode) and moves its mtime on."""
    for f in folder.glob("*.safetensors"):
        with open(f, "r+b") as fh:
            fh.seek(-1, os.SEEK_END)
            b = fh.read(1)
            fh.seek(-1, os.SEEK_END)
            fh.write(bytes([b[0] ^ 0x01]))
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


# --- one opening --------------------------------------------------------------------------------


def test_an_expert_rewritten_after_the_analysis_is_refused_by_its_write(trio: dict[str, Path], tmp_path: Path) -> None:
    expert = _copy_expert(trio, tmp_path / "expert")
    session = lsf._core.Session(trio["base"], trio["safety"], [expert])
    plan = session.analyze(lsf.MergeOptions())[0]
    _rewrite_in_place(expert)
    (tmp_path / "out").mkdir()
    with pytest.raises(lsf.InvalidModelError, match="changed or replaced"):
        session.write(0, plan, tmp_path / "out")


def test_a_bulk_run_opens_each_expert_once(trio: dict[str, Path], tmp_path: Path) -> None:
    """Expert b is rewritten while expert a is being written, after the analysis: had b's write opened
    it again, the new bytes would be merged silently with the old decisions; one opening catches it."""
    a = _copy_expert(trio, tmp_path / "a")
    b = _copy_expert(trio, tmp_path / "b")
    rewritten = []

    def progress(phase: str, done: int, total: int) -> None:
        if phase in ("write", "sync") and not rewritten:  # ticks are 0.1 s apart: a small write may show only "sync"
            _rewrite_in_place(b)
            rewritten.append(phase)

    specs = [bulk.ExpertSpec("a", a), bulk.ExpertSpec("b", b)]
    summary = bulk.bulk_merge(trio["base"], trio["safety"], specs, tmp_path / "out", progress=progress)
    assert rewritten
    assert summary["experts"]["a"]["status"] == "ok"
    assert summary["experts"]["b"]["status"] == "failed"
    assert summary["experts"]["b"]["kind"] == "InvalidModelError" and "changed or replaced" in summary["experts"]["b"]["error"]
    assert not (tmp_path / "out" / "b").exists()


def test_session_reports_the_experts_it_could_not_open(trio: dict[str, Path], tmp_path: Path) -> None:
    session = open_session(trio["base"], trio["safety"], [trio["expert"], tmp_path / "missing", trio["expert"]], None, lenient=True)
    assert session.opened == [0, 2]
    [(index, err)] = session.failures
    assert index == 1 and isinstance(err, FileNotFoundError) and "missing" in str(err)
    plans = session.analyze([lsf.MergeOptions(), lsf.MergeOptions(tau=0.5)])
    assert len(plans) == 2 and plans[0].decisions() != plans[1].decisions() and set(plans[1].decisions()) == {"blend"}
    with pytest.raises(lsf.InvalidOptionError, match="expert 1 is not open"):
        session.write(1, plans[0], tmp_path)
    with pytest.raises(FileNotFoundError):
        lsf._core.Session(trio["base"], trio["safety"], [trio["expert"], tmp_path / "missing"])


# --- the result classes ---------------------------------------------------------------------------


def test_plan_round_trips_exactly(trio: dict[str, Path]) -> None:
    plan = lsf.analyze(trio["base"], trio["safety"], trio["expert"], granularity="module", tau=0.05)
    text = plan.to_json()
    again = lsf.Plan.from_json(text)
    assert again == plan and again.to_json() == text and again.to_json(indent=None) == plan.to_json(indent=None)
    assert json.loads(text)["stats"] and [s.to_dict() for s in again.stats] == [s.to_dict() for s in plan.stats]
    assert lsf.Plan.from_dict(plan.to_dict(with_stats=True)) == plan
    # Without stats (as the report and `analyze --json` carry it), the decisions survive.
    assert lsf.Plan.from_dict(plan.to_dict()).units == plan.units
    assert pickle.loads(pickle.dumps(plan)) == plan
    for u in plan.units:
        assert lsf.UnitDecision.from_dict(u.to_dict()) == u and pickle.loads(pickle.dumps(u)) == u
        assert u.source == "measured" and (u.alpha == 0.5) == (u.decision == "blend")
    s = plan.stats[0]
    assert lsf.TensorStats.from_dict(s.to_dict()) == s and pickle.loads(pickle.dumps(s)) == s
    assert s.diff_ss == (s.safety_ss, s.expert_ss)
    # Frozen: nothing can be assigned.
    with pytest.raises(AttributeError):
        plan.layout = "x"  # type: ignore[misc]


def test_a_malformed_plan_is_an_invalid_option(trio: dict[str, Path]) -> None:
    d = lsf.analyze(trio["base"], trio["safety"], trio["expert"]).to_dict()
    bad: list[dict[str, Any]] = [
        {**d, "units": [{**d["units"][0], "decision": "maybe"}]},
        {**d, "units": [{**d["units"][0], "decision": "blend", "alpha": 1.5}]},
        {**d, "units": [{**d["units"][0], "decision": "safety", "alpha": 0.5}]},
        {**d, "options": {**d["options"], "tau": -1.0}},
        {k: v for k, v in d.items() if k != "units"},
    ]
    for data in bad:
        with pytest.raises(lsf.InvalidOptionError):
            lsf.Plan.from_dict(data)
    with pytest.raises(lsf.InvalidOptionError):
        lsf.Plan.from_json("{")


def test_each_unit_is_written_with_its_own_alpha(trio: dict[str, Path], tmp_path: Path) -> None:
    """A plan edited per unit (what a LoRA or an override decides) is written as it says: layer 0 a
    0.25 blend, layer 1 the safety expert's, against torch's f32 blend rounded once to bf16."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    session = lsf._core.Session(trio["base"], trio["safety"], [trio["expert"]])
    d = session.analyze(lsf.MergeOptions())[0].to_dict()
    d["units"][0] = {**d["units"][0], "decision": "blend", "alpha": 0.25}
    d["units"][1] = {**d["units"][1], "decision": "safety", "alpha": None}
    plan = lsf.Plan.from_dict(d)
    out = tmp_path / "out"
    out.mkdir()
    session.write(0, plan, out)
    got = load_file(str(out / "model.safetensors"))
    s = {k: v for f in trio["safety"].glob("*.safetensors") for k, v in load_file(str(f)).items()}
    m = {k: v for f in trio["expert"].glob("*.safetensors") for k, v in load_file(str(f)).items()}
    name0, name1 = "model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    want0 = (torch.tensor(0.25, dtype=torch.float32) * s[name0].float() + torch.tensor(0.75, dtype=torch.float32) * m[name0].float()).to(torch.bfloat16)
    assert torch.equal(got[name0].view(torch.int16), want0.view(torch.int16))
    assert torch.equal(got[name1].view(torch.int16), s[name1].view(torch.int16))


# --- exceptions -----------------------------------------------------------------------------------


def test_an_engine_error_crosses_a_process_pool(trio: dict[str, Path], tmp_path: Path) -> None:
    """Made by the engine in a child process, re-raised in the parent with its class (see also
    test_exceptions.py)."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with pytest.raises(lsf.IncompatibleModelsError, match="layers"):
            pool.submit(lsf.analyze, trio["base"], trio["safety"], _other_depth(tmp_path)).result()


def _other_depth(tmp_path: Path) -> Path:
    from layerswap_fast import synth

    cfg = synth.LlamaConfig(n_layers=2, hidden=32, intermediate=64, heads=2, kv_heads=1, vocab=64)
    return synth.make_trio(tmp_path / "two", cfg)["expert"]


def test_os_errors_are_named_by_the_one_table(trio: dict[str, Path], tmp_path: Path) -> None:
    """A file in the way of a folder (ENOTDIR) and a folder in the way of a file (EISDIR): the
    exception a merge raises and the kind a bulk run reports are the same class."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is expected")
    expert = blocker / "expert"
    with pytest.raises(NotADirectoryError):
        lsf.merge(trio["base"], trio["safety"], expert, tmp_path / "single")
    summary = bulk.bulk_merge(trio["base"], trio["safety"], [bulk.ExpertSpec("ok", trio["expert"]), bulk.ExpertSpec("bad", expert)],
                              tmp_path / "bulk")
    assert summary["experts"]["ok"]["status"] == "ok"
    assert summary["experts"]["bad"]["kind"] == "NotADirectoryError"
    with pytest.raises(IsADirectoryError):
        _core.checksums([tmp_path], 1)

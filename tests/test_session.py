"""The binding: one Session opens the models once for the analysis and every write (an input rewritten
in between is refused, naming the file); the shares of an analyze pass split across machines carry
the stamps of the files they read, and a later opening refuses files that changed; the frozen result
classes round-trip through dicts and pickle; each unit's own decision and alpha are what gets written;
an engine error crosses a process pool, and one table names OS errors raised and reported."""

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


def rewrite_in_place(folder: Path) -> None:
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
    rewrite_in_place(expert)
    (tmp_path / "out").mkdir()
    with pytest.raises(lsf.InvalidModelError, match=f"{expert / 'model.safetensors'}: file was changed or replaced"):
        session.write(0, plan, tmp_path / "out")


def test_an_unchanged_session_writes_and_counts_what_it_read(trio: dict[str, Path], tmp_path: Path) -> None:
    """The control of the test above: the same calls without the rewrite write the merge that
    lsf.merge writes, and the session counts the bytes its analysis and its write read."""
    session = lsf._core.Session(trio["base"], trio["safety"], [trio["expert"]])
    plan = session.analyze(lsf.MergeOptions())[0]
    read = session.bytes_read
    assert read > 0
    (tmp_path / "out").mkdir()
    write = session.write(0, plan, tmp_path / "out")
    assert session.bytes_read > read and write.tensors > 0 and write.files
    lsf.merge(trio["base"], trio["safety"], trio["expert"], tmp_path / "merged")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "merged" / "model.safetensors").read_bytes()


def test_a_bulk_run_opens_each_expert_once(trio: dict[str, Path], tmp_path: Path) -> None:
    """Expert b is rewritten while expert a is being written, after the analysis: had b's write opened
    it again, the new bytes would be merged silently with the old decisions; one opening catches it."""
    a = _copy_expert(trio, tmp_path / "a")
    b = _copy_expert(trio, tmp_path / "b")
    rewritten = []

    def progress(phase: str, done: int, total: int) -> None:
        if phase in ("write", "sync") and not rewritten:  # ticks are 0.1 s apart: a small write may show only "sync"
            rewrite_in_place(b)
            rewritten.append(phase)

    specs = [bulk.ExpertSpec("a", a), bulk.ExpertSpec("b", b)]
    summary = bulk.bulk_merge(trio["base"], trio["safety"], specs, tmp_path / "out", progress=progress)
    assert rewritten
    assert summary["experts"]["a"]["status"] == "ok"
    assert summary["experts"]["b"]["status"] == "failed"
    assert summary["experts"]["b"]["kind"] == "InvalidModelError"
    assert f"{b / 'model.safetensors'}: file was changed or replaced" in summary["experts"]["b"]["error"]
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


# --- an analyze pass in shares (the Ray executor's) ---------------------------------------------


def test_shares_make_the_plans_of_one_pass_and_pickle(trio: dict[str, Path]) -> None:
    opts = lsf.MergeOptions(granularity="module")
    session = lsf._core.Session(trio["base"], trio["safety"], [trio["expert"]])
    safety, expert = session.sums("safety", opts), session.sums("expert", opts)
    assert safety.measured == "safety" and expert.measured == "expert"
    assert set(expert.files) == {str(trio["base"] / "model.safetensors"), str(trio["expert"] / "model.safetensors")}
    again = [pickle.loads(pickle.dumps(s)) for s in (safety, expert)]
    assert again == [safety, expert]
    assert session.plans_from_sums([opts], *again[:1], again[1:]) == session.analyze(opts)
    with pytest.raises(lsf.InvalidOptionError):
        session.plans_from_sums([opts], expert, [expert])


def test_a_file_changed_after_its_share_was_computed_is_refused(trio: dict[str, Path], tmp_path: Path) -> None:
    """What a Ray write task checks: the files it opens are those its plan's sums were computed on."""
    expert = _copy_expert(trio, tmp_path / "expert")
    opts = lsf.MergeOptions()
    first = lsf._core.Session(trio["base"], trio["safety"], [expert])
    shares = [first.sums("safety", opts), first.sums("expert", opts)]
    lsf._core.Session(trio["base"], trio["safety"], [expert]).check_stamps(shares)  # unchanged: accepted
    rewrite_in_place(expert)
    later = lsf._core.Session(trio["base"], trio["safety"], [expert])
    later.check_stamps(shares[:1])  # S and B did not change
    with pytest.raises(lsf.InvalidModelError, match=f"{expert / 'model.safetensors'}: file was changed or replaced since its statistics"):
        later.check_stamps(shares)
    with pytest.raises(lsf.InvalidOptionError, match="not an input of this run"):
        lsf._core.Session(trio["base"], trio["safety"], [trio["expert"]]).check_stamps(shares)


# --- the result classes ---------------------------------------------------------------------------


def test_result_classes_are_frozen_and_typed(trio: dict[str, Path]) -> None:
    plan = lsf.analyze(trio["base"], trio["safety"], trio["expert"], granularity="module", tau=0.05)
    assert isinstance(plan, lsf.Plan) and lsf.Plan is _core.Plan and lsf.plan.Plan is _core.Plan  # type: ignore[attr-defined]
    assert all(isinstance(u, lsf.UnitDecision) for u in plan.units) and all(isinstance(s, lsf.TensorStats) for s in plan.stats)
    assert plan.granularity == "module" and plan.options["tau"] == 0.05 and [u.label for u in plan.units][:2] == ["layer 0 attention", "layer 0 mlp"]
    s = plan.stats[0]
    assert s.diff_ss == (s.safety_ss, s.expert_ss)
    with pytest.raises(AttributeError):
        plan.layout = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        plan.units[0].decision = "safety"  # type: ignore[misc]


def test_a_malformed_plan_is_an_invalid_option(trio: dict[str, Path]) -> None:
    d = lsf.analyze(trio["base"], trio["safety"], trio["expert"]).to_dict()
    bad: list[Any] = [
        {**d, "units": [{**d["units"][0], "decision": "maybe"}, *d["units"][1:]]},
        {**d, "units": [{**d["units"][0], "decision": "blend", "alpha": 1.5}, *d["units"][1:]]},
        {**d, "units": d["units"][1:]},
        {**d, "options": {**d["options"], "tau": -1.0}},
        {k: v for k, v in d.items() if k != "units"},
        [d],
    ]
    for data in bad:
        with pytest.raises(lsf.InvalidOptionError):
            lsf.Plan.from_dict(data)
    with pytest.raises(lsf.InvalidOptionError):
        lsf.Plan.from_json("{")


def test_each_unit_is_written_with_its_own_alpha(trio: dict[str, Path], tmp_path: Path) -> None:
    """A plan edited per unit (what an override or a decisions file decides) is written as it says:
    layer 0 a 0.25 blend, layer 1 the safety expert's, against torch's f32 blend rounded once to bf16."""
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


def test_a_controlled_merge_reads_the_models_once(trio: dict[str, Path], tmp_path: Path) -> None:
    """An override merge analyses and writes on one opening: its report counts the bytes both read,
    as a plain merge's does (it said 0 when the write opened the models a second time)."""
    plain = lsf.merge(trio["base"], trio["safety"], trio["expert"], tmp_path / "plain")
    controlled = lsf.merge(trio["base"], trio["safety"], trio["expert"], tmp_path / "controlled", overrides={"0": "safety"})
    assert controlled["bytes_read"] > 0 and controlled["bytes_read"] == plain["bytes_read"]
    assert controlled["units"][0]["source"] == "override" and "sources" in controlled


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


def test_inspect_and_layouts_are_plain_data(trio: dict[str, Path]) -> None:
    info = _core.inspect(trio["expert"])
    assert info["layout"] == "llama" and info["n_layers"] == 4 and isinstance(info["tensors"], list)
    layouts = _core.builtin_layouts()
    assert isinstance(layouts["llama"], dict)
    assert _core.inspect(trio["expert"], None, layouts["llama"])["layout"] == layouts["llama"]["name"]
    assert json.loads(json.dumps(info)) == info

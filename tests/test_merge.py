"""End to end: merge generated checkpoints and check every decision and every output byte against the
independent numpy computation of METHOD.md in ``models.py``."""

from __future__ import annotations

import json

import pytest

import layerswap_fast as lsf
from layerswap_fast import synth
from models import numpy_expected
from conftest import model_digest

# Tensors of 96 x 1001 elements straddle the 65 536-element chunks a 66 MiB budget forces.
ODD = synth.LlamaConfig(n_layers=3, hidden=96, intermediate=1001, heads=4, kv_heads=2, vocab=777)


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_merge_matches_numpy(make_trio, merge_checked, tmp_path, dtype, granularity):
    paths = make_trio(dtype=dtype)
    report = merge_checked(paths, tmp_path / "out", granularity=granularity, **numpy_expected(paths, granularity)).report
    c = report["counts"]
    assert c["safety"] > 0 and c["expert"] > 0


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_sharded_inputs_split_differently_and_chunk_boundaries(make_trio, merge_checked, tmp_path, granularity):
    paths = make_trio(config=ODD, dtype="bf16", shard_bytes={"base": 150_000, "safety": None, "expert": 400_000})
    report = merge_checked(paths, tmp_path / "out", granularity=granularity, alpha=0.3, max_memory="66MiB", shard_size=300_000,
                           **numpy_expected(paths, granularity, alpha=0.3)).report
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert report["output"]["tensors"] == len(index["weight_map"])


def test_threads_do_not_change_bytes(make_trio, tmp_path):
    paths = make_trio(config=ODD, dtype="bf16")
    outs = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}"
        lsf.merge(paths["base"], paths["safety"], paths["expert"], out, threads=threads, max_memory="66MiB", granularity="module")
        outs.append(model_digest(out))
        report = json.loads((out / "layerswap_report.json").read_text())
        outs[-1]["units"] = json.dumps(report["units"])
    assert outs[0] == outs[1]


def test_f64_and_single_file_inputs(make_trio, merge_checked, tmp_path):
    paths = make_trio(dtype="f64", single_file=True)
    files = {r: p / "model.safetensors" for r, p in paths.items()}
    merge_checked(files, tmp_path / "out", granularity="layer", **numpy_expected(files, "layer"))


def test_blend_everything_when_experts_equal_base(tmp_path):
    cfg = synth.LlamaConfig(n_layers=2)
    paths = synth.make_trio(tmp_path / "m", cfg, planting=synth.Planting(strong=0.0, weak=0.0, outside=0.0))
    plan = lsf.analyze(paths["base"], paths["safety"], paths["expert"])
    assert plan.decisions() == ["blend", "blend"]
    assert all(u.score_safety == 0 and u.p_safety == 0 for u in plan.units)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_extremes_blend_to_one_source(make_trio, merge_checked, tmp_path, alpha):
    paths = make_trio()
    merge_checked(paths, tmp_path / "out", granularity="layer", alpha=alpha, tau=1.0, **numpy_expected(paths, "layer", alpha=alpha, tau=1.0))


def test_out_dtype_conversion(make_trio, merge_checked, tmp_path):
    paths = make_trio(dtype="f32")
    merge_checked(paths, tmp_path / "out", out_dtype="bf16", **numpy_expected(paths, "layer"))


def test_output_folder_contents(trio, tmp_path):
    out = tmp_path / "merged"
    report = lsf.merge(trio["base"], trio["safety"], trio["expert"], out)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "layerswap_report.json"} <= names
    # The tokenizer comes from the language expert by default (METHOD.md), config always from it.
    assert json.loads((out / "tokenizer_config.json").read_text())["layerswap_demo_role"] == "expert"
    assert json.loads((out / "generation_config.json").read_text())["role"] == "expert"
    saved = json.loads((out / "layerswap_report.json").read_text())
    assert saved["version"] == lsf.__version__
    assert saved["parameters"]["tau"] == 0.001 and saved["parameters"]["alpha"] == 0.5
    for u in saved["units"]:
        assert set(u) >= {"layer", "score_safety", "score_expert", "p_safety", "p_expert", "d", "decision"}
    assert report["counts"] == saved["counts"]
    # No staging leftovers beside the output.
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_official_numerics_takes_tokenizer_from_base(trio, tmp_path):
    out = tmp_path / "merged"
    lsf.merge(trio["base"], trio["safety"], trio["expert"], out, numerics="official")
    assert json.loads((out / "tokenizer_config.json").read_text())["layerswap_demo_role"] == "base"


def test_existing_output_refused_then_forced(trio, tmp_path):
    """A previous output (it has layerswap_report.json) is replaced whole with force, never without."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "layerswap_report.json").write_text("{}")
    (out / "keep").write_text("x")
    with pytest.raises(lsf.OutputExistsError, match="already exists"):
        lsf.merge(trio["base"], trio["safety"], trio["expert"], out)
    assert (out / "keep").exists()
    lsf.merge(trio["base"], trio["safety"], trio["expert"], out, force=True)
    assert not (out / "keep").exists() and (out / "model.safetensors").exists()


def test_analyze_plan_object(trio):
    plan = lsf.analyze(trio["base"], trio["safety"], trio["expert"], granularity="module")
    assert plan.granularity == "module" and len(plan.units) == 2 * plan.n_layers
    d = json.loads(plan.to_json())
    assert d["units"][0]["part"] == "attention" and d["units"][1]["part"] == "mlp"
    assert abs(sum(u.p_safety for u in plan.units) - 1) < 1e-6
    assert len(plan.stats) == 7 * plan.n_layers

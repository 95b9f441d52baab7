"""Bulk merging: one analyze pass for many experts, byte-identical to single runs, resumable,
failure-isolated, with saved statistics (the Ray executor: test_ray.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import layerswap_fast as lsf
from layerswap_fast import bulk, synth
from layerswap_fast.cli import main
from conftest import tree_digest


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict[str, Path]:
    """A base/safety pair and three language experts sharing that base (different planted layers)."""
    root = tmp_path_factory.mktemp("bulk")
    cfg = synth.LlamaConfig(n_layers=4)
    a = synth.make_trio(root / "a", cfg, shard_bytes={"expert": 60_000})
    b = synth.make_trio(root / "b", cfg, planting=synth.Planting(safety_layers=[2, 3], expert_layers=[3]))
    c = synth.make_trio(root / "c", cfg, planting=synth.Planting(safety_layers=[2, 3], expert_layers=[1, 2]))
    return {"base": a["base"], "safety": a["safety"], "ko": a["expert"], "sw": b["expert"], "te": c["expert"]}


def outputs_equal(a: Path, b: Path) -> None:
    da, db = tree_digest(a), tree_digest(b)
    ra, rb = json.loads((a / "layerswap_report.json").read_text()), json.loads((b / "layerswap_report.json").read_text())
    da.pop("layerswap_report.json"), db.pop("layerswap_report.json")
    assert da == db
    assert ra["units"] == rb["units"]


def test_bulk_is_byte_identical_to_single_runs(experts, tmp_path):
    specs = [bulk.ExpertSpec("ko", experts["ko"]), bulk.ExpertSpec("sw", experts["sw"], lsf.MergeOptions(granularity="module", alpha=0.3)),
             bulk.ExpertSpec("te", experts["te"], lsf.MergeOptions(tau=0.05))]
    summary = bulk.bulk_merge(experts["base"], experts["safety"], specs, tmp_path / "bulk")
    assert {n: e["status"] for n, e in summary["experts"].items()} == {"ko": "ok", "sw": "ok", "te": "ok"}
    for s in specs:
        lsf.merge(experts["base"], experts["safety"], s.path, tmp_path / "single" / s.name, options=s.options)
        outputs_equal(tmp_path / "bulk" / s.name, tmp_path / "single" / s.name)
    saved = json.loads((tmp_path / "bulk" / bulk.SUMMARY).read_text())
    assert saved["decisions"]["layer 0"]["ko"] == "expert"
    assert "layer 0 attention" in saved["decisions"]


def test_rerun_skips_verified_and_redoes_damaged(experts, tmp_path):
    specs = [bulk.ExpertSpec("ko", experts["ko"]), bulk.ExpertSpec("sw", experts["sw"])]
    out = tmp_path / "out"
    bulk.bulk_merge(experts["base"], experts["safety"], specs, out)
    good = tree_digest(out / "ko")
    # Damage one byte of one shard of "sw": the manifest check must notice and redo only "sw".
    shard = sorted((out / "sw").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    summary = bulk.bulk_merge(experts["base"], experts["safety"], specs, out)
    assert summary["experts"]["ko"]["status"] == "skipped"
    assert summary["experts"]["sw"]["status"] == "ok"
    assert tree_digest(out / "ko") == good
    lsf.merge(experts["base"], experts["safety"], experts["sw"], tmp_path / "single")
    outputs_equal(out / "sw", tmp_path / "single")
    # Changed options redo the expert too.
    summary = bulk.bulk_merge(experts["base"], experts["safety"], [bulk.ExpertSpec("ko", experts["ko"], lsf.MergeOptions(alpha=0.2))], out)
    assert summary["experts"]["ko"]["status"] == "ok"


def test_one_bad_expert_does_not_stop_the_others(experts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(experts["sw"], bad)
    shard = bad / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    before = tree_digest(bad)
    specs = [bulk.ExpertSpec("ko", experts["ko"]), bulk.ExpertSpec("bad", bad), bulk.ExpertSpec("sw", experts["sw"])]
    summary = bulk.bulk_merge(experts["base"], experts["safety"], specs, tmp_path / "out")
    assert summary["experts"]["bad"]["status"] == "failed"
    assert "model.safetensors" in summary["experts"]["bad"]["error"]
    assert summary["experts"]["ko"]["status"] == "ok" and summary["experts"]["sw"]["status"] == "ok"
    assert not (tmp_path / "out" / "bad").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ko", bulk.MANIFEST, bulk.SUMMARY, "sw"]
    assert tree_digest(bad) == before


def test_cli_bulk_and_plan_file(experts, tmp_path):
    runner = CliRunner()
    args = ["merge", "-b", str(experts["base"]), "-s", str(experts["safety"]), "-m", f"ko={experts['ko']}", "-m", f"sw={experts['sw']}",
            "-o", str(tmp_path / "cli"), "-g", "module"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "layer 0 attention" in r.output and "ko: ok" in r.output
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'base = "{experts["base"]}"\nsafety = "{experts["safety"]}"\nout = "{tmp_path / "planned"}"\n'
        f'[defaults]\ngranularity = "module"\n[experts.ko]\npath = "{experts["ko"]}"\n[experts.sw]\npath = "{experts["sw"]}"\nalpha = 0.25\n'
    )
    r = runner.invoke(main, ["merge", "--plan", str(plan)])
    assert r.exit_code == 0, r.output
    outputs_equal(tmp_path / "cli" / "ko", tmp_path / "planned" / "ko")
    report = json.loads((tmp_path / "planned" / "sw" / "layerswap_report.json").read_text())
    assert report["parameters"]["alpha"] == 0.25 and report["granularity"] == "module"


def test_cli_bulk_failure_exits_nonzero(experts, tmp_path):
    r = CliRunner().invoke(main, ["merge", "-b", str(experts["base"]), "-s", str(experts["safety"]), "-m", f"ko={experts['ko']}",
                                  "-m", f"gone={tmp_path / 'missing'}", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "gone: failed" in r.output and "ko: ok" in r.output


def test_bad_plan_file_is_one_line_error(tmp_path):
    plan = tmp_path / "p.toml"
    plan.write_text('base = "b"\n')
    r = CliRunner().invoke(main, ["merge", "--plan", str(plan)])
    assert r.exit_code == 2 and "missing 'safety'" in r.output and "Traceback" not in r.output


def test_saved_statistics_skip_the_safety_expert(experts, tmp_path):
    stats = tmp_path / "stats.json"
    r = CliRunner().invoke(main, ["analyze", "-b", str(experts["base"]), "-s", str(experts["safety"]), "-m", str(experts["ko"]), "--save-stats", str(stats)])
    assert r.exit_code == 0, r.output
    specs = [bulk.ExpertSpec("sw", experts["sw"]), bulk.ExpertSpec("te", experts["te"])]
    bulk.bulk_merge(experts["base"], experts["safety"], specs, tmp_path / "with", saved_stats=stats)
    bulk.bulk_merge(experts["base"], experts["safety"], specs, tmp_path / "without")
    for s in specs:
        outputs_equal(tmp_path / "with" / s.name, tmp_path / "without" / s.name)
    # Statistics of another base model are refused, naming the problem.
    other = synth.make_trio(tmp_path / "other", synth.LlamaConfig(n_layers=4), planting=synth.Planting(seed=7))
    summary_err = None
    try:
        bulk.bulk_merge(other["base"], experts["safety"], [bulk.ExpertSpec("x", other["expert"])], tmp_path / "x", saved_stats=stats)
    except lsf.InvalidOptionError as e:
        summary_err = str(e)
    assert summary_err and "do not belong to the base model" in summary_err


def test_yaml_plan_file_with_relative_paths(experts, tmp_path):
    pytest.importorskip("yaml", reason="PyYAML not installed")
    link = tmp_path / "models"
    link.mkdir()
    for role in ("base", "safety", "ko"):
        shutil.copytree(experts[role], link / role)
    plan = link / "plan.yaml"
    plan.write_text("base: base\nsafety: safety\nout: ../yaml-out\nexperts:\n  ko:\n    path: ko\n    granularity: module\n")
    loaded = bulk.load_bulk_file(plan)
    assert loaded.base == link / "base" and loaded.experts[0].options.granularity == "module"
    summary = bulk.bulk_merge(loaded.base, loaded.safety, loaded.experts, loaded.out)
    assert summary["experts"]["ko"]["status"] == "ok"
    # Laid out like the expert's own shards (see test_clone.py).
    assert sorted(p.name for p in (tmp_path / "yaml-out" / "ko").glob("*.safetensors*")) == sorted(p.name for p in experts["ko"].glob("*.safetensors*"))

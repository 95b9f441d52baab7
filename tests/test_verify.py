"""``layerswap-fast verify`` and ``layerswap_fast.verify``: passes on the merges the engine writes, and
fails, naming the tensor or unit, on every kind of damage it promises to catch."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch", reason="verify needs torch: pip install 'layerswap-fast[check]'")
pytest.importorskip("safetensors", reason="verify needs safetensors: pip install 'layerswap-fast[check]'")

import layerswap_fast as lsf  # noqa: E402
from layerswap_fast import synth  # noqa: E402
from layerswap_fast.cli import main  # noqa: E402
from models import locate  # noqa: E402

ODD = synth.LlamaConfig(n_layers=3, hidden=72, intermediate=1001, heads=4, kv_heads=2, vocab=301)


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A sharded trio and a sharded module-granularity merge of it (alpha 0.3, so blends round)."""
    root = tmp_path_factory.mktemp("verify")
    paths = synth.make_trio(root, ODD, shard_bytes={"base": 150_000, "safety": None, "expert": 400_000})
    lsf.merge(paths["base"], paths["safety"], paths["expert"], root / "out", granularity="module", alpha=0.3,
              max_memory="66MiB", shard_size=300_000)
    return {**paths, "out": root / "out"}


def copy_out(merged: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(merged["out"], out)
    return out


def run_verify(merged: dict[str, Path], out: Path, **kw: object) -> "lsf.VerifyResult":
    opts = {"granularity": "module", "alpha": 0.3, **kw}
    return lsf.verify(out, merged["base"], merged["safety"], merged["expert"], **opts)


def bump(out: Path, name: str, element: int = 5, ulps: int = 1) -> None:
    """Moves one element of one output tensor by ``ulps`` units in the last place (bf16)."""
    f, off, _, dtype = locate(out, name)
    assert dtype == "BF16"
    with open(f, "r+b") as fh:
        fh.seek(off + 2 * element)
        (v,) = struct.unpack("<H", fh.read(2))
        fh.seek(off + 2 * element)
        fh.write(struct.pack("<H", v + ulps))


def test_passes_on_the_engines_merge(merged):
    result = run_verify(merged, merged["out"])
    assert result.ok, result.summary()
    sources = {t.source for t in result.tensors}
    assert sources == {"safety", "expert", "blend"}
    assert len(result.units) == 6 and all(u.ok for u in result.units)
    assert "verified: output matches the reference" in result.summary()
    d = result.to_dict()
    assert d["ok"] and len(d["tensors"]) == len(result.tensors)


@pytest.mark.parametrize("granularity", ["layer", "module"])
@pytest.mark.parametrize("numerics", ["exact", "official"])
def test_passes_in_every_mode(make_trio, tmp_path, granularity, numerics):
    paths = make_trio(config=ODD, dtype="f32")
    lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "out", granularity=granularity, numerics=numerics)
    result = lsf.verify(tmp_path / "out", paths["base"], paths["safety"], paths["expert"], granularity=granularity, numerics=numerics)
    assert result.ok, result.summary()


def test_one_element_off_in_a_copied_tensor_is_named(merged, tmp_path):
    out = copy_out(merged, tmp_path)
    result = run_verify(merged, out)
    name = next(t.name for t in result.tensors if t.source in ("safety", "expert") and "proj" in t.name)
    bump(out, name, ulps=1)
    result = run_verify(merged, out)
    assert not result.ok
    bad = [t for t in result.tensors if not t.ok]
    assert [t.name for t in bad] == [name] and bad[0].status == "bytes" and bad[0].differing == 1
    assert any(name in line and "flat index 5" in line for line in result.mismatches())


def test_one_element_off_in_a_blended_tensor_is_named(merged, tmp_path):
    out = copy_out(merged, tmp_path)
    name = next(t.name for t in run_verify(merged, out).tensors if t.source == "blend")
    bump(out, name, ulps=1)
    # One flipped low bit is a failure by default: exact numerics reproduce every byte...
    one = run_verify(merged, out)
    assert not one.ok and [t.name for t in one.tensors if not t.ok] == [name]
    assert next(t for t in one.tensors if t.name == name).status == "ulp" and "every byte" in one.summary()
    # ... a tolerance is opt-in (for outputs of other tools) ...
    tolerant = run_verify(merged, out, max_ulp=1)
    assert tolerant.ok and next(t for t in tolerant.tensors if t.name == name).status == "within-tolerance"
    bump(out, name, ulps=1)
    # ... and bounded.
    two = run_verify(merged, out, max_ulp=1)
    assert not two.ok and [t.name for t in two.tensors if not t.ok] == [name]
    assert next(t for t in two.tensors if t.name == name).max_ulp == 2


def test_cli_exit_status_and_names_the_tensor(merged, tmp_path):
    args = ["-b", str(merged["base"]), "-s", str(merged["safety"]), "-m", str(merged["expert"]), "-g", "module", "--alpha", "0.3"]
    ok = CliRunner().invoke(main, ["verify", str(merged["out"]), *args])
    assert ok.exit_code == 0, ok.output
    assert "verified" in ok.output and "tensors from blend" in ok.output
    out = copy_out(merged, tmp_path)
    bump(out, "model.norm.weight", ulps=3)
    bad = CliRunner().invoke(main, ["verify", str(out), *args])
    assert bad.exit_code == 1
    assert "MISMATCH" in bad.output and "model.norm.weight" in bad.output
    as_json = CliRunner().invoke(main, ["verify", str(out), *args, "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.output)["ok"] is False


def test_wrong_method_options_are_reported(merged):
    result = run_verify(merged, merged["out"], granularity="layer")
    assert not result.ok
    assert any("granularity='module'" in p for p in result.problems)


def test_altered_report_decision_is_named(merged, tmp_path):
    out = copy_out(merged, tmp_path)
    report = json.loads((out / "layerswap_report.json").read_text())
    u = report["units"][3]
    u["decision"] = "blend" if u["decision"] != "blend" else "safety"
    (out / "layerswap_report.json").write_text(json.dumps(report))
    result = run_verify(merged, out)
    bad = [x for x in result.units if not x.ok]
    assert [(x.layer, x.part) for x in bad] == [(u["layer"], u["part"])]
    assert "decision" in bad[0].detail


def test_missing_and_extra_tensors_and_broken_index(merged, tmp_path):
    out = copy_out(merged, tmp_path)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = "model.layers.1.mlp.up_proj.weight"
    index["weight_map"].pop(victim)
    index["weight_map"]["model.layers.9.ghost.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    result = run_verify(merged, out)
    assert not result.ok
    text = "\n".join(result.mismatches())
    assert f"'{victim}'" in text and "missing from the index" in text
    assert "model.layers.9.ghost.weight" in text


def test_deleted_shard_and_corrupt_header(merged, tmp_path):
    out = copy_out(merged, tmp_path)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[0].unlink()
    data = bytearray(shards[1].read_bytes())
    data[8] = ord("!")  # the header's first byte: no longer JSON
    shards[1].write_bytes(bytes(data))
    result = run_verify(merged, out)
    assert not result.ok
    text = "\n".join(result.mismatches())
    assert shards[0].name in text and "does not exist" in text
    assert shards[1].name in text and "not JSON" in text
    assert any(t.status == "missing" for t in result.tensors)


def test_truncated_shard(merged, tmp_path):
    out = copy_out(merged, tmp_path)
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-2])
    result = run_verify(merged, out)
    assert any(shard.name in p and "bytes" in p for p in result.problems), result.problems


def test_side_files_checked(merged, tmp_path):
    out = copy_out(merged, tmp_path)
    (out / "tokenizer_config.json").write_text("{}")
    result = run_verify(merged, out)
    assert any("tokenizer_config.json" in p for p in result.problems)


def test_official_tokenizer_from_base_is_expected(make_trio, tmp_path):
    paths = make_trio()
    lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "out", numerics="official")
    assert lsf.verify(tmp_path / "out", paths["base"], paths["safety"], paths["expert"], numerics="official").ok
    shutil.copyfile(paths["expert"] / "tokenizer_config.json", tmp_path / "out" / "tokenizer_config.json")
    result = lsf.verify(tmp_path / "out", paths["base"], paths["safety"], paths["expert"], numerics="official")
    assert any("tokenizer_config.json" in p for p in result.problems)


def test_compare_numerics_lists_a_flipping_unit(make_trio):
    """Put tau between a unit's exact and official d: exactly that unit must flip."""
    paths = make_trio(config=ODD)
    exact = lsf.analyze(paths["base"], paths["safety"], paths["expert"], granularity="module")
    official = lsf.analyze(paths["base"], paths["safety"], paths["expert"], granularity="module", numerics="official")
    gaps = [(abs(abs(a.d) - abs(b.d)), i) for i, (a, b) in enumerate(zip(exact.units, official.units))]
    gap, i = max(gaps)
    assert gap > 0, "official and exact d should differ somewhere"
    tau = (abs(exact.units[i].d) + abs(official.units[i].d)) / 2
    from layerswap_fast.verify import compare_numerics

    res = compare_numerics(paths["base"], paths["safety"], paths["expert"], granularity="module", tau=tau)
    assert [f["unit"] for f in res["flips"]] == [exact.units[i].label]
    cli = CliRunner().invoke(main, ["analyze", "--compare-numerics", "-b", str(paths["base"]), "-s", str(paths["safety"]),
                                    "-m", str(paths["expert"]), "-g", "module", "--tau", repr(tau)])
    assert cli.exit_code == 0, cli.output
    assert f"flips: {exact.units[i].label}" in cli.output


def test_without_torch_the_error_says_how_to_install(merged):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import layerswap_fast as lsf\n"
        f"lsf.verify({str(merged['out'])!r}, {str(merged['base'])!r}, {str(merged['safety'])!r}, {str(merged['expert'])!r})\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode != 0
    assert "ImportError" in p.stderr and "pip install 'layerswap-fast[check]'" in p.stderr

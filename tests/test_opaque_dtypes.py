"""Non-float tensors (BOOL attention masks, I64 position ids, ...) as real Pythia and older BERT
checkpoints carry them: opened, never measured, copied byte for byte from the language expert."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import layerswap_fast as lsf
from families import BY_ID, make_trio_from_specs
from layerswap_fast.cli import main
from models import read_file, read_model


def add_tensors(path: Path, extra: dict[str, tuple[str, list[int], bytes]]) -> None:
    """Rewrites a single-file checkpoint with extra raw tensors appended."""
    tensors = {**read_file(path), **extra}
    header: dict = {}
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.fixture(scope="module")
def pythia(tmp_path_factory) -> dict[str, Path]:
    fam = BY_ID["pythia"]
    paths = make_trio_from_specs(tmp_path_factory.mktemp("pythia"), fam.specs(), fam.config, dtype=fam.dtype)
    n = fam.config["num_hidden_layers"]
    for role, p in paths.items():
        mask = np.tril(np.ones((1, 1, 8, 8), dtype=bool))
        if role == "expert":
            mask[0, 0, 0, 1] = True  # the host's bytes must be the ones copied
        extra = {}
        for i in range(n):
            extra[f"gpt_neox.layers.{i}.attention.bias"] = ("BOOL", [1, 1, 8, 8], mask.tobytes())
            extra[f"gpt_neox.layers.{i}.attention.masked_bias"] = ("F32", [], np.float32(-1e9).tobytes())
        extra["gpt_neox.position_ids"] = ("I64", [1, 8], np.arange(8, dtype="<i8").tobytes())
        add_tensors(p / "model.safetensors", extra)
    return paths


@pytest.mark.parametrize("granularity", ["layer", "module"])
@pytest.mark.parametrize("out_dtype", [None, "f32"])
def test_non_float_tensors_are_copied_from_the_expert(pythia, tmp_path, granularity, out_dtype):
    report = lsf.merge(pythia["base"], pythia["safety"], pythia["expert"], tmp_path / "o", granularity=granularity, out_dtype=out_dtype)
    assert report["counts"]["safety"] > 0
    out, host = read_model(tmp_path / "o"), read_model(pythia["expert"])
    for name in ("gpt_neox.layers.0.attention.bias", "gpt_neox.layers.5.attention.bias", "gpt_neox.position_ids"):
        assert out[name] == host[name], name
    # Non-float tensors keep their dtype whatever out_dtype says; float ones are converted.
    assert out["gpt_neox.position_ids"][0] == "I64"
    assert out["gpt_neox.layers.0.attention.masked_bias"][0] == "F32"
    assert out["gpt_neox.embed_in.weight"][0] == ("F32" if out_dtype else host["gpt_neox.embed_in.weight"][0])


def test_verify_catches_a_changed_mask(pythia, tmp_path):
    pytest.importorskip("torch", reason="verify needs torch (pip install 'layerswap-fast[check]')")
    out = tmp_path / "o"
    lsf.merge(pythia["base"], pythia["safety"], pythia["expert"], out)
    shard = out / "model.safetensors"
    tensors = read_file(shard)
    dtype, shape, raw = tensors["gpt_neox.layers.2.attention.bias"]
    flipped = bytearray(raw)
    flipped[-1] ^= 1
    data = shard.read_bytes()
    at = data.index(raw)  # the first layer's mask in file order (all layers' masks are equal)
    shard.write_bytes(data[:at] + bytes(flipped) + data[at + len(raw):])
    result = lsf.verify(out, pythia["base"], pythia["safety"], pythia["expert"])
    assert not result.ok
    bad = [t.name for t in result.tensors if not t.ok]
    assert len(bad) == 1 and bad[0].endswith(".attention.bias"), bad


def test_inspect_lists_non_float_tensors(pythia):
    info = lsf.inspect(pythia["expert"])
    dtypes = {t["name"]: t["dtype"] for t in info["tensors"]}
    assert dtypes["gpt_neox.layers.0.attention.bias"] == "BOOL" and dtypes["gpt_neox.position_ids"] == "I64"
    r = CliRunner().invoke(main, ["inspect", str(pythia["expert"])])
    assert r.exit_code == 0, r.output


def test_out_dtype_must_be_a_float(pythia, tmp_path):
    with pytest.raises(lsf.InvalidOptionError):
        lsf.merge(pythia["base"], pythia["safety"], pythia["expert"], tmp_path / "o", out_dtype="i64")

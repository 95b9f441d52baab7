"""The in-memory API: state dicts of torch tensors or numpy arrays, merged by the same engine, give the
file merge's plan and bytes; bad tensors give the errors files give."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import layerswap_fast as lsf  # noqa: E402
from layerswap_fast import synth  # noqa: E402
from layerswap_fast.errors import IncompatibleModelsError, InvalidModelError, InvalidOptionError, NonFiniteTensorError  # noqa: E402

from models import read_model  # noqa: E402

ROLES = ("base", "safety", "expert")


def load(folder: Path, lib: object = None) -> dict:
    """A model folder's tensors as a state dict (safetensors' own loaders), in file order."""
    lib = lib or safetensors_torch
    out: dict = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(lib.load_file(str(f)))  # type: ignore[attr-defined]
    return out


def raw(t: object) -> bytes:
    if isinstance(t, np.ndarray):
        return t.tobytes()
    return t.contiguous().view(torch.uint8).numpy().tobytes()  # type: ignore[attr-defined]


def digest(sd: dict) -> str:
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode() + raw(v))
    return h.hexdigest()


def assert_same_as_files(merged: dict, folder: Path, expert: dict) -> None:
    want = read_model(folder)
    assert list(merged) == list(expert)  # the expert's keys, in its order
    assert set(merged) == set(want)
    for name, t in merged.items():
        dtype, shape, data = want[name]
        assert list(t.shape) == shape, name
        assert raw(t) == data, f"{name} differs from the file merge"


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_torch_state_dicts_equal_the_file_merge(make_trio, tmp_path, dtype, granularity):
    paths = make_trio(dtype=dtype, shard_bytes={"base": None, "safety": 60_000, "expert": None})
    sds = {r: load(paths[r]) for r in ROLES}
    before = {r: digest(sd) for r, sd in sds.items()}
    lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "out", granularity=granularity, alpha=0.3, threads=2)
    merged, plan = lsf.merge_state_dicts(sds["base"], sds["safety"], sds["expert"], granularity=granularity, alpha=0.3, threads=2,
                                         return_plan=True)
    assert all(isinstance(t, torch.Tensor) for t in merged.values())
    assert_same_as_files(merged, tmp_path / "out", sds["expert"])
    file_plan = lsf.analyze(paths["base"], paths["safety"], paths["expert"], granularity=granularity, alpha=0.3)
    assert plan.to_dict()["units"] == file_plan.to_dict()["units"]
    assert lsf.analyze_state_dicts(sds["base"], sds["safety"], sds["expert"], granularity=granularity, alpha=0.3).to_dict()["units"] == \
        file_plan.to_dict()["units"]
    assert {r: digest(sd) for r, sd in sds.items()} == before  # inputs untouched
    c = plan.counts()
    assert c["safety"] > 0 and c["expert"] > 0


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_numpy_state_dicts_give_numpy_and_the_same_bytes(make_trio, tmp_path, dtype):
    paths = make_trio(dtype=dtype)
    sds = {r: load(paths[r], safetensors_numpy) for r in ROLES}  # read-only arrays: exported through DLPack 1.0
    lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "out", granularity="module")
    merged = lsf.merge_state_dicts(sds["base"], sds["safety"], sds["expert"], granularity="module")
    assert all(isinstance(t, np.ndarray) for t in merged.values())
    assert_same_as_files(merged, tmp_path / "out", sds["expert"])


def test_out_dtype_and_mixed_kinds(make_trio, tmp_path):
    paths = make_trio(dtype="f32")
    sds = {r: load(paths[r]) for r in ROLES}
    lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "out", out_dtype="bf16")
    merged = lsf.merge_state_dicts(load(paths["base"], safetensors_numpy), sds["safety"], sds["expert"], out_dtype="bf16")
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert_same_as_files(merged, tmp_path / "out", sds["expert"])
    with pytest.raises(InvalidOptionError, match="bfloat16"):
        lsf.merge_state_dicts(*(load(paths[r], safetensors_numpy) for r in ROLES), out_dtype="bf16")


def test_tensors_that_require_grad_are_read_in_place(make_trio):
    paths = make_trio()
    sds = {r: {k: v.requires_grad_(v.is_floating_point()) for k, v in load(paths[r]).items()} for r in ROLES}
    merged = lsf.merge_state_dicts(sds["base"], sds["safety"], sds["expert"])
    assert not any(t.requires_grad for t in merged.values())


@pytest.fixture
def sds(make_trio):
    paths = make_trio()
    return {r: load(paths[r]) for r in ROLES}


LAYER = "model.layers.1.mlp.up_proj.weight"


def test_missing_tensor_names_it_and_the_state_dict(sds):
    del sds["safety"][LAYER]
    with pytest.raises(IncompatibleModelsError, match=rf"'{LAYER}'.*safety state dict"):
        lsf.merge_state_dicts(sds["base"], sds["safety"], sds["expert"])


def test_shape_and_dtype_mismatch(sds):
    base = dict(sds["base"], **{LAYER: sds["base"][LAYER][:-1].clone()})
    with pytest.raises(IncompatibleModelsError, match=rf"'{LAYER}'.*base state dict"):
        lsf.merge_state_dicts(base, sds["safety"], sds["expert"])
    expert = dict(sds["expert"], **{LAYER: sds["expert"][LAYER].float()})
    with pytest.raises(IncompatibleModelsError, match=rf"'{LAYER}'.*F32.*BF16|'{LAYER}'.*BF16.*F32"):
        lsf.merge_state_dicts(sds["base"], sds["safety"], expert)


def test_non_contiguous_gpu_and_foreign_tensors_are_refused_by_name(sds):
    t = sds["expert"][LAYER]
    for bad, pattern in [
        (t.t().contiguous().t(), "not contiguous"),
        (torch.empty(t.shape, dtype=t.dtype, device="meta"), "is on meta"),
        (t.to(torch.complex64), "dtype torch.complex64"),
        ([1.0, 2.0], "is a list"),
    ]:
        expert = dict(sds["expert"], **{LAYER: bad})
        with pytest.raises(InvalidModelError, match=rf"^expert state dict: tensor '{LAYER}'.*{pattern}"):
            lsf.merge_state_dicts(sds["base"], sds["safety"], expert)
    with pytest.raises(InvalidOptionError, match="expected a dict"):
        lsf.merge_state_dicts(sds["base"], sds["safety"], list(sds["expert"].values()))


def test_nan_is_refused_naming_the_tensor(sds):
    expert = dict(sds["expert"])
    expert[LAYER] = expert[LAYER].clone()
    expert[LAYER][0, 0] = float("nan")
    with pytest.raises(NonFiniteTensorError, match=rf"^expert state dict: tensor '{LAYER}'"):
        lsf.merge_state_dicts(sds["base"], sds["safety"], expert)
    expert["model.norm.weight"] = expert["model.norm.weight"].clone()
    expert["model.norm.weight"][0] = float("inf")
    del expert[LAYER]
    expert[LAYER] = sds["expert"][LAYER]
    with pytest.raises(NonFiniteTensorError, match=r"model\.norm\.weight"):
        lsf.merge_state_dicts(sds["base"], sds["safety"], expert)


def test_gil_is_released_while_merging_state_dicts(make_trio):
    paths = make_trio(config=synth.LlamaConfig(n_layers=6, hidden=512, intermediate=1536, vocab=4096), dtype="f32")
    sds = {r: load(paths[r]) for r in ROLES}
    done = threading.Event()
    window: dict[str, float] = {}

    def work() -> None:
        window["start"] = time.perf_counter()
        for _ in range(3):
            lsf.merge_state_dicts(sds["base"], sds["safety"], sds["expert"], threads=1)
        window["end"] = time.perf_counter()
        done.set()

    t = threading.Thread(target=work)
    ticks = []
    t.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    t.join()
    inside = [x for x in ticks if window["start"] < x < window["end"]]
    assert window["end"] - window["start"] > 0.05
    assert len(inside) > 10_000, (len(inside), window)

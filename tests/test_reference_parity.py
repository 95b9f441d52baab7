"""Conformance: the engine against the independent torch reference (``layerswap_fast.reference``) over
generated cases, in both granularities and both numerics.

What must hold, per METHOD.md and the contract of each numerics mode:
- decisions identical, always;
- ``exact``: the report's scores, p and d equal the reference's up to float64 summation order; whole
  copies byte-identical; blends byte-identical too (the engine and torch both round float32 once, so in
  practice they are identical);
- ``official`` on bf16 checkpoints: every norm, score, p, d and every output byte equal to what the
  authors' torch code computes, bit for bit.
"""

from __future__ import annotations

from typing import Callable

import math
import tempfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the torch reference needs torch: pip install 'layerswap-fast[check]'")
pytest.importorskip("safetensors", reason="the torch reference needs safetensors: pip install 'layerswap-fast[check]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import layerswap_fast as lsf  # noqa: E402
from layerswap_fast import reference, synth  # noqa: E402
from models import locate  # noqa: E402

# 72 x 1001 = 72 072 elements: straddles the 65 536-element chunks a 66 MiB budget forces, and leaves
# 8 elements for the scalar tail of torch's 16-element bf16 steps.
STRADDLE = synth.LlamaConfig(n_layers=3, hidden=72, intermediate=1001, heads=4, kv_heads=2, vocab=301)


def overwrite_tensor(model: Path, name: str, raw_for: Callable[[int], bytes]) -> None:
    """Overwrites one tensor of a model folder in place with ``raw_for(nbytes)``."""
    f, offset, nbytes, _ = locate(model, name)
    raw = raw_for(nbytes)
    assert len(raw) == nbytes
    with open(f, "r+b") as fh:
        fh.seek(offset)
        fh.write(raw)


def zero_tensor(model: Path, name: str) -> None:
    """Overwrites one tensor of a model folder with zeros, in place (a zero-norm base tensor)."""
    overwrite_tensor(model, name, lambda nbytes: b"\0" * nbytes)


def assert_bit_exact(result: "lsf.VerifyResult", report: dict, plan: reference.RefPlan) -> None:
    """official numerics: every tensor identical and every reported number equal to the reference's."""
    assert all(t.status == "identical" for t in result.tensors), [t for t in result.tensors if t.status != "identical"]
    for u, r in zip(report["units"], plan.units):
        for key in ("score_safety", "score_expert", "p_safety", "p_expert", "d"):
            # Scores are sums of the same float64 terms in the same order on both sides.
            assert u[key] == pytest.approx(getattr(r, key), rel=1e-15, abs=0), (u, r)


configs = st.builds(
    synth.LlamaConfig,
    n_layers=st.integers(1, 4),
    hidden=st.sampled_from([8, 16, 24, 36, 72]),  # 36 x 1001 leaves 4 elements for the tail
    intermediate=st.sampled_from([4, 40, 1001]),
    heads=st.just(4),
    kv_heads=st.sampled_from([1, 2, 4]),
    vocab=st.sampled_from([3, 50, 301]),
    tie_embeddings=st.booleans(),
    attention_bias=st.booleans(),
    qk_norm=st.booleans(),
)


@st.composite
def cases(draw: st.DrawFn) -> dict:
    cfg = draw(configs)
    numerics = draw(st.sampled_from(["exact", "official"]))
    dtype = draw(st.sampled_from(["bf16", "bf16", "f16", "f32", "f64"]))
    identical = draw(st.integers(0, 4)) == 0  # experts equal to the base in one case out of five
    planting = synth.Planting(
        safety_layers=draw(st.sets(st.integers(0, cfg.n_layers - 1))),
        expert_layers=draw(st.sets(st.integers(0, cfg.n_layers - 1))),
        strong=0.0 if identical else draw(st.sampled_from([0.3, 0.05])),
        weak=0.0 if identical else draw(st.sampled_from([0.03, 0.3])),
        outside=0.0 if identical else 0.02,
        seed=draw(st.integers(0, 2**16)),
    )
    shard = st.one_of(st.none(), st.integers(2_000, 200_000))
    return dict(
        config=cfg,
        dtype=dtype,
        planting=planting,
        shard_bytes={"base": draw(shard), "safety": draw(shard), "expert": draw(shard)},
        identical=identical,
        zero_base=draw(st.booleans()),
        options=dict(
            granularity=draw(st.sampled_from(["layer", "module"])),
            numerics=numerics,
            tau=draw(st.sampled_from([0.0, 0.001, 0.02, 1.0])),
            alpha=draw(st.sampled_from([0.0, 1.0, 0.5, 0.3])),
            outside=draw(st.sampled_from(["blend", "blend", "expert", "safety"])),
            norms=draw(st.sampled_from(["expert", "expert", "safety", "blend"])),
            max_memory=draw(st.sampled_from(["66MiB", "1GiB"])),
            shard_size=draw(st.sampled_from([5_000_000_000, 30_000])),
            threads=draw(st.sampled_from([1, 2])),
            out_dtype=draw(st.sampled_from([None, None, None, "bf16", "f16", "f32", "f64"])),
        ),
    )


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_engine_matches_reference(case: dict, merge_checked) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = synth.make_trio(root / "in", case["config"], dtype=case["dtype"], planting=case["planting"], shard_bytes=case["shard_bytes"])
        if case["zero_base"]:
            zero_tensor(paths["base"], "model.layers.0.self_attn.k_proj.weight")
        opts = case["options"]
        report, result = merge_checked(paths, root / "out", **opts, verify=True)
        plan = reference.compute_plan(paths["base"], paths["safety"], paths["expert"], granularity=opts["granularity"],
                                      tau=opts["tau"], numerics=opts["numerics"])
        assert [u["decision"] for u in report["units"]] == [u.decision for u in plan.units]
        if case["identical"]:
            # Experts equal to the base: every score is 0, every d is 0, every unit blends.
            assert {u["decision"] for u in report["units"]} == {"blend"}
        if opts["numerics"] == "official":
            assert_bit_exact(result, report, plan)
        else:
            # The engine and torch both round float32 (float64 for F64) once: every byte is identical.
            assert all(t.status == "identical" for t in result.tensors), [t for t in result.tensors if t.status != "identical"]


@pytest.mark.parametrize("granularity", ["layer", "module"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_official_numerics_bit_exact(make_trio, merge_checked, tmp_path, granularity, dtype):
    """The authors' bf16 arithmetic, bit for bit, on tensors that straddle chunks and leave a tail."""
    paths = make_trio(config=STRADDLE, dtype=dtype, shard_bytes={"base": 150_000, "safety": None, "expert": 400_000})
    report, result = merge_checked(paths, tmp_path / "out", granularity=granularity, numerics="official", alpha=0.3, max_memory="66MiB",
                                   verify=True)
    plan = reference.compute_plan(paths["base"], paths["safety"], paths["expert"], granularity=granularity, numerics="official")
    assert_bit_exact(result, report, plan)
    assert report["counts"]["safety"] > 0 and report["counts"]["expert"] > 0


def test_official_norms_are_torch_norms_on_large_tensors(tmp_path):
    """Every norm the engine uses in official numerics is the bf16 scalar torch.norm returns, on
    tensors of 1M elements where a float64 sum rounded to bf16 often is not (measured ~0.3% of such
    tensors; 5% at 16M elements)."""
    cfg = synth.LlamaConfig(n_layers=2, hidden=512, intermediate=2051, heads=8, kv_heads=2, vocab=64)
    paths = synth.make_trio(tmp_path, cfg, dtype="bf16")
    plan = lsf.analyze(paths["base"], paths["safety"], paths["expert"], numerics="official", max_memory="66MiB")
    ref = {n.name: n for n in reference.compute_plan(paths["base"], paths["safety"], paths["expert"], numerics="official").norms}
    assert len(plan.stats) == len(ref) == 14
    for s in plan.stats:
        r = ref[s.name]
        assert (bf16_norm(s.base_ss), bf16_norm(s.diff_ss[0]), bf16_norm(s.diff_ss[1])) == (r.base, r.safety, r.expert), s.name


def write_tensor(model: Path, name: str, values: "torch.Tensor") -> None:
    """Overwrites one bf16 tensor of a model folder in place with ``values`` (same element count)."""
    overwrite_tensor(model, name, lambda nbytes: values.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())


CRAFTED = "model.layers.0.self_attn.q_proj.weight"


def crafted_trio(root: Path) -> dict[str, Path]:
    """A trio whose base q_proj makes torch's float32 lane sums absorb millions of small squares: 16
    values of 1 (each lane holds 2.0) then 2^-12 everywhere else (2^-24 is below half an ulp of 2.0).
    torch.norm says 4.0; the float64 sum rounds to 4.03125."""
    cfg = synth.LlamaConfig(n_layers=1, hidden=2048, intermediate=16, heads=16, kv_heads=1, vocab=8)
    paths = synth.make_trio(root, cfg, dtype="bf16")
    values = torch.full((2048 * 2048,), 2.0**-12)
    values[:16] = 1.0
    write_tensor(paths["base"], CRAFTED, values)
    b = reference.Checkpoint(paths["base"]).get(CRAFTED)
    exact64 = torch.tensor(math.sqrt(float((b.double() ** 2).sum())), dtype=torch.float32).to(torch.bfloat16).item()
    assert (torch.norm(b).item(), exact64) == (4.0, 4.03125), "the case no longer separates the two sums"
    return paths


def bf16_norm(ss: float) -> float:
    """A sum of squares as official numerics turn it into a norm: square root, rounded to bf16."""
    return torch.tensor(math.sqrt(ss), dtype=torch.float32).to(torch.bfloat16).item()


def test_official_norm_where_float32_and_float64_sums_round_apart(tmp_path):
    """official numerics follow torch's float32 sum where a float64 sum would round differently."""
    paths = crafted_trio(tmp_path)
    plan = lsf.analyze(paths["base"], paths["safety"], paths["expert"], numerics="official", max_memory="66MiB")
    s = next(x for x in plan.stats if x.name == CRAFTED)
    assert bf16_norm(s.base_ss) == 4.0
    ref = reference.compute_plan(paths["base"], paths["safety"], paths["expert"], numerics="official")
    assert [(u.score_safety, u.score_expert) for u in plan.units] == [(u.score_safety, u.score_expert) for u in ref.units]


def test_exact_numerics_identical_bytes_on_straddling_tensors(make_trio, merge_checked, tmp_path):
    """exact numerics: float32 blends rounded once are what torch computes too, byte for byte."""
    paths = make_trio(config=STRADDLE, dtype="bf16", shard_bytes={"base": 150_000, "safety": None, "expert": 400_000})
    _, result = merge_checked(paths, tmp_path / "out", granularity="module", alpha=0.3, max_memory="66MiB", shard_size=300_000,
                              verify=True)
    assert all(t.status == "identical" for t in result.tensors)


@pytest.mark.parametrize("out_dtype", ["bf16", "f32", "f64"])
def test_out_dtype_conversions(make_trio, merge_checked, tmp_path, out_dtype):
    paths = make_trio(dtype="f32")
    merge_checked(paths, tmp_path / "out", out_dtype=out_dtype, verify=True)


def test_f64_checkpoints_both_numerics(make_trio, merge_checked, tmp_path):
    paths = make_trio(dtype="f64")
    merge_checked(paths, tmp_path / "exact", granularity="module", verify=True)
    merge_checked(paths, tmp_path / "official", granularity="module", numerics="official", verify=True)


def test_reference_plan_matches_the_numpy_one_in_models_py(make_trio):
    """Two independent restatements of METHOD.md agree (numpy in tests/models.py, torch here)."""
    from models import numpy_plan

    paths = make_trio()
    for g in ("layer", "module"):
        ref = reference.compute_plan(paths["base"], paths["safety"], paths["expert"], granularity=g)
        np_plan = numpy_plan(paths["base"], paths["safety"], paths["expert"], g)
        for u in ref.units:
            key = u.layer if u.part is None else (u.layer, u.part)
            assert np_plan[key]["decision"] == u.decision
            assert np_plan[key]["d"] == pytest.approx(u.d, rel=1e-9, abs=1e-15)


def test_reference_official_reproduces_the_authors_operations(make_trio):
    """The official reference is the authors' code: bf16 models, torch.norm(X - B).item() / norm(B)."""
    paths = make_trio()
    B, S = reference.Checkpoint(paths["base"]), reference.Checkpoint(paths["safety"])
    plan = reference.compute_plan(paths["base"], paths["safety"], paths["expert"], numerics="official")
    name = "model.layers.1.mlp.up_proj.weight"
    b, s = B.get(name).to(torch.bfloat16), S.get(name).to(torch.bfloat16)
    n = next(x for x in plan.norms if x.name == name)
    assert n.r_safety == torch.norm(s - b).item() / torch.norm(b).item()
    blended = reference.merged_tensor("blend", s, b, 0.3, "official")
    assert torch.equal(blended, 0.3 * s + (1 - 0.3) * b)


def test_zero_norm_base_uses_the_unnormalised_change(make_trio, merge_checked, tmp_path):
    paths = make_trio(config=STRADDLE)
    base = tmp_path / "base"
    base.mkdir()
    for f in paths["base"].iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    name = "model.layers.2.self_attn.q_proj.weight"
    zero_tensor(base, name)
    trio = {"base": base, "safety": paths["safety"], "expert": paths["expert"]}
    for numerics in ("exact", "official"):
        plan = reference.compute_plan(base, paths["safety"], paths["expert"], numerics=numerics)
        n = next(x for x in plan.norms if x.name == name)
        assert n.base == 0 and n.r_safety == n.safety > 0
        merge_checked(trio, tmp_path / f"out-{numerics}", numerics=numerics, verify=True)


def test_tau_zero_and_identical_experts(merge_checked, tmp_path):
    """tau = 0 with experts equal to the base: d is exactly 0 everywhere, and |d| <= tau blends."""
    paths = synth.make_trio(tmp_path / "in", synth.LlamaConfig(n_layers=3), planting=synth.Planting(strong=0.0, weak=0.0, outside=0.0))
    for numerics in ("exact", "official"):
        report, _ = merge_checked(paths, tmp_path / numerics, tau=0.0, numerics=numerics, granularity="module", verify=True)
        assert report["counts"] == {"safety": 0, "expert": 0, "blend": 6}


def test_reference_without_layers_is_a_clear_error(tmp_path):
    paths = synth.make_trio(tmp_path, synth.LlamaConfig(n_layers=1))
    with pytest.raises(ValueError, match="no measured tensors"):
        reference.compute_plan(paths["base"], paths["safety"], paths["expert"], layout={
            "layer": r"^transformer\.h\.(\d+)\.", "attention": "^attn", "mlp": "^mlp", "targets": "^x$"})


def test_reference_merge_file_equals_engine_output(make_trio, tmp_path):
    """reference.merge writes the whole merged model; in official numerics it is the engine's, byte for byte."""
    from safetensors.torch import load_file

    paths = make_trio(config=STRADDLE)
    lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "engine", numerics="official", granularity="module", shard_size=100_000)
    reference.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "ref.safetensors", numerics="official", granularity="module")
    ref = load_file(tmp_path / "ref.safetensors")
    got: dict = {}
    for f in reference.shard_files(tmp_path / "engine"):
        got.update(load_file(f))
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert torch.equal(got[name].view(torch.int16), t.view(torch.int16)), name


def test_official_allow_non_finite_keeps_torch_sums_elsewhere(tmp_path):
    """A NaN in one expert tensor (allowed): that tensor is summed over its finite elements, every
    other norm is still exactly torch's, the crafted one included."""
    paths = crafted_trio(tmp_path)
    bad = "model.layers.0.mlp.up_proj.weight"
    t = reference.Checkpoint(paths["expert"]).get(bad).clone().flatten()
    t[7] = float("nan")
    write_tensor(paths["expert"], bad, t)
    plan = lsf.analyze(paths["base"], paths["safety"], paths["expert"], numerics="official", allow_non_finite=True, max_memory="66MiB")
    ref = {n.name: n for n in reference.compute_plan(paths["base"], paths["safety"], paths["expert"], numerics="official").norms}
    assert ref[CRAFTED].base == 4.0
    for s in plan.stats:
        r = ref[s.name]
        assert (bf16_norm(s.base_ss), bf16_norm(s.diff_ss[0])) == (r.base, r.safety), s.name
        if s.name == bad:
            assert math.isnan(r.expert) and math.isfinite(s.diff_ss[1]) and s.diff_ss[1] > 0
        else:
            assert bf16_norm(s.diff_ss[1]) == r.expert, s.name

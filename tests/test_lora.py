"""LoRA experts: adapters made with PEFT itself on a tiny LlamaForCausalLM, checked against an independent
float64 computation (numpy, with the factors and scales PEFT reports) and against PEFT's own merge.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from models import LAYER, TARGET, decode, engine_units, locate, method_decisions, read_model, unit_of

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import layerswap_fast as lsf  # noqa: E402
from layerswap_fast.cli import main  # noqa: E402

# transformers and PEFT deprecations are theirs to fix, not failures of this package.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        # PEFT saves a targeted embedding whole as well; the engine checks it is B's.
                                        "ignore:Setting `save_embedding_layers`:UserWarning")

LAYERS = 4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config() -> Any:
    return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                                    num_key_value_heads=2, tie_word_embeddings=False)


def make_base(folder: Path, dtype: Any) -> Path:
    """A tiny Llama with random weights, saved by transformers (with a tokenizer file to follow)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).to(dtype)
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"role": "base"}))
    return folder


def make_adapter(base: Path, folder: Path, config: Any, seed: int, layer_scale: list[float], tokenizer: bool = False) -> Path:
    """A PEFT adapter on ``base`` whose factors are random (PEFT starts lora_B at zero), larger in the
    layers where ``layer_scale`` is larger, saved with save_pretrained."""
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in pm.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_embedding_A:
                a, b = module.lora_embedding_A["default"], module.lora_embedding_B["default"]
                a.copy_(torch.randn(a.shape, generator=g))
                b.copy_(torch.randn(b.shape, generator=g) * 0.004)
            if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
                layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=g) * 0.004 * layer_scale[layer])
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.copy_(p + torch.randn(p.shape, generator=g) * 0.01)
    pm.save_pretrained(folder)
    if tokenizer:
        (folder / "tokenizer_config.json").write_text(json.dumps({"role": folder.name}))
    return folder


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """bf16 and f32 bases; a safety adapter (rsLoRA, rank_pattern, every projection, stronger in the
    first layers) and a language adapter (alpha_pattern, no o_proj, gate_proj only in it; stronger in
    the last layers, an embedding LoRA, lm_head saved whole, its own tokenizer)."""
    root = tmp_path_factory.mktemp("lora")
    out: dict[str, Path] = {}
    for tag, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        base = make_base(root / f"base-{tag}", dtype)
        out[f"base-{tag}"] = base
        s_cfg = peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"down_proj": 4},
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
        m_cfg = peft.LoraConfig(r=4, lora_alpha=8, alpha_pattern={"v_proj": 2},
                                target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
                                modules_to_save=["lm_head"])
        out[f"s-{tag}"] = make_adapter(base, root / f"safety-{tag}", s_cfg, 1, [3.0, 3.0, 0.3, 0.3])
        out[f"m-{tag}"] = make_adapter(base, root / f"expert-{tag}", m_cfg, 2, [0.3, 0.3, 3.0, 3.0], tokenizer=True)
    return out


def peft_deltas(base: Path, adapter: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """ΔW per base tensor in float64, from the factors and scaling PEFT itself loads (explicit B @ A,
    not the engine's Gram identity), and the tensors the adapter saved whole."""
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, adapter)
    deltas, full = {}, {}
    for name, module in pm.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().double().numpy()
            b = module.lora_B["default"].weight.detach().double().numpy()
            deltas[f"{name}.weight"] = module.scaling["default"] * (b @ a)
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_embedding_A:
            # PEFT's embedding update is (B @ A) transposed.
            a = module.lora_embedding_A["default"].detach().double().numpy()
            b = module.lora_embedding_B["default"].detach().double().numpy()
            deltas[f"{name}.weight"] = module.scaling["default"] * (b @ a).T
    for name, p in pm.base_model.model.named_parameters():
        if ".modules_to_save.default." in name:
            full[name.replace(".modules_to_save.default.", ".")] = p.detach().double().numpy()
    return deltas, full


def value(name: str, B: dict, deltas: tuple[dict, dict]) -> np.ndarray:
    """Tensor ``name`` of B + ΔW in float64."""
    d, full = deltas
    if name in full:
        return full[name].reshape(-1)
    b = decode(B[name][0], B[name][2])
    return b + d[name].reshape(-1) if name in d else b


def numpy_lora_plan(B: dict, ds: tuple, dm: tuple, granularity: str, tau: float) -> dict[Any, dict[str, Any]]:
    def measured() -> Any:
        for name in B:
            m = LAYER.match(name)
            if m and TARGET.match(m.group(2)):
                yield unit_of(name, granularity), decode(B[name][0], B[name][2]), value(name, B, ds), value(name, B, dm)

    return method_decisions(measured(), granularity, tau)


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_decisions_from_factors_equal_numpy(lora: dict[str, Path], granularity: str) -> None:
    base, s, m = lora["base-bf16"], lora["s-bf16"], lora["m-bf16"]
    B = read_model(base)
    want = numpy_lora_plan(B, peft_deltas(base, s), peft_deltas(base, m), granularity, 0.001)
    got = engine_units(lsf.analyze(base, s, m, granularity=granularity))
    assert set(got) == set(want)
    for unit, w in want.items():
        g = got[unit]
        assert g.decision == w["decision"], unit
        for field, key in (("score_safety", "A_s"), ("score_expert", "A_m"), ("p_safety", "p_s"), ("p_expert", "p_m")):
            assert getattr(g, field) == pytest.approx(w[key], rel=1e-9), (unit, field)
    assert {u.decision for u in got.values()} >= {"safety", "expert"}


def bf16_ulp(x: np.ndarray) -> np.ndarray:
    return np.spacing(np.abs(x).astype(np.float32)) * np.float32(2**16)


def expected_tensor(name: str, decision: str, B: dict, ds: tuple, dm: tuple, alpha: float) -> np.ndarray:
    if decision == "safety":
        return value(name, B, ds)
    if decision == "expert":
        return value(name, B, dm)
    return alpha * value(name, B, ds) + (1 - alpha) * value(name, B, dm)


@pytest.mark.parametrize("tau,granularity", [(0.001, "module"), (1.0, "layer")])
def test_full_output_is_base_plus_delta_rounded_once(lora: dict[str, Path], tmp_path: Path, tau: float, granularity: str) -> None:
    """Swapped units are B + ΔW of their adapter and blends α(B+ΔW_S)+(1−α)(B+ΔW_M), each within one
    bf16 ulp of the float64 value; outside tensors (blend) are B blended with M's saved lm_head."""
    base, s, m = lora["base-bf16"], lora["s-bf16"], lora["m-bf16"]
    out = tmp_path / "out"
    report = lsf.merge(base, s, m, out, granularity=granularity, tau=tau, alpha=0.3, max_memory="80MiB")
    B, O = read_model(base), read_model(out)
    ds, dm = peft_deltas(base, s), peft_deltas(base, m)
    assert set(O) == set(B)
    units = {(u["layer"] if u["part"] is None else (u["layer"], u["part"])): u for u in report["units"]}
    seen = set()
    for name, (dtype, shape, raw) in O.items():
        assert (dtype, shape) == (B[name][0], B[name][1]), name
        unit = unit_of(name, granularity)
        decision = {"outside": "blend", "norm": "expert"}.get(unit) if unit in ("outside", "norm") else units[unit]["decision"]
        seen.add(decision)
        want = expected_tensor(name, decision, B, ds, dm, 0.3)
        got = decode(dtype, raw)
        assert np.all(np.abs(got - want) <= bf16_ulp(want)), name
        if name not in ds[0] and name not in dm[0] and name not in dm[1]:
            assert raw == B[name][2], name  # untouched by either adapter: B's bytes
    assert seen >= ({"blend"} if tau == 1.0 else {"safety", "expert"})
    assert (out / "config.json").read_text() == (base / "config.json").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"role": m.name}
    src = report["sources"]
    assert src["safety"]["kind"] == "lora" and src["safety"]["rank"] == 8 and src["safety"]["stats_source"] == "factors"
    assert src["expert"]["kind"] == "lora" and src["expert"]["rank"] == 4 and src["expert"]["saved_tensors"] == ["lm_head.weight"]
    assert "model.embed_tokens.weight" in dm[0]  # the embedding LoRA took part (outside: blended with B)


def test_full_safety_expert_with_lora_language_expert(lora: dict[str, Path], tmp_path: Path) -> None:
    """A full S (the safety adapter materialised by PEFT) and a LoRA M, and the reverse: the
    statistics and blends mix both kinds."""
    base, s, m = lora["base-bf16"], lora["s-bf16"], lora["m-bf16"]
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    full_s = tmp_path / "safety-full"
    peft.PeftModel.from_pretrained(model, s).merge_and_unload().save_pretrained(full_s)
    B, S = read_model(base), read_model(full_s)
    dm = peft_deltas(base, m)

    def measured() -> Any:
        for name in B:
            mm = LAYER.match(name)
            if mm and TARGET.match(mm.group(2)):
                yield unit_of(name, "layer"), decode(B[name][0], B[name][2]), decode(S[name][0], S[name][2]), value(name, B, dm)

    want = method_decisions(measured(), "layer", 0.001)
    out = tmp_path / "out"
    report = lsf.merge(base, full_s, m, out, tau=1.0)
    assert [u["decision"] for u in report["units"]] == ["blend"] * LAYERS
    assert [u["d"] for u in report["units"]] == pytest.approx([want[i]["d"] for i in range(LAYERS)], rel=1e-9, abs=1e-15)
    assert report["sources"]["safety"]["kind"] == "full" and report["sources"]["expert"]["kind"] == "lora"
    O = read_model(out)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.mlp.gate_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        want_t = 0.5 * decode(S[name][0], S[name][2]) + 0.5 * value(name, B, dm)
        assert np.all(np.abs(decode(O[name][0], O[name][2]) - want_t) <= bf16_ulp(want_t)), name
    # The reverse: a LoRA safety expert and a full language expert (the output keeps M's tensors).
    got = engine_units(lsf.analyze(base, m, full_s))
    assert [got[i].d for i in range(LAYERS)] == pytest.approx([-want[i]["d"] for i in range(LAYERS)], rel=1e-9, abs=1e-15)


def test_cli_and_bulk_take_adapters_mixed_with_full_experts(lora: dict[str, Path], tmp_path: Path) -> None:
    base, s, m = lora["base-bf16"], lora["s-bf16"], lora["m-bf16"]
    one = tmp_path / "one"
    r = CliRunner().invoke(main, ["merge", "-b", str(base), "-s", str(s), "-m", str(m), "-o", str(one), "-g", "module"])
    assert r.exit_code == 0, r.output
    bulk_out = tmp_path / "bulk"
    r = CliRunner().invoke(main, ["merge", "-b", str(base), "-s", str(s), "-m", f"ko={m}", "-m", f"base={base}", "-o", str(bulk_out), "-g", "module"])
    assert r.exit_code == 0, r.output
    assert read_model(bulk_out / "ko") == read_model(one)
    rep = json.loads((bulk_out / "ko" / "layerswap_report.json").read_text())
    assert rep["sources"]["expert"]["kind"] == "lora"
    assert json.loads((bulk_out / "base" / "layerswap_report.json").read_text())["sources"]["expert"]["kind"] == "full"


def test_unsupported_adapters_are_named(lora: dict[str, Path], tmp_path: Path) -> None:
    base = lora["base-bf16"]
    loha = make_adapter(base, tmp_path / "loha", peft.LoHaConfig(r=4, target_modules=["q_proj"]), 3, [1.0] * LAYERS)
    r = CliRunner().invoke(main, ["analyze", "-b", str(base), "-s", str(loha), "-m", str(lora["m-bf16"])])
    assert r.exit_code == 2 and "LoHa" in r.output and "adapter_config.json" in r.output, r.output
    dora = make_adapter(base, tmp_path / "dora", peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), 3, [1.0] * LAYERS)
    r = CliRunner().invoke(main, ["merge", "-b", str(base), "-s", str(lora["s-bf16"]), "-m", str(dora), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "DoRA" in r.output and not (tmp_path / "o").exists(), r.output
    r = CliRunner().invoke(main, ["analyze", "-b", str(base), "-s", str(lora["s-bf16"]), "-m", str(lora["m-bf16"]), "--numerics", "official"])
    assert r.exit_code == 2 and "LoRA" in r.output, r.output


def load_merged(base: Path, adapter: Path) -> dict[str, np.ndarray]:
    """PEFT's own reading of an adapter: loaded on ``base`` in float32 and merged into it."""
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().double().numpy() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("tau,granularity", [(0.001, "module"), (1.0, "layer")])
def test_emitted_adapter_loads_in_peft_and_equals_the_full_output(lora: dict[str, Path], tmp_path: Path, tau: float, granularity: str) -> None:
    """--emit adapter: swapped modules keep their adapter's factors (and rank), blended modules are the
    rank concatenation; PEFT loads the result and its merge equals the full-model output."""
    base, s, m = lora["base-f32"], lora["s-f32"], lora["m-f32"]
    opts = dict(granularity=granularity, tau=tau, alpha=0.3, outside="expert")
    full = tmp_path / "full"
    lsf.merge(base, s, m, full, **opts)
    emitted = tmp_path / "adapter"
    r = CliRunner().invoke(main, ["merge", "-b", str(base), "-s", str(s), "-m", str(m), "-o", str(emitted), "--emit", "adapter",
                                  "-g", granularity, "--tau", str(tau), "--alpha", "0.3", "--outside", "expert"])
    assert r.exit_code == 0, r.output
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "layerswap_report.json"} <= {p.name for p in emitted.iterdir()}
    got = load_merged(base, emitted)
    F = read_model(full)
    assert set(got) == set(F)
    for name, (dtype, shape, raw) in F.items():
        want = decode(dtype, raw).reshape(shape)
        assert np.abs(got[name] - want).max() <= 1e-5 * np.abs(want).max(), name
    report = json.loads((emitted / "layerswap_report.json").read_text())
    kinds = {mod["source"] for mod in report["output"]["modules"]}
    assert kinds >= ({"blend"} if tau == 1.0 else {"safety", "expert"})
    cfg = json.loads((emitted / "adapter_config.json").read_text())
    ranks = {mod["module"]: mod["rank"] for mod in report["output"]["modules"]}
    # A blended module has both ranks (S: 8, down_proj 4; M: 4), a swapped one its own adapter's.
    for mod in report["output"]["modules"]:
        name = mod["module"].rsplit(".", 1)[1]
        s_rank = 0 if name == "gate_proj" else 4 if name == "down_proj" else 8
        m_rank = 0 if name in ("k_proj", "o_proj") else 4
        want_rank = {"blend": s_rank + m_rank, "safety": s_rank, "expert": m_rank}[mod["source"]]
        assert ranks[mod["module"]] == want_rank, mod
    assert cfg["modules_to_save"] == ["lm_head"]


def test_emit_adapter_refuses_what_an_adapter_cannot_express(lora: dict[str, Path], tmp_path: Path) -> None:
    base, s, m = lora["base-f32"], lora["s-f32"], lora["m-f32"]
    # M saved lm_head whole: blending it (the default outside policy) needs a full tensor.
    r = CliRunner().invoke(main, ["merge", "-b", str(base), "-s", str(s), "-m", str(m), "-o", str(tmp_path / "a"), "--emit", "adapter"])
    assert r.exit_code == 2 and "lm_head.weight" in r.output and "--outside" in r.output and not (tmp_path / "a").exists(), r.output
    # A full expert cannot be written as an adapter.
    r = CliRunner().invoke(main, ["merge", "-b", str(base), "-s", str(s), "-m", str(base), "-o", str(tmp_path / "b"), "--emit", "adapter"])
    assert r.exit_code == 2 and "full model" in r.output and not (tmp_path / "b").exists(), r.output


# --- verify: the torch reference reads the adapters itself and recomputes B + ΔW ----------------------------------


def flip_bit(folder: Path, name: str, element: int, bit: int) -> None:
    """Flips one bit of one element of tensor ``name`` in the .safetensors file of ``folder`` holding it."""
    f, offset, _, dtype = locate(folder, name)
    at = offset + element * {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}[dtype] + bit // 8
    with open(f, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ (1 << (bit % 8))]))


def verify_cli(out: Path, base: Path, s: Path, m: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["verify", str(out), "-b", str(base), "-s", str(s), "-m", str(m), *args])


@pytest.mark.parametrize("tag,tau,granularity", [("bf16", 0.001, "module"), ("bf16", 1.0, "layer"), ("f32", 0.001, "layer")])
def test_verify_checks_a_lora_merge_and_catches_one_flipped_bit(lora: dict[str, Path], tmp_path: Path, tag: str, tau: float,
                                                                granularity: str) -> None:
    """verify recomputes B + ΔW from the adapters' files (its own reading of adapter_config.json: rsLoRA,
    rank_pattern, alpha_pattern, an embedding LoRA, lm_head in modules_to_save) and requires every byte;
    one flipped low bit of one element of a LoRA-derived tensor is a failure naming the tensor."""
    base, s, m = lora[f"base-{tag}"], lora[f"s-{tag}"], lora[f"m-{tag}"]
    out = tmp_path / "out"
    opts = ["-g", granularity, "--tau", str(tau), "--alpha", "0.3"]
    r = CliRunner().invoke(main, ["merge", "-q", "-b", str(base), "-s", str(s), "-m", str(m), "-o", str(out), "--max-memory", "80MiB", *opts])
    assert r.exit_code == 0, r.output
    r = verify_cli(out, base, s, m, *opts)
    assert r.exit_code == 0 and "verified: output matches the reference" in r.output, r.output
    assert "tensors from" in r.output and " 0\nverified" in r.output.replace("  ", " ")
    # q_proj of layer 2 is updated by both adapters (whatever the decision, its value is B + ΔW); the
    # embeddings by M's embedding LoRA.
    for name in ("model.layers.2.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        flip_bit(out, name, 7, 0)
        r = verify_cli(out, base, s, m, *opts)
        assert r.exit_code == 1 and f"tensor '{name}'" in r.output and "1 element(s) differ" in r.output, r.output
        flip_bit(out, name, 7, 0)
    assert verify_cli(out, base, s, m, *opts).exit_code == 0


def test_verify_checks_a_full_safety_expert_with_a_lora_language_expert(lora: dict[str, Path], tmp_path: Path) -> None:
    base, s, m = lora["base-bf16"], lora["s-bf16"], lora["m-bf16"]
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    full_s = tmp_path / "safety-full"
    peft.PeftModel.from_pretrained(model, s).merge_and_unload().save_pretrained(full_s)
    for tau in (0.001, 1.0):
        out = tmp_path / f"out-{tau}"
        lsf.merge(base, full_s, m, out, tau=tau, alpha=0.3, granularity="module")
        res = lsf.verify(out, base, full_s, m, tau=tau, alpha=0.3, granularity="module")
        assert res.ok, res.summary()
        flip_bit(out, "model.layers.3.mlp.down_proj.weight", 0, 0)
        res = lsf.verify(out, base, full_s, m, tau=tau, alpha=0.3, granularity="module")
        assert [t.name for t in res.tensors if not t.ok] == ["model.layers.3.mlp.down_proj.weight"], res.summary()
    # numerics official cannot describe a LoRA merge: said, not compared.
    res = lsf.verify(out, base, full_s, m, tau=1.0, alpha=0.3, granularity="module", numerics="official")
    assert not res.ok and any("exact numerics only" in p for p in res.problems)


@pytest.mark.parametrize("tau,granularity", [(0.001, "module"), (1.0, "layer")])
def test_verify_checks_an_emitted_adapter(lora: dict[str, Path], tmp_path: Path, tau: float, granularity: str) -> None:
    """--emit adapter: verify reads the emitted adapter as PEFT would (rank/alpha per module from its
    config) and checks each module against the reference's decision: swapped modules carry their
    adapter's exact factors, blended ones α·ΔW_S + (1−α)·ΔW_M within the rounding of scaled factors."""
    base, s, m = lora["base-f32"], lora["s-f32"], lora["m-f32"]
    opts = ["-g", granularity, "--tau", str(tau), "--alpha", "0.3", "--outside", "expert"]
    out = tmp_path / "adapter"
    r = CliRunner().invoke(main, ["merge", "-q", "-b", str(base), "-s", str(s), "-m", str(m), "-o", str(out), "--emit", "adapter", *opts])
    assert r.exit_code == 0, r.output
    r = verify_cli(out, base, s, m, *opts)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "layerswap_report.json").read_text())
    mod = next(x for x in report["output"]["modules"] if ".layers." in x["module"])
    assert mod["source"] == ("blend" if tau == 1.0 else mod["source"])
    b_name = f"base_model.model.{mod['module']}.lora_B.weight"
    # A swapped module must hold its adapter's factor bytes: one low bit is a failure. A blended module is
    # checked within the rounding of its scaled factors: a flipped high mantissa bit is far outside it.
    flip_bit(out, b_name, 3, 0 if mod["source"] != "blend" else 22)
    r = verify_cli(out, base, s, m, *opts)
    assert r.exit_code == 1 and f"tensor '{mod['module']}.weight'" in r.output, r.output
    flip_bit(out, b_name, 3, 0 if mod["source"] != "blend" else 22)
    # A module the decisions do not take, added to the config and file, is extra; the wrong decisions fail.
    r = verify_cli(out, base, s, m, *[o if o != "expert" else "safety" for o in opts])
    assert r.exit_code == 1, r.output

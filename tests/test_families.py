"""Every supported model family, end to end: a generated checkpoint with the family's real tensor names
and shapes is inspected and merged in both granularities; the detected places, every decision and
every output byte are checked against the independent numpy computation in ``families.py`` (units
from how each tensor was built, not from the engine's layout files), and the decisions against the
torch reference where torch is installed. Then the edge cases: tied embeddings, an extended
vocabulary, missing and extra tensors, different layer counts, unknown tensors, custom layouts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import layerswap_fast as lsf
from families import BY_ID, FAMILIES, Family, make_trio_from_specs, numpy_expected
from layerswap_fast.cli import main
from layerswap_fast.errors import IncompatibleModelsError, InvalidModelError, InvalidOptionError, LayerswapError
from models import read_model

LAYOUTS = Path(__file__).resolve().parent.parent / "rust" / "layouts"


@pytest.fixture(scope="module")
def family_trio(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, dict[str, Path]] = {}

    def get(fam: Family) -> dict[str, Path]:
        if fam.id not in cache:
            cache[fam.id] = make_trio_from_specs(tmp_path_factory.mktemp(fam.id), fam.specs(), fam.config, dtype=fam.dtype)
        return cache[fam.id]

    return get


def expected_place(tag: tuple) -> Any:
    if tag[0] == "outside":
        return "Outside"
    if tag[0] == "vocab":
        return "Vocab"
    if tag[0] == "norm":
        return {"Layer": {"layer": tag[1], "part": "norm", "target": False}}
    return {"Layer": {"layer": tag[1], "part": tag[0], "target": tag[2]}}


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.id)
def test_family_inspect_and_merge_match_numpy(fam: Family, family_trio, merge_checked, tmp_path):
    paths = family_trio(fam)
    specs = fam.specs()
    n_layers = 1 + max(t[1] for _, _, t in specs if t[0] in ("attention", "mlp", "norm"))
    info = lsf.inspect(paths["expert"])
    assert (info["layout"], info["n_layers"]) == (fam.layout, n_layers)
    places = {t["name"]: t["place"] for t in info["tensors"]}
    assert places == {name: expected_place(tag) for name, _, tag in specs}
    decisions = set()
    for granularity in ("layer", "module"):
        expected = numpy_expected(paths, specs, granularity)
        report = merge_checked(paths, tmp_path / granularity, granularity=granularity, **expected).report
        assert report["layout"] == fam.layout and report["warnings"] == []
        decisions |= {u["decision"] for u in expected["units"].values()}
    assert {"safety", "expert"} <= decisions, "the planted structure should give both decisions"


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.id)
def test_reference_family_table_places_every_tensor(fam: Family):
    """The reference's own family table (written from the modeling code, not from the engine's
    layout files) puts every tensor of every family where the family's builder says it belongs."""
    from layerswap_fast import reference

    patterns = reference.family_patterns(fam.layout)
    for name, _, tag in fam.specs():
        p = patterns.place(name)
        got = ("vocab",) if p.layer is None and p.vocab else ("outside",) if p.layer is None else \
            ("norm", p.layer) if p.part == "norm" else (p.part, p.layer, p.target)
        assert got == tag, (name, got, tag)


@pytest.mark.parametrize("fam", [BY_ID[i] for i in ("gemma3-vl", "qwen2-moe", "falcon-40b", "xlm-roberta", "gpt2-bare")], ids=lambda f: f.id)
@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_family_decisions_match_torch_reference(fam: Family, granularity: str, family_trio, tmp_path, monkeypatch):
    """The torch reference finds the units with its own family table, never the engine's layout
    files: verify passes with the engine's built-in layouts made unreadable to it."""
    reference = pytest.importorskip("layerswap_fast.reference")
    pytest.importorskip("torch")
    paths = family_trio(fam)
    ref = reference.compute_plan(paths["base"], paths["safety"], paths["expert"], granularity=granularity,
                                 layout=reference.family_patterns(fam.layout))
    plan = lsf.analyze(paths["base"], paths["safety"], paths["expert"], granularity=granularity)
    assert [(u.layer, u.part, u.decision) for u in plan.units] == [(u.layer, u.part, u.decision) for u in ref.units]
    for a, b in zip(plan.units, ref.units):
        assert a.d == pytest.approx(b.d, rel=1e-6, abs=1e-12)
    out = tmp_path / "out"
    lsf.merge(paths["base"], paths["safety"], paths["expert"], out, granularity=granularity)

    def no_engine_layouts(*args: Any) -> Any:
        raise AssertionError("verify read the engine's layout files")

    monkeypatch.setattr(lsf._core, "builtin_layouts", no_engine_layouts)
    result = lsf.verify(out, paths["base"], paths["safety"], paths["expert"], granularity=granularity)
    assert result.ok, result.summary()


def test_inspect_cli_prints_units_outside_and_unassigned(family_trio):
    paths = family_trio(BY_ID["gemma3-vl"])
    result = CliRunner().invoke(main, ["inspect", str(paths["expert"])])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "layout gemma" in out and "4 layers" in out and "8 in module granularity" in out
    # Per layer: attention 6 tensors (4 measured), mlp 3 (3), 4 norms.
    assert any(line.split()[:3] == ["attention", "6", "4"] for line in out.splitlines()), out
    assert "language_model.model.embed_tokens.weight [vocab]" in out
    assert "more (--all)" in out  # the vision tower is long
    assert "not assigned to any unit (0): none" in out
    full = CliRunner().invoke(main, ["inspect", "--all", str(paths["expert"])]).output
    assert "vision_tower.vision_model.encoder.layers.2.self_attn.q_proj.weight" in full


# --- edge cases ------------------------------------------------------------------------------------------

LLAMA = BY_ID["llama"]  # tied embeddings
MISTRAL = BY_ID["mistral"]  # untied: embed_tokens and lm_head


def trio_with(tmp_path: Path, fam: Family, edit) -> dict[str, Path]:
    return make_trio_from_specs(tmp_path / "in", fam.specs(), fam.config, dtype=fam.dtype, edit=edit)


def test_tied_embeddings_have_no_lm_head_and_blend_the_embedding(family_trio, merge_checked, tmp_path):
    paths = family_trio(LLAMA)
    assert "lm_head.weight" not in read_model(paths["expert"])
    expected = numpy_expected(paths, LLAMA.specs(), "layer")
    assert expected["source"]("model.embed_tokens.weight")[0] == "blend"
    merge_checked(paths, tmp_path / "out", **expected)
    assert "lm_head.weight" not in read_model(tmp_path / "out")


def _extend_vocab(extra: int):
    """The language expert's vocabulary grows by ``extra`` rows (embeddings and lm_head)."""

    def edit(role: str, specs: list, values: dict) -> None:
        if role != "expert":
            return
        for k, (name, shape) in enumerate(specs):
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                specs[k] = (name, (shape[0] + extra, shape[1]))
                values[name] = np.concatenate([values[name], np.full(extra * shape[1], 0.01, np.float32)])

    return edit


def test_extended_vocabulary_is_an_error_naming_both_shapes(tmp_path):
    paths = trio_with(tmp_path, MISTRAL, _extend_vocab(64))
    with pytest.raises(IncompatibleModelsError) as e:
        lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "out")
    msg = str(e.value)
    assert "[320, 96]" in msg and "[256, 96]" in msg and "--vocab-from expert" in msg, msg
    assert not (tmp_path / "out").exists()
    # analyze shows the decisions, which do not depend on the vocabulary; only merge refuses.
    assert lsf.analyze(paths["base"], paths["safety"], paths["expert"]).n_layers == 4
    result = CliRunner().invoke(main, ["merge", "-b", str(paths["base"]), "-s", str(paths["safety"]), "-m", str(paths["expert"]),
                                       "-o", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "vocabulary shape" in result.output, result.output


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_vocab_from_expert_takes_the_extended_tensors_from_the_language_expert(tmp_path, merge_checked, granularity):
    paths = trio_with(tmp_path, MISTRAL, _extend_vocab(64))
    report = merge_checked(paths, tmp_path / "out", granularity=granularity, vocab_from="expert",
                           **numpy_expected(paths, MISTRAL.specs(), granularity, vocab_from="expert")).report
    assert report["parameters"]["vocab_from"] == "expert" and report["parameters"]["tokenizer_from"] == "expert"
    assert read_model(tmp_path / "out")["lm_head.weight"][1] == [320, 96]


def test_vocab_from_expert_with_another_tokenizer_is_refused():
    with pytest.raises(InvalidOptionError, match="tokenizer"):
        lsf.MergeOptions(vocab_from="expert", tokenizer_from="base")
    assert lsf.MergeOptions(vocab_from="expert", numerics="official").effective_tokenizer_from == "expert"


def _drop(role_to_edit: str, name: str):
    def edit(role: str, specs: list, values: dict) -> None:
        if role == role_to_edit:
            specs[:] = [s for s in specs if s[0] != name]

    return edit


@pytest.mark.parametrize(
    "role, name",
    [
        ("expert", "model.layers.1.self_attn.k_proj.weight"),  # measured, missing from the host
        ("base", "model.layers.2.mlp.up_proj.weight"),  # measured, missing from B
        ("safety", "model.layers.3.self_attn.q_proj.weight"),  # measured, missing from S
        ("safety", "model.layers.0.input_layernorm.weight"),  # a layer norm missing from S
    ],
)
def test_tensor_missing_from_one_model_is_an_error_naming_it(tmp_path, role, name):
    paths = trio_with(tmp_path, MISTRAL, _drop(role, name))
    with pytest.raises(LayerswapError) as e:
        lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "out")
    assert f"'{name}'" in str(e.value), str(e.value)
    assert isinstance(e.value, (IncompatibleModelsError, InvalidModelError))
    assert not (tmp_path / "out").exists()


def _extra_in_expert(name: str, shape: tuple[int, ...]):
    def edit(role: str, specs: list, values: dict) -> None:
        if role == "expert":
            specs.append((name, shape))
            values[name] = np.arange(int(np.prod(shape)), dtype=np.float32) / 100

    return edit


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_outside_tensor_only_in_the_host_is_copied_with_a_warning(tmp_path, granularity):
    """E.g. a language expert saved with an untied lm_head while B and S tie it."""
    paths = trio_with(tmp_path, LLAMA, _extra_in_expert("lm_head.weight", (256, 64)))
    report = lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "out", granularity=granularity, outside="safety")
    assert report["warnings"] == [
        "tensor 'lm_head.weight' is only in the language expert (not in the safety expert): copied from the language expert"
    ]
    O, M = read_model(tmp_path / "out"), read_model(paths["expert"])
    assert O["lm_head.weight"] == M["lm_head.weight"]
    saved = json.loads((tmp_path / "out" / "layerswap_report.json").read_text())
    assert saved["warnings"] == report["warnings"]
    result = CliRunner().invoke(main, ["merge", "-b", str(paths["base"]), "-s", str(paths["safety"]), "-m", str(paths["expert"]),
                                       "-o", str(tmp_path / "cli"), "-g", granularity])
    assert result.exit_code == 0 and "warning: tensor 'lm_head.weight' is only in the language expert" in result.output, result.output


def test_layer_tensor_only_in_the_host_is_an_error(tmp_path):
    """Inside a layer an extra tensor would follow a decision it was never measured for."""
    paths = trio_with(tmp_path, LLAMA, _extra_in_expert("model.layers.1.self_attn.q_proj.bias", (64,)))
    with pytest.raises(LayerswapError, match=r"model\.layers\.1\.self_attn\.q_proj\.bias"):
        lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "out")


def test_measured_tensor_only_in_base_and_safety_is_an_error(tmp_path):
    """S and B measure q_proj.bias, the host has none: the units would be measured differently."""
    def edit(role: str, specs: list, values: dict) -> None:
        if role != "expert":
            specs.append(("model.layers.1.self_attn.q_proj.bias", (64,)))
            values["model.layers.1.self_attn.q_proj.bias"] = np.zeros(64, np.float32) + (role == "safety")

    paths = trio_with(tmp_path, LLAMA, edit)
    with pytest.raises(IncompatibleModelsError, match=r"measured tensor 'model\.layers\.1\.self_attn\.q_proj\.bias'"):
        lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "out")


def test_different_layer_counts_are_an_error_listing_each_model(tmp_path):
    paths = make_trio_from_specs(tmp_path / "a", LLAMA.specs(), LLAMA.config)
    fewer = {**LLAMA.config, "num_hidden_layers": 3}
    other = make_trio_from_specs(tmp_path / "b", LLAMA.build(fewer), fewer)
    with pytest.raises(IncompatibleModelsError) as e:
        lsf.merge(paths["base"], other["safety"], paths["expert"], tmp_path / "out")
    msg = str(e.value)
    assert "different numbers of decoder layers" in msg and "3 in the safety expert" in msg and "4" in msg, msg


def test_unknown_tensor_inside_a_layer_is_shown_by_inspect_and_refused_by_merge(tmp_path):
    paths = trio_with(tmp_path, MISTRAL, lambda role, specs, values: (
        specs.append(("model.layers.2.adapter_scale.weight", (8,))), values.__setitem__("model.layers.2.adapter_scale.weight", np.ones(8, np.float32))))
    result = CliRunner().invoke(main, ["inspect", str(paths["expert"])])
    assert result.exit_code == 0, result.output
    assert "not assigned to any unit (1): model.layers.2.adapter_scale.weight (layer 2)" in result.output
    with pytest.raises(LayerswapError, match="adapter_scale"):
        lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "out")
    # A custom layout that assigns it (to the layer's own tensors) makes the merge possible.
    custom = json.loads((LAYOUTS / "llama.json").read_text())
    custom["norms"] = r"^(input_layernorm|post_attention_layernorm|adapter_scale)\."
    (tmp_path / "custom.json").write_text(json.dumps(custom))
    report = lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "out", layout=tmp_path / "custom.json")
    assert report["n_layers"] == 4


def test_unknown_family_is_a_clear_error(tmp_path, merge_checked):
    # Starcoder2 naming: Llama attention but mlp.c_fc / mlp.c_proj. No built-in layout may half-fit it.
    specs = [(n.replace("mlp.gate_proj", "mlp.c_fc").replace("mlp.down_proj", "mlp.c_proj"), s, t)
             for n, s, t in MISTRAL.specs() if "mlp.up_proj" not in n]
    paths = make_trio_from_specs(tmp_path / "in", specs, {"architectures": ["Starcoder2ForCausalLM"]})
    with pytest.raises(InvalidModelError, match="unknown model layout.*Starcoder2ForCausalLM"):
        lsf.inspect(paths["expert"])
    # The documented custom layout file, in TOML.
    toml = tmp_path / "starcoder2.toml"
    toml.write_text(
        'name = "starcoder2"\n'
        'description = "StarCoder2: Llama attention, GPT-style MLP"\n'
        "layer = '^model\\.layers\\.(\\d+)\\.'\n"
        "attention = '^self_attn\\.'\n"
        "mlp = '^mlp\\.'\n"
        "norms = '^(input_layernorm|post_attention_layernorm)\\.'\n"
        "targets = '^(self_attn\\.[qkvo]_proj|mlp\\.c_(fc|proj))\\.(weight|bias)$'\n"
        "vocab = '^(model\\.embed_tokens|lm_head)\\.weight$'\n"
    )
    assert lsf.inspect(paths["expert"], layout=toml)["layout"] == "starcoder2"
    merge_checked(paths, tmp_path / "out", layout=toml, granularity="module", **numpy_expected(paths, specs, "module"))


def test_invalid_custom_layout_is_a_clear_error(tmp_path, family_trio):
    paths = family_trio(LLAMA)
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "layer": "model\\\\.layers\\\\.", "attention": "a", "mlp": "m", "targets": "t"}')
    with pytest.raises(LayerswapError, match="capture group"):
        lsf.inspect(paths["expert"], layout=bad)
    bad.write_text('{"name": "x", "layer": "(", "attention": "a", "mlp": "m", "targets": "t", "tagrets": 1}')
    with pytest.raises(LayerswapError, match="tagrets"):
        lsf.inspect(paths["expert"], layout=bad)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("name = \n")
    with pytest.raises(InvalidOptionError, match="TOML"):
        lsf.inspect(paths["expert"], layout=bad_toml)


def test_bulk_run_fails_only_the_expert_with_another_vocabulary(tmp_path):
    from layerswap_fast.bulk import ExpertSpec, bulk_merge

    paths = trio_with(tmp_path, MISTRAL, _extend_vocab(64))
    same = make_trio_from_specs(tmp_path / "same", MISTRAL.specs(), MISTRAL.config)  # same seed: same B and S
    experts = [ExpertSpec("extended", paths["expert"]), ExpertSpec("plain", same["expert"]),
               ExpertSpec("allowed", paths["expert"], lsf.MergeOptions(vocab_from="expert"))]
    summary = bulk_merge(paths["base"], paths["safety"], experts, tmp_path / "out")
    status = {name: e["status"] for name, e in summary["experts"].items()}
    assert status["plain"] == status["allowed"] != status["extended"], summary["experts"]
    assert "vocabulary shape" in json.dumps(summary["experts"]["extended"])


def test_a_model_of_another_family_is_named_as_such(tmp_path, family_trio):
    llama, gpt2 = family_trio(LLAMA), family_trio(BY_ID["gpt2"])
    with pytest.raises(IncompatibleModelsError, match=r"safety expert .* does not have the language expert's layout: layout 'llama'"):
        lsf.merge(llama["base"], gpt2["safety"], llama["expert"], tmp_path / "out")

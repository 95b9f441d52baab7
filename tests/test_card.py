"""The model card (OUT/README.md): Hugging Face front matter that huggingface_hub accepts, fields from
the language expert's own card, and commands that really reproduce and verify the merge."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard, ModelCardData

import layerswap_fast as lsf
from layerswap_fast import bulk, card, synth
from layerswap_fast.cli import main

from conftest import model_digest

EXPERT_CARD = """---
license: cc-by-nc-4.0
language:
- ko
- en
pipeline_tag: text-generation
---

# The Korean expert's own card

Trained by someone else. THIS TEXT MUST NOT BE IN THE MERGED MODEL'S CARD.
"""


@pytest.fixture(scope="module")
def trio_with_card(tmp_path_factory, make_trio) -> dict[str, Path]:
    """The trio, with a language expert that has its own README.md card."""
    paths = make_trio(config=synth.LlamaConfig(n_layers=4))
    root = tmp_path_factory.mktemp("carded")
    expert = root / "llama-ko-instruct"
    shutil.copytree(paths["expert"], expert)
    (expert / "README.md").write_text(EXPERT_CARD)
    return {**paths, "expert": expert}


def front(text: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, "the card starts with YAML front matter"
    data = yaml.safe_load(m.group(1))
    assert isinstance(data, dict)
    return data


def bash_block(text: str, heading: str) -> list[str]:
    section = text.split(f"## {heading}", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("layerswap-fast ")]


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_card_front_matter_is_accepted_by_huggingface_hub(trio_with_card, tmp_path, granularity):
    p = trio_with_card
    out = tmp_path / "merged"
    res = CliRunner().invoke(main, ["merge", "-b", str(p["base"]), "-s", str(p["safety"]), "-m", str(p["expert"]), "-o", str(out),
                                    "-g", granularity, "--alpha", "0.3"])
    assert res.exit_code == 0, res.output
    text = (out / "README.md").read_text(encoding="utf-8")
    meta = front(text)
    assert meta["base_model"] == "llama-ko-instruct"  # the expert's folder name (not from the hub)
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    assert {"merge", "layerswap-fast"} <= set(meta["tags"])
    assert meta["license"] == "cc-by-nc-4.0" and meta["language"] == ["ko", "en"]  # copied from the expert's card
    assert "pipeline_tag" not in meta
    # huggingface_hub reads the card and its metadata as the hub does.
    hub_card = ModelCard(text)
    assert hub_card.data.base_model == "llama-ko-instruct"
    assert hub_card.data.license == "cc-by-nc-4.0" and hub_card.data.language == ["ko", "en"]
    assert hub_card.data.to_dict()["base_model_relation"] == "merge"
    ModelCardData(**meta)
    # The expert's own card never replaces ours.
    assert "MUST NOT BE IN" not in text and "layer-wise swapping" in text.lower()
    report = json.loads((out / "layerswap_report.json").read_text())
    c = report["counts"]
    assert f"{c['safety']} units from the safety expert, {c['expert']} kept from the language expert, {c['blend']} blended" in text
    assert "Shin & Hwang" in text and "@inproceedings{shin2026layerwise" in text
    assert str(p["base"]) in text and str(p["safety"]) in text and str(p["expert"]) in text


def test_card_commands_reproduce_and_verify_the_merge(trio_with_card, tmp_path):
    p = trio_with_card
    out = tmp_path / "merged"
    lsf.merge(p["base"], p["safety"], p["expert"], out, granularity="module", tau=0.02, alpha=0.25, outside="expert")
    text = (out / "README.md").read_text(encoding="utf-8")
    (merge_cmd,) = bash_block(text, "Reproduce")
    (verify_cmd,) = bash_block(text, "Verify")
    args = shlex.split(merge_cmd)
    assert args[:2] == ["layerswap-fast", "merge"]
    args[args.index("-o") + 1] = str(tmp_path / "again")
    res = CliRunner().invoke(main, args[1:])
    assert res.exit_code == 0, res.output
    assert model_digest(tmp_path / "again") == model_digest(out)
    res = CliRunner().invoke(main, shlex.split(verify_cmd)[1:])
    assert res.exit_code == 0, res.output
    # The verify command carries the method options (a verify without them would fail).
    assert "--tau 0.02" in verify_cmd and "--alpha 0.25" in verify_cmd and "--outside expert" in verify_cmd


def test_bulk_outputs_have_cards(trio_with_card, tmp_path):
    p = trio_with_card
    bulk.bulk_merge(p["base"], p["safety"], [bulk.ExpertSpec("ko", p["expert"])], tmp_path / "b")
    meta = front((tmp_path / "b" / "ko" / "README.md").read_text(encoding="utf-8"))
    assert meta["base_model"] == "llama-ko-instruct" and meta["license"] == "cc-by-nc-4.0"
    (merge_cmd,) = bash_block((tmp_path / "b" / "ko" / "README.md").read_text(encoding="utf-8"), "Reproduce")
    assert f"-o {shlex.quote(str(tmp_path / 'b' / 'ko'))}" in merge_cmd


def test_base_model_is_the_hub_id_when_the_report_has_one():
    report = {"inputs": {"base": "b", "safety": "s", "expert": {"path": "/cache/snap/abc", "hub_id": "beomi/Llama-3-Open-Ko-8B",
                                                                  "commit": "0123abc"}},
              "parameters": {"tau": 0.001}, "units": []}
    assert card.base_model(report) == "beomi/Llama-3-Open-Ko-8B"
    merge_cmd, _ = card.commands(report, "out")
    assert "-m beomi/Llama-3-Open-Ko-8B@0123abc" in merge_cmd
    assert card.base_model({"inputs": {"expert": "/models/ko/model.safetensors"}}) == "ko"


@pytest.mark.parametrize("text", [
    EXPERT_CARD,
    "---\nlicense: cc-by-nc-4.0\nlanguage: [ko, en]\n---\n",
    "---\nlicense: \"cc-by-nc-4.0\"\nlanguage:\n  - ko\n  - en\n---\n",
])
def test_front_matter_reader_without_pyyaml_agrees_with_pyyaml(text):
    got = card._simple_yaml(text.split("---\n")[1])
    want = yaml.safe_load(text.split("---\n")[1])
    assert got["license"] == want["license"] and got["language"] == want["language"]


@pytest.mark.parametrize("text", ["no front matter", "---\nlicense: [unclosed\n---\n", "---\n- a list\n---\n", "---\nlicense: x\n"])
def test_a_broken_expert_card_is_ignored(tmp_path, text):
    (tmp_path / "README.md").write_text(text)
    assert card.read_front_matter(tmp_path) == {}

"""Bad input: every case of the hostile corpus (tests/hostile/cases.json), bad options and overlapping
output paths. Each must give exit status 2, exactly one line on stderr naming the file and the tensor,
no traceback, no output folder and no staging leftover; the inputs must be byte-identical afterwards.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import layerswap_fast as lsf
from conftest import GOOD, HOSTILE, REPORT_FILES, merge_args, run_cli, tree_digest
from layerswap_fast import cli
from layerswap_fast.errors import InvalidModelError, LayerswapError

CASES: list[dict[str, Any]] = json.loads((HOSTILE / "cases.json").read_text())
Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(autouse=True)
def corpus_untouched() -> Iterator[None]:
    """Nothing in the corpus (the inputs of every test here) changes, byte for byte."""
    before = tree_digest(HOSTILE)
    yield
    assert tree_digest(HOSTILE) == before, "an input file was modified"


def assert_refused(code: int, out: str, err: str, fragments: list[str], target: Path) -> None:
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("layerswap-fast: error: "), err
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert not target.exists(), "an output folder was left behind"
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
    assert not leftovers, f"staging leftovers: {leftovers}"


def case_paths(case: dict[str, Any]) -> dict[str, Path]:
    return {**GOOD, case["role"]: HOSTILE / case["path"]}


REFUSED = [c for c in CASES if c["exit"] == 2]
ACCEPTED = [c for c in CASES if c["exit"] == 0]


@pytest.mark.parametrize("case", REFUSED, ids=[c["name"] for c in REFUSED])
def test_hostile_corpus_case(case: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli(merge_args(case_paths(case), out, *case["args"]))
    # The file (or folder) at fault is named, and the tensor where there is one.
    named = [case["path"].split("/")[-1]]
    assert_refused(code, stdout, err, case["expect"] + named, out)


@pytest.mark.parametrize("case", ACCEPTED, ids=[c["name"] for c in ACCEPTED])
def test_hostile_corpus_accepted_case(case: dict[str, Any], tmp_path: Path) -> None:
    """Inputs that merge, but only as what they are: the output has exactly the good expert's tensors
    (nothing from files beside the model), and the summary names what was left out."""
    from models import read_model

    out = tmp_path / "out"
    code, stdout, err = run_cli(merge_args(case_paths(case), out, *case["args"])[:-1] + list(case["args"]))
    assert code == 0, err
    merged = {n for f in out.glob("*.safetensors") for n in read_model(f)}
    assert merged == set(read_model(GOOD["expert"])), sorted(merged ^ set(read_model(GOOD["expert"])))
    notes = [line for line in stdout.splitlines() if line.startswith("note: ")]
    assert notes and all(f in " ".join(notes) for f in case["expect"]), stdout
    report = json.loads((out / "layerswap_report.json").read_text())
    assert all(f in " ".join(report["notes"]) for f in case["expect"]), report["notes"]


@pytest.mark.parametrize("case", [c for c in REFUSED if c["name"].startswith(("header_", "index_"))], ids=lambda c: c["name"])
def test_hostile_corpus_inspect(case: dict[str, Any]) -> None:
    """The same files through `inspect` (which only opens the model) and the Python API."""
    with pytest.raises(LayerswapError) as info:
        lsf.inspect(HOSTILE / case["path"])
    assert all(f in str(info.value) for f in case["expect"]), str(info.value)


@pytest.mark.parametrize("name", ["header_prefix_absurd", "index_tensor_listed_twice", "nan_embedding_expert", "header_huge_layer_index"])
def test_real_process_exit_status(name: str, tmp_path: Path) -> None:
    """A few cases through a real process: status 2, one line, no traceback, no core dump."""
    case = next(c for c in CASES if c["name"] == name)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "layerswap_fast", *merge_args(case_paths(case), out, *case["args"])],
                          capture_output=True, text=True, timeout=60)
    assert_refused(proc.returncode, proc.stdout, proc.stderr, case["expect"], out)


def test_corpus_is_what_the_script_writes(tmp_path: Path) -> None:
    sys.path.insert(0, str(HOSTILE))
    try:
        import make_corpus
    finally:
        sys.path.remove(str(HOSTILE))
    make_corpus.build(tmp_path / "corpus")
    committed = {k: v for k, v in make_corpus.digest(HOSTILE).items() if not k.endswith(".py")}
    assert committed == make_corpus.digest(tmp_path / "corpus"), "run python tests/hostile/make_corpus.py"


# --- options out of range ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--tau", "-0.01"], "tau"),
        (["--tau", "nan"], "tau"),
        (["--tau", "inf"], "tau"),
        (["--alpha", "1.5"], "alpha"),
        (["--alpha", "-0.1"], "alpha"),
        (["--alpha", "nan"], "alpha"),
        (["--threads", "0"], "threads"),
        (["--threads", "-3"], "threads"),
        (["--threads", "4611686018427387904"], "threads must be at most 4096"),
        (["--max-memory", "99999999999999999999999"], "max_memory must be below 16 EiB"),
        (["--max-memory", "1MiB"], "memory budget of 1.0 MiB is too small"),
        (["--max-memory", "64MiB"], "too small"),
        (["--max-memory", "lots"], "not a size"),
        (["--max-memory", "0"], "max_memory"),
        (["--shard-size", "0"], "shard_size"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_option_out_of_range(extra: list[str], fragment: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli(merge_args(GOOD, out, *extra))
    assert_refused(code, stdout, err, [fragment], out)


def test_options_rejected_by_the_python_api_too(tmp_path: Path) -> None:
    for bad in (dict(tau=-1.0), dict(alpha=2.0), dict(threads=0), dict(max_memory="1MiB")):
        with pytest.raises(LayerswapError):
            lsf.merge(GOOD["base"], GOOD["safety"], GOOD["expert"], tmp_path / "out", **bad)
        assert not (tmp_path / "out").exists()


# --- output path overlapping an input ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["expert_itself", "inside_expert", "inside_base", "parent_of_inputs", "single_file_input"])
@pytest.mark.parametrize("force", [False, True])
def test_output_overlapping_an_input_is_refused(trio_copy: dict[str, Path], where: str, force: bool) -> None:
    paths = dict(trio_copy)
    if where == "single_file_input":
        paths["expert"] = paths["expert"] / "model.safetensors"
    out = {
        "expert_itself": trio_copy["expert"],
        "inside_expert": trio_copy["expert"] / "merged",
        "inside_base": trio_copy["base"] / "sub" / "merged",
        "parent_of_inputs": trio_copy["base"].parent,
        "single_file_input": paths["expert"],
    }[where]
    before = tree_digest(trio_copy["base"].parent)
    code, stdout, err = run_cli(merge_args(paths, out, *(["--force"] if force else [])))
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "overlaps the input" in err, err
    assert tree_digest(trio_copy["base"].parent) == before, "an input was modified"
    assert not (trio_copy["expert"] / "merged").exists() and not (trio_copy["base"] / "sub").exists()


# --- non-finite values ---------------------------------------------------------------------------------


def _case(name: str) -> dict[str, Path]:
    return case_paths(next(c for c in CASES if c["name"] == name))


@pytest.mark.parametrize("name", ["nan_measured_expert", "inf_measured_base", "nan_embedding_expert", "inf_final_norm_safety", "nan_layer_norm_expert"])
def test_allow_non_finite_merges(name: str, tmp_path: Path) -> None:
    """With allow_non_finite the merge completes, every score is a number, and the output holds the
    bad values where its sources did."""
    case = next(c for c in CASES if c["name"] == name)
    out = tmp_path / "out"
    code, stdout, err = run_cli(merge_args(case_paths(case), out, "--allow-non-finite", *case["args"]))
    assert code == 0, err
    report = json.loads((out / "layerswap_report.json").read_text())
    for u in report["units"]:
        for key in ("score_safety", "score_expert", "p_safety", "p_expert", "d"):
            assert isinstance(u[key], float) and math.isfinite(u[key]), (key, u)


def _bf16(raw: bytes) -> np.ndarray:
    return (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4").astype(np.float64)


def test_allow_non_finite_scores_over_finite_elements(tmp_path: Path) -> None:
    """The NaN element of the expert's q_proj is left out of Σ (X − B)²; the rest of the sum is exact."""
    from models import read_model

    paths = _case("nan_measured_expert")
    plan = lsf.analyze(paths["base"], paths["safety"], paths["expert"], allow_non_finite=True)
    B, M = read_model(paths["base"]), read_model(paths["expert"])
    b, x = _bf16(B[Q][2]), _bf16(M[Q][2])
    keep = np.isfinite(x)
    assert keep.sum() == x.size - 1
    want = float(np.sum((x[keep] - b[keep]) ** 2))
    stats = {t.name: t for t in plan.stats}
    assert stats[Q].diff_ss[1] == pytest.approx(want, rel=1e-12)
    # Every other tensor keeps its plain sums.
    other = "model.layers.0.self_attn.k_proj.weight"
    bo, xo = _bf16(B[other][2]), _bf16(M[other][2])
    assert stats[other].diff_ss[1] == pytest.approx(float(np.sum((xo - bo) ** 2)), rel=1e-12)


def test_non_finite_refused_through_the_api(tmp_path: Path) -> None:
    paths = _case("nan_embedding_expert")
    with pytest.raises(InvalidModelError, match="model.embed_tokens.weight"):
        lsf.merge(paths["base"], paths["safety"], paths["expert"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


# --- custom layout files --------------------------------------------------------------------------------


def _llama_layout() -> dict[str, Any]:
    return lsf._core.builtin_layouts()["llama"]


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(layer=r"^model\.(?:layers\.(\d+)|embed_tokens)\."), "first group (the layer index) is empty"),
        (dict(layer=r"^model\.layers\.\d+\."), "capture group"),
        (dict(attention="(unclosed"), "invalid regex"),
        (dict(layer=None), "layer"),
        (dict(surprise=1), "surprise"),
    ],
    ids=["index-group-not-taking-part", "no-group", "bad-regex", "missing-field", "unknown-field"],
)
def test_hostile_custom_layout(change: dict[str, Any], fragment: str, tmp_path: Path) -> None:
    layout = {k: v for k, v in {**_llama_layout(), **change}.items() if v is not None}
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout))
    for args in (["inspect", str(GOOD["expert"]), "--layout", str(path)], merge_args(GOOD, tmp_path / "out", "--layout", str(path))):
        code, stdout, err = run_cli(args)
        assert_refused(code, stdout, err, [fragment], tmp_path / "out")


def test_an_engine_panic_is_one_line_and_status_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The binding turns an engine panic into this RuntimeError; the CLI prints one line, status 1."""
    from layerswap_fast import api

    def panicking(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{cli.ENGINE_PANIC} (please report): index out of bounds")

    monkeypatch.setattr(api, "inspect", panicking)
    code, stdout, err = run_cli(["inspect", str(GOOD["expert"])])
    assert code == 1 and err.strip() == f"layerswap-fast: {cli.ENGINE_PANIC} (please report): index out of bounds", err
    monkeypatch.setattr(api, "inspect", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(AssertionError, match="uncaught RuntimeError"):
        run_cli(["inspect", str(GOOD["expert"])])


def test_a_fifo_posing_as_a_shard_is_refused_not_waited_on(tmp_path: Path) -> None:
    """Opening a FIFO blocks until a writer appears, in a syscall no Ctrl-C reaches: never open one."""
    import os

    expert = tmp_path / "expert"
    expert.mkdir()
    os.mkfifo(expert / "model-00001-of-00001.safetensors")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "layerswap_fast", *merge_args({**GOOD, "expert": expert}, out)],
                          capture_output=True, text=True, timeout=30)
    assert_refused(proc.returncode, proc.stdout, proc.stderr, ["model-00001-of-00001.safetensors", "not a regular file"], out)


@pytest.mark.parametrize("name", ["nan_embedding_expert", "header_truncated_data"])
def test_failed_forced_merge_keeps_the_existing_output(name: str, tmp_path: Path) -> None:
    """--force replaces an existing output only with a complete new one: after a failure the old
    folder is still there, unchanged."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous result")
    (out / "layerswap_report.json").write_text("{}")  # an output of this tool: --force may replace it
    before = tree_digest(out)
    case = next(c for c in CASES if c["name"] == name)
    code, stdout, err = run_cli(merge_args(case_paths(case), out, "--force", *case["args"]))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


_ANY = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=12), st.sampled_from(["layer", "module", "exact", "official", "blend", "bf16", "1GiB", "5GB", "-1"]),
                 st.lists(st.integers(), max_size=2))


@given(st.dictionaries(st.sampled_from(["granularity", "tau", "alpha", "numerics", "outside", "norms", "out_dtype", "max_memory",
                                        "threads", "shard_size", "allow_non_finite", "tokenizer_from"]), _ANY, max_size=4))
@settings(max_examples=300, deadline=None)
def test_any_option_value_is_accepted_or_an_invalid_option_error(fields: dict[str, Any]) -> None:
    """Options from a config file or a notebook can be anything: the only failure is InvalidOptionError."""
    from layerswap_fast.errors import InvalidOptionError
    from layerswap_fast.options import MergeOptions

    try:
        options = MergeOptions(**fields)
    except InvalidOptionError:
        return
    # The engine reads the same object field by field: whatever the Python side accepts, it accepts.
    plan = lsf.Plan.from_dict({"options": options, "layout": "llama", "n_layers": 0, "units": []})
    assert plan.options["tau"] == float(options.tau) and plan.options["threads"] == options.effective_threads


@given(st.dictionaries(st.sampled_from(["tau", "alpha", "max_memory", "threads", "shard_size", "allow_non_finite", "out_dtype"]), _ANY, max_size=3))
@settings(max_examples=60, deadline=None)
def test_any_option_value_through_the_engine(fields: dict[str, Any]) -> None:
    """The same through a real analysis: a plan, or a LayerswapError (never a crash or another type)."""
    try:
        lsf.analyze(GOOD["base"], GOOD["safety"], GOOD["expert"], **fields)
    except LayerswapError:
        pass


def test_huge_side_and_index_files_are_refused_without_reading_them(tmp_path: Path) -> None:
    """Sparse terabyte files cost no disk; reading one whole would exhaust memory."""
    for name in ("config.json", "model.safetensors.index.json"):
        expert = tmp_path / name / "expert"
        shutil.copytree(GOOD["expert"], expert)
        with open(expert / name, "wb") as f:
            f.truncate(1 << 40)
        out = tmp_path / name / "out"
        code, stdout, err = run_cli(merge_args({**GOOD, "expert": expert}, out))
        assert_refused(code, stdout, err, [name, "limit"], out)



# --- side files ------------------------------------------------------------------------------------------


def _expert_copy(tmp_path: Path) -> Path:
    expert = tmp_path / "expert"
    shutil.copytree(GOOD["expert"], expert)
    return expert


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "generation_config.json", "chat_template.jinja", "preprocessor_config.json"])
@pytest.mark.parametrize("kind", ["fifo", "device", "dangling", "folder"])
def test_a_side_file_that_is_not_a_regular_file_is_exit_2(tmp_path: Path, name: str, kind: str) -> None:
    """Never silently left out, never opened (a FIFO would block): refused before any work, naming it."""
    import os

    expert = _expert_copy(tmp_path)
    target = expert / name
    if target.exists():
        target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        target.symlink_to("/dev/null")
    elif kind == "dangling":
        target.symlink_to(expert / "gone.json")
    else:
        target.mkdir()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "layerswap_fast", *merge_args({**GOOD, "expert": expert}, out)],
                          capture_output=True, text=True, timeout=60)
    what = {"fifo": "a FIFO", "device": "a character device", "dangling": "a dangling symbolic link", "folder": "a folder"}[kind]
    assert_refused(proc.returncode, proc.stdout, proc.stderr, [str(target), what], out)


def test_a_bad_side_file_fails_its_expert_in_a_bulk_run(tmp_path: Path) -> None:
    import os

    from layerswap_fast import bulk

    expert = _expert_copy(tmp_path)
    (expert / "tokenizer_config.json").unlink()
    os.mkfifo(expert / "tokenizer_config.json")
    summary = bulk.bulk_merge(GOOD["base"], GOOD["safety"], [bulk.ExpertSpec("bad", expert), bulk.ExpertSpec("good", GOOD["expert"])],
                              tmp_path / "out")
    assert summary["experts"]["bad"]["status"] == "failed" and "a FIFO" in summary["experts"]["bad"]["error"]
    assert summary["experts"]["good"]["status"] == "ok" and not (tmp_path / "out" / "bad").exists()


def test_every_side_file_a_hugging_face_folder_needs_is_copied(tmp_path: Path) -> None:
    """Config, generation config, every tokenizer file, chat templates, processor configs and the
    Python files auto_map names (in config.json and tokenizer_config.json), byte for byte."""
    expert = _expert_copy(tmp_path)
    cfg = json.loads((expert / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM",
                       "AutoModel": "other-org/repo--modeling_y.YModel"}
    (expert / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((expert / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    (expert / "tokenizer_config.json").write_text(json.dumps(tok))
    extra = {"special_tokens_map.json": "{}", "added_tokens.json": "{}", "tokenizer.model": "spm", "vocab.json": "{}", "merges.txt": "#v\n",
             "chat_template.jinja": "{{ messages }}", "chat_template.json": '{"chat_template": "x"}',
             "preprocessor_config.json": '{"image_size": 336}', "processor_config.json": '{"patch_size": 14}',
             "configuration_x.py": "class XConfig: pass\n", "modeling_x.py": "class XForCausalLM: pass\n",
             "tokenization_x.py": "class XTokenizer: pass\n", "notes.md": "not a side file\n", "modeling_unnamed.py": "x = 1\n"}
    for name, text in extra.items():
        (expert / name).write_text(text)
    out = tmp_path / "out"
    lsf.merge(GOOD["base"], GOOD["safety"], expert, out)
    want = {p.name for p in expert.iterdir()} - {"model.safetensors", "notes.md", "modeling_unnamed.py"}
    got = {p.name for p in out.iterdir()} - {"model.safetensors", *REPORT_FILES}
    assert got == want, (sorted(got ^ want))
    for name in want:
        assert (out / name).read_bytes() == (expert / name).read_bytes(), name


@pytest.mark.parametrize("out_dtype, name", [("f32", "float32"), ("f16", "float16"), ("bf16", "bfloat16")])
def test_config_states_the_output_dtype(tmp_path: Path, out_dtype: str, name: str) -> None:
    expert = _expert_copy(tmp_path)
    cfg = json.loads((expert / "config.json").read_text())
    cfg.update(torch_dtype="bfloat16", dtype="bfloat16", text_config={"torch_dtype": "bfloat16", "hidden_size": 8})
    (expert / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    lsf.merge(GOOD["base"], GOOD["safety"], expert, out, out_dtype=out_dtype)
    got = json.loads((out / "config.json").read_text())
    assert (got["torch_dtype"], got["dtype"], got["text_config"]["torch_dtype"]) == (name, name, name)
    assert {k: v for k, v in got.items() if k not in ("torch_dtype", "dtype", "text_config")} == \
        {k: v for k, v in cfg.items() if k not in ("torch_dtype", "dtype", "text_config")}
    from models import read_model

    assert {d for d, _, _ in read_model(out / "model.safetensors").values()} == {out_dtype.upper()}


def test_single_file_expert_says_what_is_missing_and_config_from_supplies_it(tmp_path: Path) -> None:
    out = tmp_path / "bare"
    paths = {**GOOD, "expert": GOOD["expert"] / "model.safetensors"}
    code, stdout, err = run_cli(merge_args(paths, out)[:-1])
    assert code == 0, err
    assert "note:" in stdout and "no config.json and no tokenizer files" in stdout and "--config-from" in stdout, stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.safetensors", *REPORT_FILES])
    out2 = tmp_path / "with-config"
    code, stdout, err = run_cli(merge_args(paths, out2, "--config-from", str(GOOD["expert"])))
    assert code == 0, err
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out2 / name).read_bytes() == (GOOD["expert"] / name).read_bytes(), name
    assert json.loads((out2 / "layerswap_report.json").read_text())["inputs"]["config_from"] == str(GOOD["expert"])



def test_bulk_config_from_supplies_side_files_to_bare_file_experts(tmp_path: Path) -> None:
    """Bulk runs take --config-from (for every expert given as a bare .safetensors file) and the plan
    file's config_from (top level, or per expert); a folder expert keeps its own side files."""
    side = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
    bare = GOOD["expert"] / "model.safetensors"
    out = tmp_path / "cli"
    code, stdout, err = run_cli(["merge", "-q", "-b", str(GOOD["base"]), "-s", str(GOOD["safety"]), "-m", f"bare={bare}",
                                 "-m", f"folder={GOOD['safety']}", "-o", str(out), "--config-from", str(GOOD["expert"])])
    assert code == 0, err
    for name in side:
        assert (out / "bare" / name).read_bytes() == (GOOD["expert"] / name).read_bytes(), name
    assert json.loads((out / "bare" / "layerswap_report.json").read_text())["inputs"]["config_from"] == str(GOOD["expert"])
    assert (out / "folder" / "config.json").read_bytes() == (GOOD["safety"] / "config.json").read_bytes()
    assert "config_from" not in json.loads((out / "folder" / "layerswap_report.json").read_text())["inputs"]
    # The plan file: a top-level config_from for bare files, and an expert's own.
    own = tmp_path / "own-config"
    own.mkdir()
    (own / "config.json").write_text((GOOD["expert"] / "config.json").read_text())
    plan = tmp_path / "plan.toml"
    plan.write_text(f"""base = "{GOOD['base']}"\nsafety = "{GOOD['safety']}"\nout = "planned"\nconfig_from = "{GOOD['expert']}"\n"""
                    f"""[experts.a]\npath = "{bare}"\n[experts.b]\npath = "{bare}"\nconfig_from = "own-config"\n""")
    code, stdout, err = run_cli(["merge", "-q", "--plan", str(plan)])
    assert code == 0, err
    for name in side:
        assert (tmp_path / "planned" / "a" / name).read_bytes() == (GOOD["expert"] / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "planned" / "b").iterdir() if not p.name.startswith(("layerswap", "README", "model."))) \
        == ["config.json"]
    # With no bare-file expert, --config-from would do nothing: a usage error, not silence.
    code, stdout, err = run_cli(["merge", "-q", "-b", str(GOOD["base"]), "-s", str(GOOD["safety"]), "-m", f"x={GOOD['expert']}",
                                 "-o", str(tmp_path / "none"), "--config-from", str(GOOD["expert"])])
    assert code == 2 and "bare .safetensors" in err and not (tmp_path / "none").exists(), err

# --- numbers the tool must never invent --------------------------------------------------------------------


def test_allow_non_finite_lets_an_overflow_through(tmp_path: Path) -> None:
    from models import read_model

    case = next(c for c in CASES if c["name"] == "overflow_to_f16")
    out = tmp_path / "out"
    code, stdout, err = run_cli(merge_args(case_paths(case), out, "--allow-non-finite", *case["args"]))
    assert code == 0, err
    dtype, shape, raw = read_model(out / "model.safetensors")["model.norm.weight"]
    values = np.frombuffer(raw, "<f2")
    assert dtype == "F16" and np.isinf(values[1]) and np.isfinite(np.delete(values, 1)).all()


def test_widening_and_in_range_narrowing_are_not_refused(tmp_path: Path) -> None:
    for out_dtype in ("f32", "f16"):
        lsf.merge(GOOD["base"], GOOD["safety"], GOOD["expert"], tmp_path / out_dtype, out_dtype=out_dtype)


# --- Python API: wrong types name the parameter ----------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, fragment",
    [
        (dict(tau=True), lsf.InvalidOptionError, "tau"),
        (dict(alpha="0.5"), lsf.InvalidOptionError, "alpha"),
        (dict(threads=True), lsf.InvalidOptionError, "threads"),
        (dict(threads=2.5), lsf.InvalidOptionError, "threads"),
        (dict(max_memory=True), lsf.InvalidOptionError, "size"),
        (dict(shard_size=[1]), lsf.InvalidOptionError, "size"),
        (dict(allow_non_finite="no"), lsf.InvalidOptionError, "allow_non_finite"),
        (dict(granularity=["layer"]), lsf.InvalidOptionError, "granularity"),
        (dict(out_dtype=16), lsf.InvalidOptionError, "out_dtype"),
        (dict(force="no"), TypeError, "force"),
        (dict(force=1), TypeError, "force"),
        (dict(progress="bar"), TypeError, "progress"),
        (dict(options={"tau": 0.1}), TypeError, "options"),
        (dict(layout=3), TypeError, "layout"),
        (dict(config_from=b"folder"), TypeError, "config_from"),
        (dict(out=None), TypeError, "out"),
        (dict(expert=None), TypeError, "expert"),
        (dict(base=42), TypeError, "base"),
        (dict(safety=""), TypeError, "safety"),
        (dict(taus=0.1), TypeError, "taus"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_wrong_argument_types_name_the_parameter(tmp_path: Path, change: dict[str, Any], error: type, fragment: str) -> None:
    """A wrong type is never taken as something else (True as 1, "no" as true, None as the path
    "None"): TypeError or InvalidOptionError naming the parameter, and nothing is written."""
    args = {"base": GOOD["base"], "safety": GOOD["safety"], "expert": GOOD["expert"], "out": tmp_path / "out", **change}
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "layerswap_report.json").write_text("{}")
    if "force" in change:
        args["out"] = existing
    with pytest.raises(error, match=fragment):
        lsf.merge(**args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"] and not Path("None").exists()
    assert sorted(p.name for p in existing.iterdir()) == ["layerswap_report.json"]
    if not {"out", "force", "config_from"} & set(change):
        with pytest.raises(error, match=fragment):
            lsf.analyze(**{k: v for k, v in args.items() if k != "out"})


def test_wrong_types_in_bulk_and_verify_name_the_parameter(tmp_path: Path) -> None:
    from layerswap_fast import bulk

    with pytest.raises(TypeError, match="path of expert 'ko'"):
        bulk.ExpertSpec("ko", None)  # type: ignore[arg-type]
    with pytest.raises(lsf.InvalidOptionError, match="options must be MergeOptions"):
        bulk.ExpertSpec("ko", GOOD["expert"], {"tau": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="experts must be a list"):
        bulk.bulk_merge(GOOD["base"], GOOD["safety"], "ko", tmp_path / "o")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="force"):
        bulk.bulk_merge(GOOD["base"], GOOD["safety"], [bulk.ExpertSpec("ko", GOOD["expert"])], tmp_path / "o", force="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        lsf.inspect(None)  # type: ignore[arg-type]
    pytest.importorskip("torch")
    with pytest.raises(TypeError, match="out"):
        lsf.verify(None, GOOD["base"], GOOD["safety"], GOOD["expert"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="options"):
        lsf.verify(tmp_path, GOOD["base"], GOOD["safety"], GOOD["expert"], options="layer")  # type: ignore[arg-type]
    with pytest.raises(lsf.InvalidOptionError, match="max_ulp"):
        lsf.verify(tmp_path, GOOD["base"], GOOD["safety"], GOOD["expert"], max_ulp=True)
    assert list(tmp_path.iterdir()) == []


# --- TOML layouts without tomllib (Python 3.10) ------------------------------------------------------------


def test_toml_layouts_work_without_tomllib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every reader of a TOML layout falls back to tomli, as on Python 3.10."""
    tomli = pytest.importorskip("tomli")
    from layerswap_fast import reference

    layout = tmp_path / "layout.toml"
    llama = _llama_layout()
    layout.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in llama.items()) + "\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now fails, as on 3.10
    with pytest.raises(ImportError):
        import tomllib  # noqa: F401
    assert tomli.loads(layout.read_text())["layer"] == llama["layer"]
    info = lsf.inspect(GOOD["expert"], layout=layout)
    assert info["n_layers"] == 2
    assert reference.Patterns.from_layout(layout).layer == llama["layer"]
    plan = tmp_path / "plan.toml"
    plan.write_text(f'base = "{GOOD["base"]}"\nsafety = "{GOOD["safety"]}"\n[experts.ko]\npath = "{GOOD["expert"]}"\n')
    from layerswap_fast import bulk

    assert bulk.load_bulk_file(plan).experts[0].name == "ko"

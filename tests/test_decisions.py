"""Decision control: overrides, fixed bands, decisions files and the tau sweep.

Expected decisions come from this file's own reading of the grammar and of the band rule (written
from the issue's wording, not from ``layerswap_fast.decisions``), the measured ones from the numpy
computation in ``models.py``, and expected bytes from ``models.expected_bytes`` at each unit's alpha.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerswap_fast as lsf
from layerswap_fast import decisions, synth
from layerswap_fast.cli import main
from models import check_output, numpy_plan, read_model, unit_of

EIGHT = synth.LlamaConfig(n_layers=8, hidden=32, intermediate=64, heads=2, kv_heads=1, vocab=64)
SMALL = synth.LlamaConfig(n_layers=4, hidden=32, intermediate=48, heads=2, kv_heads=1, vocab=64)

Key = Any  # layer (int) or (layer, part), as models.numpy_plan keys units


# --- an independent reading of the grammar --------------------------------------------------------


def expand(units: str, n_layers: int, granularity: str) -> list[Key]:
    """UNITS -> unit keys, read from the issue's list of forms."""
    layers_text, _, part_text = units.partition(".")
    parts = {"attn": ["attention"], "mlp": ["mlp"], "": ["attention", "mlp"]}[part_text]
    if layers_text == "*":
        layers = list(range(n_layers))
    elif "-" in layers_text:
        a, b = layers_text.split("-")
        layers = list(range(int(a), int(b) + 1))
    else:
        layers = [int(layers_text)]
    if granularity == "layer":
        return layers
    return [(i, p) for i in layers for p in parts]


def decision_of(text: str, run_alpha: float) -> tuple[str, Optional[float]]:
    if text.startswith("blend"):
        return "blend", float(text[6:]) if ":" in text else run_alpha
    return text, None


def expected_units(paths: dict[str, Path], granularity: str, overrides: list[tuple[str, str]], alpha: float = 0.5,
                   bands: Optional[tuple[int, int, int]] = None, tau: float = 0.001) -> dict[Key, tuple[str, Optional[float], str]]:
    """unit -> (decision, alpha when a blend, source) for a merge with these controls."""
    measured = numpy_plan(paths["base"], paths["safety"], paths["expert"], granularity, tau=tau)
    out: dict[Key, tuple[str, Optional[float], str]] = {}
    for key, r in measured.items():
        out[key] = (r["decision"], alpha if r["decision"] == "blend" else None, "measured")
    if bands is not None:
        out.update(band_units(len(measured), *bands))
    n_layers = len(measured) if granularity == "layer" else len(measured) // 2
    for units, decision in overrides:
        d, a = decision_of(decision, alpha)
        for key in expand(units, n_layers, granularity):
            out[key] = (d, a, "override")
    return out


def band_units(n_layers: int, bottom: int, top: int, t: int) -> dict[int, tuple[str, Optional[float], str]]:
    """The issue's band rule, layer by layer: M outside, S in the middle, T blends at each inner edge
    with alpha_j = j / (T + 1) at the j-th layer into the band."""
    out = {i: ("safety", None, "band") for i in range(n_layers)}
    for i in list(range(bottom)) + list(range(n_layers - top, n_layers)):
        out[i] = ("expert", None, "band")
    for j in range(1, t + 1):
        out[bottom + j - 1] = ("blend", j / (t + 1), "band")
        out[n_layers - top - j] = ("blend", j / (t + 1), "band")
    return out


def expectation(want: dict[Key, tuple[str, Optional[float], str]], granularity: str, alpha: float = 0.5) -> dict[str, Any]:
    """``units`` and ``source`` for ``models.check_output``: every unit's decision, alpha and source as
    ``want`` says; every tensor's bytes from its unit's decision and alpha (outside the layers a blend
    at the run's ``alpha``, a layer's own norms from the language expert)."""

    def source(name: str) -> tuple[str, float]:
        unit = unit_of(name, granularity)
        if unit == "outside":
            return "blend", alpha
        if unit == "norm":
            return "expert", alpha
        decision, a_unit, _ = want[unit]
        return decision, alpha if a_unit is None else a_unit

    return {"units": {k: {"decision": d, "alpha": a, "source": src} for k, (d, a, src) in want.items()}, "source": source}


@pytest.fixture(scope="module")
def eight(make_trio: Any) -> dict[str, Path]:
    return make_trio(config=EIGHT)


# --- grammar, without models ----------------------------------------------------------------------


units_text = st.one_of(
    st.integers(0, 11).map(str),
    st.tuples(st.integers(0, 11), st.integers(0, 11)).map(lambda ab: f"{min(ab)}-{max(ab)}"),
    st.tuples(st.integers(0, 11), st.sampled_from(["attn", "mlp"])).map(lambda x: f"{x[0]}.{x[1]}"),
    st.tuples(st.integers(0, 11), st.integers(0, 11), st.sampled_from(["attn", "mlp"])).map(lambda x: f"{min(x[:2])}-{max(x[:2])}.{x[2]}"),
    st.sampled_from(["*.attn", "*.mlp"]),
)
decision_text = st.one_of(st.sampled_from(["safety", "expert", "blend"]), st.sampled_from([0.0, 0.25, 0.3, 1.0, 0.125]).map(lambda a: f"blend:{a}"))


@settings(deadline=None)
@given(n_layers=st.integers(1, 12), granularity=st.sampled_from(["layer", "module"]),
       overrides=st.lists(st.tuples(units_text, decision_text), max_size=6), alpha=st.sampled_from([0.5, 0.3]))
def test_any_overrides_apply_as_the_grammar_says_or_name_the_missing_unit(n_layers, granularity, overrides, alpha):
    keys = [(i, None) for i in range(n_layers)] if granularity == "layer" else [(i, p) for i in range(n_layers) for p in ("attention", "mlp")]
    units = [{"layer": k[0], "part": k[1], "d": 0.0, "decision": "expert"} for k in keys]
    missing = None
    for u, _ in overrides:
        if granularity == "layer" and "." in u:
            missing = missing or u
        elif u[0] != "*" and max(int(x) for x in re.findall(r"\d+", u)) >= n_layers:
            missing = missing or u
    if missing:
        with pytest.raises(lsf.InvalidOptionError, match=re.escape(f"override '{missing}=")):
            decisions.apply(units, n_layers=n_layers, granularity=granularity, alpha=alpha, overrides=overrides)
        return
    out = decisions.apply(units, n_layers=n_layers, granularity=granularity, alpha=alpha, overrides=overrides)
    want = {k: ("expert", None, "measured") for k in keys}
    for u, d in overrides:  # later wins
        dec, a = decision_of(d, alpha)
        for k in expand(u, n_layers, granularity):
            want[k if granularity == "module" else (k, None)] = (dec, a, "override")
    assert {(u["layer"], u["part"]): (u["decision"], u["alpha"], u["source"]) for u in out} == want


@pytest.mark.parametrize("text", ["", "x=safety", "3", "3=", "3=save", "3=blend:", "3=blend:1.5", "3=blend:-0.1", "3=blend:nan",
                                  "5-2=safety", "*=safety", "3.ffn=expert", "3.attn.mlp=safety", "-1=safety", "1--2=expert"])
def test_malformed_overrides_are_refused(text):
    with pytest.raises(lsf.InvalidOptionError):
        lsf.MergeOptions(overrides=[text])


def test_override_forms_in_the_api():
    a = lsf.MergeOptions(overrides={"3": "safety", "2.mlp": "blend:0.25"})
    b = lsf.MergeOptions(overrides=["3=safety", "2.mlp=blend:0.25"])
    c = lsf.MergeOptions(overrides=[("3", "safety"), ("2.mlp", "blend:0.25")])
    assert a.overrides == b.overrides == c.overrides == (("3", "safety"), ("2.mlp", "blend:0.25"))


def test_bands_example_from_the_issue():
    got = decisions.band_choices(8, (2, 2, 1))
    assert [(c.decision, c.alpha) for c in got] == [("expert", None)] * 2 + [("blend", 0.5)] + [("safety", None)] * 2 + [("blend", 0.5)] + [("expert", None)] * 2


@given(n=st.integers(1, 40), bottom=st.integers(0, 12), top=st.integers(0, 12), t=st.integers(0, 8))
def test_bands_follow_the_rule_or_say_they_do_not_fit(n, bottom, top, t):
    if n - bottom - top < max(1, 2 * t):
        with pytest.raises(lsf.InvalidOptionError, match="do not fit"):
            decisions.band_choices(n, (bottom, top, t))
        return
    got = {i: (c.decision, c.alpha, "band") for i, c in enumerate(decisions.band_choices(n, (bottom, top, t)))}
    assert got == band_units(n, bottom, top, t)


@pytest.mark.parametrize("bad", [dict(select="bands"), dict(bands="2,2"), dict(select="bands", bands="2,x"),
                                 dict(select="bands", bands="2,2,1,1"), dict(select="bands", bands="-1,2"),
                                 dict(select="bands", bands="2,2", granularity="module"), dict(select="band")])
def test_bad_band_options_are_refused(bad):
    with pytest.raises(lsf.InvalidOptionError):
        lsf.MergeOptions(**bad)


@pytest.mark.parametrize("text,taus", [("0:0.01:3", [0, 0.005, 0.01]), ("0.5:0.5:1", [0.5]), ("0:1:2", [0, 1])])
def test_sweep_values(text, taus):
    assert decisions.parse_sweep(text) == pytest.approx(taus)


# --- merges: bytes follow each override, band and file ------------------------------------------------


@pytest.mark.parametrize("granularity,overrides", [
    ("layer", [("3", "safety"), ("2", "blend:0.25"), ("6-7", "expert"), ("7", "blend")]),
    ("module", [("*.mlp", "safety"), ("1.attn", "blend:0.3"), ("5-6.mlp", "blend:0.125"), ("4", "expert"), ("0", "blend")]),
])
def test_merge_follows_overrides(eight, merge_checked, tmp_path, granularity, overrides):
    merge_checked(eight, tmp_path / "out", granularity=granularity, overrides=[f"{u}={d}" for u, d in overrides],
                  **expectation(expected_units(eight, granularity, overrides), granularity))
    assert json.loads((tmp_path / "out" / "layerswap_report.json").read_text())["parameters"]["overrides"] == [list(o) for o in overrides]


@pytest.mark.parametrize("bands", [(2, 2, 1), (1, 2, 2), (3, 3, 0), (0, 0, 3)])
def test_merge_follows_bands(eight, merge_checked, tmp_path, bands):
    want = expected_units(eight, "layer", [], alpha=0.3, bands=bands)
    merge_checked(eight, tmp_path / "out", select="bands", bands=bands, alpha=0.3, **expectation(want, "layer", alpha=0.3))


def test_bands_then_overrides(eight, merge_checked, tmp_path):
    overrides = [("4", "blend:0.75"), ("0", "safety")]
    merge_checked(eight, tmp_path / "out", select="bands", bands="2,2,1", overrides=[f"{u}={d}" for u, d in overrides],
                  **expectation(expected_units(eight, "layer", overrides, bands=(2, 2, 1)), "layer"))


def run(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_review_edit_merge_without_the_base(eight, tmp_path):
    r = run("analyze", "-b", eight["base"], "-s", eight["safety"], "-m", eight["expert"], "-g", "module", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    edits = {(1, "mlp"): ("safety", None), (2, "attention"): ("blend", 0.2), (6, "mlp"): ("blend", None)}
    for u in plan["units"]:
        if (u["layer"], u["part"]) in edits:
            u["decision"], u["alpha"] = edits[(u["layer"], u["part"])]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "out"
    r = run("merge", "-s", eight["safety"], "-m", eight["expert"], "-o", out, "--decisions", tmp_path / "plan.json",
            "--override", "7.attn=expert", "--alpha", "0.4")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "layerswap_report.json").read_text())
    measured = numpy_plan(eight["base"], eight["safety"], eight["expert"], "module")
    want = {k: (m["decision"], 0.5 if m["decision"] == "blend" else None, "file") for k, m in measured.items()}
    want.update({k: (d, 0.4 if a is None and d == "blend" else a, "file") for k, (d, a) in edits.items()})
    want[(7, "attention")] = ("expert", None, "override")
    check_output(eight, out, report, **expectation(want, "module", alpha=0.4))
    assert report["inputs"]["base"] is None
    # verify checks a file merge without the base as well, and catches a different file.
    r = run("verify", out, "-s", eight["safety"], "-m", eight["expert"], "--decisions", tmp_path / "plan.json",
            "--override", "7.attn=expert", "--alpha", "0.4")
    assert r.exit_code == 0, r.output
    r = run("verify", out, "-s", eight["safety"], "-m", eight["expert"], "--decisions", tmp_path / "plan.json", "--alpha", "0.4")
    assert r.exit_code == 1 and "layer 7 attention" in r.output


def test_verify_catches_a_merge_made_with_other_overrides(eight, tmp_path):
    out = tmp_path / "out"
    lsf.merge(eight["base"], eight["safety"], eight["expert"], out, overrides={"3": "blend:0.25"})
    ok = lsf.verify(out, eight["base"], eight["safety"], eight["expert"], overrides={"3": "blend:0.25"})
    assert ok.ok and [u.source for u in ok.units].count("override") == 1
    bad = lsf.verify(out, eight["base"], eight["safety"], eight["expert"], overrides={"3": "blend:0.5"})
    assert not bad.ok and any("layer 3" in m for m in bad.mismatches())


# --- bad specs: exit 2, one line ------------------------------------------------------------------------


@pytest.mark.parametrize("args,says", [
    (["--override", "9=safety"], "layer 9 does not exist"),
    (["--override", "6-9=safety"], "layer 8 does not exist"),
    (["--override", "3.mlp=safety"], "3.mlp does not exist in layer granularity"),
    (["--override", "3=maybe"], "override '3=maybe'"),
    (["--override", "3"], "UNITS=DECISION"),
    (["--select", "bands", "--bands", "4,4,1"], "do not fit"),
    (["--select", "bands"], "needs bands"),
    (["--bands", "2,2"], "--select bands"),
    (["--select", "bands", "--bands", "2,2", "-g", "module"], "layer granularity"),
    (["--sweep-tau", "1:0:3"], "sweep '1:0:3'"),
    (["--sweep-tau", "0:1:0"], "N must be"),
])
def test_bad_specs_exit_2_with_one_line(eight, args, says):
    r = run("analyze", "-b", eight["base"], "-s", eight["safety"], "-m", eight["expert"], *args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], r.output


def test_bad_decisions_files_exit_2_with_one_line(eight, make_trio, tmp_path):
    r = run("analyze", "-b", eight["base"], "-s", eight["safety"], "-m", eight["expert"], "--json")
    plan = json.loads(r.output)
    small = make_trio(config=SMALL)
    cases = {
        "short": {**plan, "units": plan["units"][:-1]},
        "decision": {**plan, "units": [{**u, "decision": "maybe"} if u["layer"] == 2 else u for u in plan["units"]]},
        "alpha": {**plan, "units": [{**u, "decision": "blend", "alpha": 2} if u["layer"] == 2 else u for u in plan["units"]]},
        "layout": {**plan, "layout": "gpt2"},
        "granularity": {**plan, "options": {**plan["options"], "granularity": "module"}},
    }
    for name, data in cases.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(data))
        r = run("merge", "-s", eight["safety"], "-m", eight["expert"], "-o", tmp_path / name, "--decisions", f)
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and str(f) in r.output, (name, r.output)
        assert not (tmp_path / name).exists()
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    r = run("merge", "-s", small["safety"], "-m", small["expert"], "-o", tmp_path / "small", "--decisions", tmp_path / "plan.json")
    assert r.exit_code == 2 and "8-layer" in r.output and "4-layer" in r.output, r.output
    r = run("merge", "-s", eight["safety"], "-m", eight["expert"], "-o", tmp_path / "g", "--decisions", tmp_path / "plan.json", "-g", "module")
    assert r.exit_code == 2 and "granularity" in r.output, r.output
    (tmp_path / "junk.json").write_text("{")
    r = run("merge", "-s", eight["safety"], "-m", eight["expert"], "-o", tmp_path / "j", "--decisions", tmp_path / "junk.json")
    assert r.exit_code == 2 and "junk.json" in r.output, r.output


# --- the tau sweep --------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_sweep_counts_equal_numpy_at_each_tau(make_trio, granularity):
    paths = make_trio(config=EIGHT, planting=synth.Planting(safety_layers=(3, 5, 6, 7), expert_layers=(0, 1, 2, 6), strong=0.06, weak=0.03,
                                                          safety_attention_layers=(1, 4)))
    r = run("analyze", "-b", paths["base"], "-s", paths["safety"], "-m", paths["expert"], "-g", granularity,
            "--sweep-tau", "0:0.04:21", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    d = np.array([u["d"] for u in numpy_plan(paths["base"], paths["safety"], paths["expert"], granularity).values()])
    assert [row["tau"] for row in rows] == pytest.approx(np.linspace(0, 0.04, 21))
    for row in rows:
        t = row["tau"]
        want = {"safety": int((d > t).sum()), "expert": int((d < -t).sum()), "blend": int((np.abs(d) <= t).sum())}
        assert row["counts"] == want, t
    assert len({json.dumps(row["counts"]) for row in rows}) > 2, "the sweep should move the decisions"
    table = run("analyze", "-b", paths["base"], "-s", paths["safety"], "-m", paths["expert"], "-g", granularity, "--sweep-tau", "0:0.04:3")
    for value in np.abs(d):
        assert f"{value:.6g}" in table.output


# --- bulk plan files ------------------------------------------------------------------------------------


def test_bulk_plan_file_takes_overrides_and_bands_per_expert(eight, tmp_path):
    plan = tmp_path / "experts.toml"
    plan.write_text(f"""
base = "{eight['base']}"
safety = "{eight['safety']}"
out = "{tmp_path / 'out'}"
[experts.ko]
path = "{eight['expert']}"
overrides = {{ "3" = "safety", "2" = "blend:0.25" }}
[experts.sw]
path = "{eight['expert']}"
select = "bands"
bands = [2, 2, 1]
""")
    r = run("merge", "--plan", plan, "-q")
    assert r.exit_code == 0, r.output
    for name, want in (("ko", expected_units(eight, "layer", [("3", "safety"), ("2", "blend:0.25")])),
                       ("sw", expected_units(eight, "layer", [], bands=(2, 2, 1)))):
        out = tmp_path / "out" / name
        check_output(eight, out, json.loads((out / "layerswap_report.json").read_text()), **expectation(want, "layer"))


# --- conformance with the torch reference under any overrides -----------------------------------------


@settings(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(granularity=st.sampled_from(["layer", "module"]), overrides=st.lists(st.tuples(units_text, decision_text), max_size=5),
       alpha=st.sampled_from([0.5, 0.3]), dtype=st.sampled_from(["bf16", "f16", "f32"]))
def test_any_overrides_equal_the_reference_with_the_same_decisions(make_trio, tmp_path_factory, granularity, overrides, alpha, dtype):
    torch = pytest.importorskip("torch")
    from layerswap_fast import reference

    paths = make_trio(config=SMALL, dtype=dtype)
    n = SMALL.n_layers
    overrides = [(u, d) for u, d in overrides
                 if (u[0] == "*" or max(int(x) for x in re.findall(r"\d+", u)) < n) and (granularity == "module" or "." not in u)]
    out = tmp_path_factory.mktemp("ovr") / "out"
    lsf.merge(paths["base"], paths["safety"], paths["expert"], out, granularity=granularity, alpha=alpha,
              overrides=[f"{u}={d}" for u, d in overrides])
    want = expected_units(paths, granularity, overrides, alpha=alpha)
    decided = {((k, None) if isinstance(k, int) else k): v for k, v in want.items()}
    ref_file = out.parent / "ref.safetensors"
    reference.merge(paths["base"], paths["safety"], paths["expert"], ref_file, granularity=granularity, alpha=alpha, decided=decided)
    from safetensors.torch import load_file

    ref, got = load_file(str(ref_file)), read_model(out)
    assert set(ref) == set(got)
    for name, t in ref.items():
        assert got[name][2] == t.contiguous().view(torch.uint8).numpy().tobytes(), name


def test_decision_control_refuses_an_adapter_output(eight, tmp_path):
    for controls in (dict(overrides={"3": "safety"}), dict(select="bands", bands="2,2,1")):
        with pytest.raises(lsf.InvalidOptionError, match="emit='adapter'"):
            lsf.merge(eight["base"], eight["safety"], eight["expert"], tmp_path / "out", emit="adapter", **controls)
    assert not (tmp_path / "out").exists()


def test_report_draws_the_sweep_figure(make_trio: Any, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = make_trio(config=EIGHT, planting=synth.Planting(safety_layers=(3, 5, 6, 7), expert_layers=(0, 1, 2, 6), strong=0.06, weak=0.03,
                                                          safety_attention_layers=(1, 4)))
    r = run("analyze", "-b", paths["base"], "-s", paths["safety"], "-m", paths["expert"], "--sweep-tau", "0:0.04:21", "--json")
    assert r.exit_code == 0, r.output
    (tmp_path / "sweep.json").write_text(r.output)
    r = run("report", tmp_path / "sweep.json", "-o", tmp_path / "sweep.png")
    assert r.exit_code == 0, r.output
    import matplotlib.image

    img = matplotlib.image.imread(str(tmp_path / "sweep.png"))
    assert img.shape[0] > 100 and img.shape[1] > 100 and float(img[..., :3].std()) > 0.05
    (tmp_path / "bad.json").write_text(json.dumps([{"tau": 0.1, "counts": {"safety": 1}}]))
    r = run("report", tmp_path / "bad.json", "-o", tmp_path / "bad.png")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    r = run("report", tmp_path / "sweep.json")
    assert r.exit_code == 2 and "-o" in r.output, r.output

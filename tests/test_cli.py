"""The command line: help that teaches, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from layerswap_fast import synth
from layerswap_fast.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_help_lists_commands_and_teaches():
    r = run("--help")
    assert r.exit_code == 0
    for word in ("analyze", "merge", "inspect", "demo", "Layer-wise swapping"):
        assert word in r.output
    r = run("merge", "--help")
    for opt in ("-b, --base", "-s, --safety", "-m, --expert", "-o, --out", "--granularity", "--tau", "--alpha", "--out-dtype",
                "--max-memory", "--threads", "--shard-size", "--force", "--numerics"):
        assert opt in r.output, opt


def test_analyze_table_and_json(trio):
    r = run("analyze", "-b", str(trio["base"]), "-s", str(trio["safety"]), "-m", str(trio["expert"]))
    assert r.exit_code == 0, r.output
    assert "layer 3" in r.output and "safety" in r.output and "p_safety" in r.output
    r = run("analyze", "-b", str(trio["base"]), "-s", str(trio["safety"]), "-m", str(trio["expert"]), "--json", "-g", "module")
    plan = json.loads(r.output)
    assert len(plan["units"]) == 8 and plan["options"]["granularity"] == "module"


def test_merge_prints_summary(trio, tmp_path):
    r = run("merge", "-b", str(trio["base"]), "-s", str(trio["safety"]), "-m", str(trio["expert"]), "-o", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    assert "units: 2 safety, 2 expert, 0 blend" in r.output and "peak memory" in r.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tau", "-1"], "tau must be"),
        (["--alpha", "1.5"], "alpha must be between 0 and 1"),
        (["--threads", "0"], "threads must be at least 1"),
        (["--max-memory", "1MiB"], "too small"),
        (["--max-memory", "lots"], "is not a size"),
    ],
)
def test_bad_options_are_one_line_exit_2(trio, tmp_path, extra, message):
    r = run("merge", "-b", str(trio["base"]), "-s", str(trio["safety"]), "-m", str(trio["expert"]), "-o", str(tmp_path / "o"), *extra)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_missing_input_names_the_path(trio, tmp_path):
    r = run("merge", "-b", str(tmp_path / "nope"), "-s", str(trio["safety"]), "-m", str(trio["expert"]), "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and str(tmp_path / "nope") in r.output


def test_demo_runs_and_reruns_but_spares_other_folders(tmp_path):
    for _ in range(2):
        r = run("demo", str(tmp_path / "d"), "--layers", "4")
        assert r.exit_code == 0, r.output
        assert "layer 3" in r.output and (tmp_path / "d" / "merged" / "model.safetensors").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = run("demo", str(tmp_path / "mine"), "--layers", "4")
    assert r.exit_code == 2 and "earlier demo" in r.output
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_console_script_entry_point(trio):
    r = subprocess.run([sys.executable, "-m", "layerswap_fast", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "layerswap-fast" in r.stdout


def test_output_under_a_file_is_a_user_error(trio, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("merge", "-b", str(trio["base"]), "-s", str(trio["safety"]), "-m", str(trio["expert"]), "-o", str(blocker / "out"))
    assert r.exit_code == 2, r.output
    assert str(blocker) in r.output and "Traceback" not in r.output


def test_first_progress_update_shows_no_invented_rate(monkeypatch):
    """The first update of a phase may already count bytes done before it: no rate until the phase has
    run long enough, then the rate of what was done since."""
    import io

    from layerswap_fast import progress as progress_mod

    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: clock[0])
    stream = io.StringIO()
    bar = progress_mod.ProgressBar(stream=stream, enabled=True)
    bar("write", 10 << 30, 20 << 30)
    assert "/s" not in stream.getvalue(), stream.getvalue()
    clock[0] += 2.0
    bar("write", 12 << 30, 20 << 30)
    assert stream.getvalue().rstrip("\x1b[K").endswith("1.0 GiB/s"), stream.getvalue()


def test_one_layer_is_singular_and_demo_prints_units_once(tmp_path):
    paths = synth.make_trio(tmp_path / "one", synth.LlamaConfig(n_layers=1))
    r = run("inspect", str(paths["expert"]))
    assert r.exit_code == 0 and "1 layer," in r.output and "1 layers" not in r.output, r.output
    r = run("analyze", "-b", str(paths["base"]), "-s", str(paths["safety"]), "-m", str(paths["expert"]))
    assert r.exit_code == 0 and "1 layer," in r.output and "1 layers" not in r.output, r.output
    r = run("demo", str(tmp_path / "d"), "--layers", "2")
    assert r.exit_code == 0, r.output
    assert sum(line.startswith("units:") for line in r.output.splitlines()) == 1, r.output


def test_readme_documents_every_option_and_links_nothing_outside_the_repository():
    """The README's option table names every option of analyze, merge and verify, states the official
    defaults the code has, and links no file outside the repository."""
    import re
    from pathlib import Path

    from layerswap_fast.cli import analyze, merge, verify

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "../shared" not in readme
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| `"))
    documented = set(re.findall(r"`(?:-\w, )?(--[a-z-]+)", table))
    # Options documented elsewhere in the README (commands table, bulk section) are listed here.
    elsewhere = {"--json", "--save-stats", "--compare-numerics", "--plan", "--executor", "--stats", "--quiet", "--help",
                 "--base", "--safety", "--expert", "--out"}
    for command in (analyze, merge, verify):
        for p in command.params:
            for flag in p.opts:
                if flag.startswith("--") and flag not in elsewhere:
                    assert flag in documented, f"{command.name} {flag} is not in the README's option table"
                    assert flag in readme
    row = lambda flag: next(line for line in table.splitlines() if f"`{flag}" in line)  # noqa: E731
    assert "bf16 with `--numerics official`" in row("--out-dtype") and "base with `--numerics official`" in row("--tokenizer-from")
    from layerswap_fast.options import MergeOptions

    official = MergeOptions(numerics="official")
    assert (official.effective_out_dtype, official.effective_tokenizer_from) == ("bf16", "base")
    assert "JSON or TOML" in row("--layout")
    layout_help = next(p.help for p in merge.params if p.name == "layout")
    assert "TOML" in layout_help


def test_progress_rate_restarts_with_each_pass_of_a_phase(monkeypatch):
    """A bulk run repeats the write phase once per expert: the rate restarts, never negative."""
    import io

    from layerswap_fast import progress as progress_mod

    clock = [0.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: clock[0])
    stream = io.StringIO()
    bar = progress_mod.ProgressBar(stream=stream, enabled=True)
    bar("write", 0, 4 << 30)
    clock[0] += 1.0
    bar("write", 4 << 30, 4 << 30)
    bar("write", 0, 4 << 30)  # the next expert
    clock[0] += 1.0
    bar("write", 1 << 30, 4 << 30)
    assert stream.getvalue().rstrip("\x1b[K").endswith(" 1.0 GiB/s") and "-" not in stream.getvalue().split("GiB/4.0 GiB")[-1]

"""Shared fixtures: synthetic Hugging Face trios built on the fly (no hub), cached per session; the one
merge-then-check fixture; the CLI helpers every CLI test uses."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import pytest
from click.testing import CliRunner
from hypothesis import settings

import layerswap_fast as lsf
from layerswap_fast import cli, synth
from models import check_output

# Every merge any test makes is also checked by `verify` against the torch reference (needs torch).
pytest_plugins = ["verify_all"]

settings.register_profile("ci", max_examples=40, deadline=None)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# The hostile-input corpus and its one good trio (tests/hostile/make_corpus.py writes both).
HOSTILE = Path(__file__).parent / "hostile"
GOOD = {r: HOSTILE / "good" / r for r in ("base", "safety", "expert")}


@pytest.fixture
def trio_copy(tmp_path: Path) -> dict[str, Path]:
    """The good trio copied under tmp_path/models (so that its parent can be offered as output, and
    its files overwritten by a test that must show they were not)."""
    paths = {}
    for role, p in GOOD.items():
        paths[role] = tmp_path / "models" / role
        shutil.copytree(p, paths[role])
    return paths


@pytest.fixture(scope="session")
def make_trio(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Path]]:
    """``make_trio(config=..., dtype=..., planting=..., shard_bytes=...)`` -> paths, cached by arguments."""
    cache: dict[str, dict[str, Path]] = {}

    def make(**kwargs: object) -> dict[str, Path]:
        key = hashlib.sha1(repr(sorted(kwargs.items(), key=lambda kv: kv[0])).encode()).hexdigest()[:12]
        if key not in cache:
            cache[key] = synth.make_trio(tmp_path_factory.mktemp(f"trio-{key}"), **kwargs)  # type: ignore[arg-type]
        return cache[key]

    return make


@pytest.fixture(scope="session")
def trio(make_trio: Callable[..., dict[str, Path]]) -> dict[str, Path]:
    """The default 4-layer bf16 trio, single-file shards."""
    return make_trio()


#: Files a merge writes about itself (they name paths, thread counts and timings, so two runs differ).
REPORT_FILES = ("layerswap_report.json", "layerswap_report.html", "README.md")


def model_digest(path: Path) -> dict[str, str]:
    """tree_digest of an output folder without its report, report page and model card."""
    return {k: v for k, v in tree_digest(path).items() if k not in REPORT_FILES}


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file below path (to prove inputs are never modified)."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --- merge, then check ---------------------------------------------------------------------------------

#: The options of a merge that verify needs to recompute it.
METHOD_OPTIONS = ("granularity", "tau", "alpha", "numerics", "outside", "norms", "out_dtype")


class Checked(NamedTuple):
    report: dict[str, Any]
    verified: Optional["lsf.VerifyResult"]


@pytest.fixture(scope="session")
def merge_checked() -> Callable[..., Checked]:
    """``merge_checked(paths, out, units=..., source=..., verify=False, **options)``: merges B, S and M of
    ``paths`` into ``out`` with ``lsf.merge(**options)``, proves the inputs unchanged, then checks the
    output against numpy (:func:`models.check_output` with ``units`` and ``source``) and/or against the
    torch reference (``verify``: ``lsf.verify`` with the same method options, which must pass). Returns
    the report and the verify result. Session-scoped, so hypothesis tests can use it too."""

    def run(paths: dict[str, Path], out: Path, *, units: Optional[dict[Any, dict[str, Any]]] = None,
            source: Optional[Callable[[str], tuple[str, float]]] = None, verify: bool = False, **options: Any) -> Checked:
        assert (units is None) == (source is None), "give both units and source, or neither"
        assert units is not None or verify, "nothing to check"
        before = {r: tree_digest(p) for r, p in paths.items()}
        report = lsf.merge(paths["base"], paths["safety"], paths["expert"], out, **options)
        assert {r: tree_digest(p) for r, p in paths.items()} == before, "inputs were modified"
        if units is not None and source is not None:
            check_output(paths, out, report, units, source, out_dtype=options.get("out_dtype"))
        result = None
        if verify:
            method = {k: v for k, v in options.items() if k in METHOD_OPTIONS}
            result = lsf.verify(out, paths["base"], paths["safety"], paths["expert"], **method)
            assert result.ok, result.summary()
        return Checked(report, result)

    return run


# --- the CLI ---------------------------------------------------------------------------------------------


def merge_args(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """``layerswap-fast merge`` of the trio ``paths`` into ``out``, quiet, then ``extra``."""
    return ["merge", "-b", str(paths["base"]), "-s", str(paths["safety"]), "-m", str(paths["expert"]), "-o", str(out), "-q", *extra]


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """The CLI in-process (fast): exit status, stdout, stderr. An exception other than SystemExit is a
    traceback the user would have seen, so it fails the test."""
    result = CliRunner().invoke(cli.main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}") from result.exception
    return result.exit_code, result.stdout, result.stderr

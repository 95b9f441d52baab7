"""Shared fixtures: synthetic Hugging Face trios built on the fly (no hub), cached per session."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import settings

from layerswap_fast import synth

# Every merge any test makes is also checked by `verify` against the torch reference (needs torch).
pytest_plugins = ["verify_all"]

settings.register_profile("ci", max_examples=40, deadline=None)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


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

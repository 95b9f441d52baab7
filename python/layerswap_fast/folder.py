"""Hugging Face folders around the engine: which side files a model has, and the staged output folder
that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from layerswap_fast.errors import InvalidModelError, InvalidOptionError, OutputExistsError

#: Files copied from the host (language expert) model: its configuration.
CONFIG_FILES = ("config.json", "generation_config.json")
#: Tokenizer files copied from whichever model ``tokenizer_from`` names.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
REPORT_FILE = "layerswap_report.json"
#: Largest config.json read (real ones are a few kilobytes).
MAX_CONFIG_BYTES = 16 << 20


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file (a layout definition or a bulk file), with tomllib, or tomli before Python 3.11."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    try:
        return tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise InvalidOptionError(f"{path}: not valid TOML ({e})") from None


def model_dir(path: Path) -> Optional[Path]:
    """The folder holding a model's side files (None for a bare .safetensors file outside a folder)."""
    return path if path.is_dir() else None


def read_config(path: Path) -> Optional[dict[str, Any]]:
    """config.json of a model folder, if there is one."""
    folder = model_dir(path)
    if folder is None or not (folder / "config.json").is_file():
        return None
    size = (folder / "config.json").stat().st_size
    if size > MAX_CONFIG_BYTES:  # a hostile (e.g. sparse) file must not be read into memory whole
        raise InvalidModelError(f"{folder / 'config.json'}: {size} bytes is not a config (limit {MAX_CONFIG_BYTES})")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InvalidModelError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise InvalidModelError(f"{folder / 'config.json'}: must be a JSON object, not {type(cfg).__name__}")
    return cfg


def architecture(path: Path) -> Optional[str]:
    """config.json ``architectures[0]``, if present."""
    cfg = read_config(path) or {}
    archs = cfg.get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def copy_side_files(dest: Path, host: Path, tokenizer_source: Path) -> list[str]:
    """Copies config files from the host and tokenizer files from ``tokenizer_source``."""
    copied = []
    for src_model, names in ((host, CONFIG_FILES), (tokenizer_source, TOKENIZER_FILES)):
        folder = model_dir(src_model)
        if folder is None:
            continue
        for name in names:
            if (folder / name).is_file():
                try:
                    shutil.copyfile(folder / name, dest / name)
                except OSError as e:
                    # Name the file being written (a full disk is about the output, not the source).
                    raise OSError(e.errno, e.strerror, str(dest / name)) from None
                copied.append(name)
    return copied


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies inside b."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_output(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuses an output that exists (without force) or that overlaps an input."""
    out_r = out.resolve()
    for p in inputs:
        p_r = p.resolve()
        if _inside(out_r, p_r) or _inside(p_r, out_r):
            raise OutputExistsError(f"{out}: output overlaps the input {p}; choose a folder outside the inputs")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out}: output already exists (use --force to replace it)")
        if not out.is_dir():
            raise OutputExistsError(f"{out}: exists and is not a folder; refusing to replace it")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_stage(out: Path) -> Path:
    """A fresh, empty staging folder beside ``out`` (same filesystem, so publishing is one rename)."""
    out = Path(out)
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))


def commit_stage(stage: Path, out: Path, force: bool) -> None:
    """Syncs every file of ``stage`` to disk, then renames it to ``out`` (replacing an existing ``out``
    only when ``force``). Until the rename nothing is visible at ``out``."""
    out = Path(out)
    parent = out.absolute().parent
    for f in stage.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(stage)
    old = None
    if out.exists():
        if not force:
            raise OutputExistsError(f"{out}: output appeared during the run; refusing to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
        os.replace(out, old / out.name)
    os.replace(stage, out)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard_stage(stage: Path) -> None:
    """Removes a staging folder and everything in it."""
    shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yields a fresh staging folder beside ``out``. On success it becomes ``out`` by one rename (an
    existing ``out`` is replaced only when ``force``); on any failure, Ctrl-C included, it is removed
    and ``out`` is untouched.
    """
    stage = new_stage(out)
    try:
        yield stage
        commit_stage(stage, out, force)
    except BaseException:
        discard_stage(stage)
        raise

"""Hugging Face folders around the engine: which side files a model has, and the staged output folder
that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from layerswap_fast.errors import InvalidModelError, OutputExistsError

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


def model_dir(path: Path) -> Optional[Path]:
    """The folder holding a model's side files (None for a bare .safetensors file outside a folder)."""
    return path if path.is_dir() else None


def read_config(path: Path) -> Optional[dict[str, Any]]:
    """config.json of a model folder, if there is one."""
    folder = model_dir(path)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InvalidModelError(f"{folder / 'config.json'}: not valid JSON ({e})") from None


def architecture(path: Path) -> Optional[str]:
    """config.json ``architectures[0]``, if present."""
    cfg = read_config(path) or {}
    archs = cfg.get("architectures") or []
    return archs[0] if archs and isinstance(archs[0], str) else None


def copy_side_files(dest: Path, host: Path, tokenizer_source: Path) -> list[str]:
    """Copies config files from the host and tokenizer files from ``tokenizer_source``."""
    copied = []
    for src_model, names in ((host, CONFIG_FILES), (tokenizer_source, TOKENIZER_FILES)):
        folder = model_dir(src_model)
        if folder is None:
            continue
        for name in names:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, dest / name)
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
        folder = p_r if p_r.is_dir() else p_r.parent
        if _inside(out_r, folder if p_r.is_dir() else p_r) or _inside(p_r, out_r):
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


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yields a fresh staging folder beside ``out``. On success it becomes ``out`` by one rename (an
    existing ``out`` is replaced only when ``force``); on any failure, Ctrl-C included, it is removed
    and ``out`` is untouched.
    """
    out = Path(out)
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    try:
        yield stage
        for f in stage.iterdir():
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
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
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise

"""Hugging Face folders around the engine: which side files a model has, and the staged output folder
that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from layerswap_fast.errors import InvalidModelError, OutputExistsError

#: Files copied from the host (language expert) model: its configuration.
CONFIG_FILES = ("config.json", "generation_config.json")
#: Processor configurations of the multimodal families (copied from the host too).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
#: Tokenizer files copied from whichever model ``tokenizer_from`` names (chat templates go with them).
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
#: Output dtype -> the name config.json uses for it (``torch_dtype`` / ``dtype``).
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64"}
#: Hugging Face weight file names a folder without an index is made of.
SHARD_NAME = re.compile(r"^model-(\d{1,9})-of-(\d{1,9})\.safetensors$")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def model_dir(path: Path) -> Optional[Path]:
    """The folder holding a model's side files (None for a bare .safetensors file outside a folder)."""
    return path if path.is_dir() else None


def _not_regular(path: Path) -> Optional[str]:
    """What ``path`` is when it exists but is not a readable regular file (never opens it: opening a
    FIFO would block); None when it is one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "a dangling symbolic link" if os.path.islink(path) else None
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(st.st_mode):
        return None if os.access(path, os.R_OK) else "not readable"
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(st.st_mode):
            return kind
    return "not a regular file"


def check_side_file(path: Path) -> bool:
    """True if a side file exists (as a readable regular file); False if it does not exist at all.

    Raises:
        InvalidModelError: it exists but is a FIFO, device, folder, dangling link or unreadable.
    """
    if not os.path.lexists(path):
        return False
    kind = _not_regular(path)
    if kind:
        raise InvalidModelError(f"{path}: exists but is {kind}, not a readable regular file; remove it or replace it with the real file")
    return True


def read_config(path: Path) -> Optional[dict[str, Any]]:
    """config.json of a model folder, if there is one."""
    folder = model_dir(path)
    if folder is None or not check_side_file(folder / "config.json"):
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


def _json_side(path: Path) -> dict[str, Any]:
    """A small JSON side file read for its ``auto_map`` (empty dict when it is not a JSON object)."""
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidModelError(f"{path}: {path.stat().st_size} bytes is not a config (limit {MAX_CONFIG_BYTES})")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidModelError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def auto_map_files(folder: Path, config_name: str) -> tuple[list[str], list[str]]:
    """The Python files ``auto_map`` in ``folder/config_name`` names (``"modeling_x.XModel"`` ->
    ``modeling_x.py``; code in another repository, ``"repo--modeling_x.XModel"``, is not local).
    Returns (files present, notes about files named but absent)."""
    if not check_side_file(folder / config_name):
        return [], []
    auto = _json_side(folder / config_name).get("auto_map")
    refs: list[str] = []
    if isinstance(auto, dict):
        for v in auto.values():
            refs += [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, str)]
    files, notes = [], []
    for ref in refs:
        if "--" in ref or "." not in ref:
            continue
        module = ref.rsplit(".", 1)[0]
        if not _MODULE.match(module):
            continue
        name = f"{module}.py"
        if name in files:
            continue
        if check_side_file(folder / name):
            files.append(name)
        else:
            notes.append(f"{folder / config_name}: auto_map names {name}, which is not in {folder}; the output lacks it too")
    return files, notes


@dataclass
class SideFiles:
    """The side files an output gets: (source file, name in the output), and notes for the user."""

    copies: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_side_files(host: Path, tokenizer_source: Path, config_from: Optional[Path] = None) -> SideFiles:
    """Which side files go to the output, checked before any work.

    Config, generation config, processor configs and the ``auto_map`` code of config.json come from
    the host (the language expert); tokenizer files, chat templates and the ``auto_map`` code of
    tokenizer_config.json from ``tokenizer_source``. ``config_from`` (a folder) replaces both.

    Raises:
        InvalidModelError: a side file exists but is not a readable regular file.
    """
    plan = SideFiles()
    if config_from is not None:
        if not Path(config_from).is_dir():
            raise InvalidModelError(f"{config_from}: --config-from must be a model folder (with config.json and tokenizer files)")
        host = tokenizer_source = Path(config_from)
    seen: set[str] = set()
    for src_model, names, config_name in ((host, CONFIG_FILES + PROCESSOR_FILES, "config.json"),
                                          (tokenizer_source, TOKENIZER_FILES, "tokenizer_config.json")):
        folder = model_dir(Path(src_model))
        if folder is None:
            what = "config.json" if config_name == "config.json" else "tokenizer files"
            plan.notes.append(f"{src_model} is a single .safetensors file: the output has no {what}; --config-from FOLDER supplies them")
            continue
        code, notes = auto_map_files(folder, config_name)
        plan.notes += notes
        for name in list(names) + code:
            if name not in seen and check_side_file(folder / name):
                plan.copies.append((folder / name, name))
                seen.add(name)
    if host == tokenizer_source and len(plan.notes) == 2 and config_from is None:
        plan.notes = [f"{host} is a single .safetensors file: the output has no config.json and no tokenizer files; "
                      "--config-from FOLDER supplies them"]
    return plan


def with_out_dtype(config: Any, out_dtype: str) -> Any:
    """config.json data stating ``out_dtype`` wherever it states a dtype (``torch_dtype``, and
    ``dtype`` as newer transformers write it, in nested text/vision configs too)."""
    if isinstance(config, dict):
        return {k: (TORCH_DTYPE_NAMES[out_dtype] if k in ("torch_dtype", "dtype") and isinstance(v, str) and v != "auto"
                    else with_out_dtype(v, out_dtype)) for k, v in config.items()}
    if isinstance(config, list):
        return [with_out_dtype(v, out_dtype) for v in config]
    return config


def copy_side_files(dest: Path, side: SideFiles, out_dtype: Optional[str] = None) -> list[str]:
    """Copies the planned side files into ``dest``; config.json states ``out_dtype`` when one is given."""
    copied = []
    for src, name in side.copies:
        try:
            if name == "config.json" and out_dtype is not None:
                data = with_out_dtype(_json_side(src), out_dtype)
                (dest / name).write_text(json.dumps(data, indent=2) + "\n")
            else:
                shutil.copyfile(src, dest / name)
        except OSError as e:
            # Name the file being written (a full disk is about the output, not the source).
            raise OSError(e.errno, e.strerror, str(dest / name)) from None
        copied.append(name)
    return copied


def ignored_model_files(model: Path) -> list[str]:
    """``*.safetensors`` files in a model folder that are not its weights (and are never read): all
    but the index's shards, ``model.safetensors``, or, without either, the Hugging Face shard names."""
    folder = model_dir(Path(model))
    if folder is None:
        return []
    present = sorted(p.name for p in folder.glob("*.safetensors"))
    if (folder / INDEX_FILE).is_file():
        try:
            wm = json.loads((folder / INDEX_FILE).read_text()).get("weight_map", {})
            used = set(wm.values()) if isinstance(wm, dict) else set()
        except (OSError, ValueError, AttributeError):
            used = set()
    elif SINGLE_FILE in present:
        used = {SINGLE_FILE}
    else:
        used = {n for n in present if SHARD_NAME.match(n)}
    return [n for n in present if n not in used]


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies inside b."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


#: Files that mark a folder as an output of this tool (single merge, bulk run): only such a folder, or
#: an empty one, is ever replaced by ``force``.
BULK_MANIFEST = "layerswap_bulk.json"
OUTPUT_MARKERS = (REPORT_FILE, BULK_MANIFEST)


def check_not_input(path: Path, inputs: Iterable[Optional[Path]], what: str = "output") -> None:
    """Refuses a path this tool is about to write when it is, contains or lies inside any input.

    Every writer (the output folder, ``--save-stats``, bulk manifests and summaries, reports) calls
    this with every input of the run, so that no write can land on a model, a layout or a plan file.
    ``None`` inputs are skipped.
    """
    target = Path(path).resolve()
    for p in inputs:
        if p is None:
            continue
        p_r = Path(p).resolve()
        if _inside(target, p_r) or _inside(p_r, target):
            raise OutputExistsError(f"{path}: {what} overlaps the input {p}; choose a path outside the inputs")


def _mount_points() -> set[str]:
    """Every mount point of this process's mount namespace (Linux); empty elsewhere."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return set()
    # Field 5 is the mount point, with spaces and the like written as octal escapes.
    return {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) for line in lines if len(line.split()) > 4}


def unreplaceable_reason(out: Path) -> Optional[str]:
    """Why an existing folder cannot be swapped for a new one by a rename, or None if it can."""
    r = Path(out).resolve()
    if r == Path(r.anchor):
        return "is the filesystem root"
    if os.path.ismount(r) or str(r) in _mount_points():
        return "is a mount point (a renamed folder cannot replace it)"
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        cwd = None
    if cwd is not None and _inside(cwd, r):
        return "is the current directory or one of its parents"
    return None


def replace_refusal(out: Path) -> Optional[str]:
    """Why ``force`` must not replace the existing ``out``, or None when it may (an empty folder, or a
    folder holding ``layerswap_report.json`` or ``layerswap_bulk.json``)."""
    if out.is_symlink() or not out.is_dir():
        return "exists and is not a folder"
    reason = unreplaceable_reason(out)
    if reason:
        return f"{reason}; give a new folder inside it, e.g. {out / 'merged'}"
    try:
        names = {p.name for p in out.iterdir()}
    except OSError as e:
        return f"cannot be listed ({e.strerror})"
    if not names or names & set(OUTPUT_MARKERS):
        return None
    return (f"is not empty and not an output of layerswap-fast (no {' or '.join(OUTPUT_MARKERS)}); "
            "--force replaces only those, so nothing in it was touched")


def check_output(out: Path, inputs: Iterable[Optional[Path]], force: bool) -> None:
    """Refuses, before any work: an output that overlaps an input; one that exists (without
    ``force``); and, with ``force``, one that is not this tool's to replace or cannot be replaced by a
    rename (see :func:`replace_refusal`). Also clears stale staging leftovers of killed runs."""
    out = Path(out)
    check_not_input(out, inputs)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out}: output already exists (use --force to replace it)")
        reason = replace_refusal(out)
        if reason:
            raise OutputExistsError(f"{out}: {reason}")
    clear_stale(out)


# --- staging folders ------------------------------------------------------------------------------------

_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"
_STAGE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover (not Linux)
    os.umask(mask)
    return mask


def _mkdtemp(parent: Path, name: str, kind: str) -> Path:
    """A new hidden folder ``.NAME.KIND-HOST-PID-RANDOM`` in ``parent`` with the permissions ``mkdir``
    gives under the umask (tempfile makes it 0700, which no model server of another user can read)."""
    d = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{_HOST}-{os.getpid()}-", dir=parent))
    os.chmod(d, 0o777 & ~_umask())
    return d


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale(out: Path) -> list[Path]:
    """Finds hidden staging leftovers of ``out`` (``.NAME.partial-*``, ``.NAME.old-*``) that a run
    killed by SIGKILL left beside it. Those of a process of this host that is gone are removed; an
    ``.old-*`` one that holds the only copy of a previous output (``out`` is missing) is kept; any
    other is named in a warning. Returns what was kept."""
    out = Path(out)
    parent = out.absolute().parent
    kept: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return kept
    for p in entries:
        if not (p.name.startswith(f".{out.name}.partial-") or p.name.startswith(f".{out.name}.old-")):
            continue
        m = _STAGE.match(p.name)
        dead = m is not None and m["name"] == out.name and m["host"] == _HOST and not _alive(int(m["pid"]))
        if dead and m is not None and m["kind"] == "old" and not out.exists() and (p / out.name).exists():
            warnings.warn(LeftoverWarning(f"{p / out.name}: the previous output, moved aside by a run that was killed before it "
                                          f"finished; {out} does not exist, so it was kept (move it back with mv)"))
            kept.append(p)
        elif dead:
            shutil.rmtree(p, ignore_errors=True)
            if p.exists():
                warnings.warn(LeftoverWarning(f"{p}: leftover of a killed run that could not be removed; remove it by hand"))
                kept.append(p)
            else:
                warnings.warn(LeftoverWarning(f"{p}: removed the leftover of an earlier run that was killed"))
        else:
            why = "of a run still going" if m is not None and m["host"] == _HOST else "perhaps of a run on another machine"
            warnings.warn(LeftoverWarning(f"{p}: a staging folder {why}; left alone (remove it by hand if that run is gone)"))
            kept.append(p)
    return kept


class LeftoverWarning(UserWarning):
    """A staging folder beside an output, left by a killed run: removed, or kept and named."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_stage(out: Path) -> Path:
    """A fresh, empty staging folder beside ``out`` (same filesystem, so publishing is one rename),
    with the permissions ``mkdir`` would give it under the umask."""
    out = Path(out)
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return _mkdtemp(parent, out.name, "partial")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit_stage(stage: Path, out: Path, force: bool) -> None:
    """Syncs every file of ``stage`` to disk, then renames it to ``out`` (replacing an existing ``out``
    only when ``force``). Until the rename nothing is visible at ``out``; at every instant ``out`` is
    either the old folder or the new one (an atomic exchange where the OS has one, else two renames
    rolled back on failure)."""
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
    if not (out.exists() or out.is_symlink()):
        os.rename(stage, out)
        _fsync_dir(parent)
        return
    if not force:
        raise OutputExistsError(f"{out}: output appeared during the run; refusing to replace it")
    reason = replace_refusal(out)
    if reason:
        raise OutputExistsError(f"{out}: {reason}")
    if _exchange(stage, out):
        _fsync_dir(parent)
        shutil.rmtree(stage, ignore_errors=True)  # now the old output
        return
    old = _mkdtemp(parent, out.name, "old")
    try:
        os.rename(out, old / out.name)
        try:
            os.rename(stage, out)
        except BaseException:
            os.rename(old / out.name, out)
            raise
        _fsync_dir(parent)
    finally:
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

"""Models named the way the ecosystem names them: Hugging Face hub ids, ``org/name[@REVISION]``.

Every place that takes a model (``-b``/``-s``/``-m``, bulk ``NAME=…``, plan files and the Python API)
passes it through :func:`resolve`:

- an existing local path always wins, as in transformers (``huggingface_hub`` is not even imported);
- otherwise a value shaped like ``org/name`` or ``org/name@REVISION`` (a branch, a tag or a commit) is
  looked up in the hub cache by ``huggingface_hub`` itself, which honours ``HF_HUB_CACHE``,
  ``HF_HOME`` and ``HF_HUB_OFFLINE``: ``refs/REVISION`` gives the commit, ``snapshots/COMMIT/`` the
  files, and the engine follows their symlinks into ``blobs/``;
- when the cached snapshot lacks weights and the network is allowed, only what a merge reads is
  downloaded (:data:`ALLOW_PATTERNS`: safetensors shards, their index, config and tokenizer files,
  the model card; never ``.bin``/``.pth``, nothing in sub-folders);
- offline, or without the ``hub`` extra, a missing id is an :class:`InvalidModelError` (exit status 2)
  naming the id, the revision and the cache folder searched.

The resolved commit goes into the report (``"hub"``), so that a merge can be reproduced exactly.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from layerswap_fast.errors import InvalidModelError
from layerswap_fast.folder import CONFIG_FILES, TOKENIZER_FILES

PathLike = Union[str, "os.PathLike[str]"]

#: ``org/name`` with an optional ``@REVISION``; the same characters the hub allows in repo ids.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?$")
DEFAULT_REVISION = "main"
#: What a merge reads from a hub repo. Top-level files only (see :data:`IGNORE_PATTERNS`).
ALLOW_PATTERNS = ("*.safetensors", "model.safetensors.index.json", *CONFIG_FILES, *TOKENIZER_FILES, "README.md")
#: fnmatch's ``*`` crosses ``/``: this keeps sub-folders (``original/``, ``onnx/``…) out.
IGNORE_PATTERNS = ("*/*",)
INSTALL_HINT = "pip install 'layerswap-fast[hub]'"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, and, for a hub id, which id, revision and commit they are."""

    path: Path
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    commit: Optional[str] = None

    def to_report(self) -> Optional[dict[str, str]]:
        """``{"id", "revision", "commit"}`` for a model from the hub, else None."""
        if self.hub_id is None:
            return None
        return {"id": self.hub_id, "revision": self.revision or DEFAULT_REVISION, "commit": self.commit or ""}

    @property
    def spec(self) -> str:
        """How to name this exact model again: ``org/name@COMMIT`` for the hub, else the path."""
        return f"{self.hub_id}@{self.commit}" if self.hub_id else str(self.path)


def parse_id(value: str) -> Optional[tuple[str, str]]:
    """(repo id, revision) if ``value`` is shaped like a hub id, else None."""
    m = HUB_ID.match(value)
    if m is None or m["repo"].endswith((".safetensors", ".json")):
        return None
    return m["repo"], m["revision"] or DEFAULT_REVISION


def looks_like_hub_id(value: PathLike) -> bool:
    """Whether ``value`` would be looked up on the hub (it is shaped like an id and is no local path)."""
    return not (Path(value).exists() or Path(value).is_symlink()) and parse_id(os.fspath(value)) is not None


def resolve(value: Union[PathLike, ModelSource]) -> ModelSource:
    """A model argument as local files: the path itself, or the hub cache snapshot of an id.

    Raises:
        InvalidModelError: a hub id that is neither cached nor downloadable (offline, no ``hub``
            extra, unknown repo or revision, no safetensors weights).
    """
    if isinstance(value, ModelSource):
        return value
    p = Path(value)
    if p.exists() or p.is_symlink():
        return ModelSource(p)
    parsed = parse_id(os.fspath(value))
    if parsed is None:
        return ModelSource(p)  # the engine reports the missing path
    repo, revision = parsed
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise InvalidModelError(
            f"{value}: not a local path, and hub model '{repo}' (revision {revision}) cannot be looked up in the "
            f"hub cache {_default_cache()} without the hub extra ({INSTALL_HINT})"
        ) from None
    folder = _from_cache(repo, revision)
    if folder is None:
        folder = _download(repo, revision)
    return ModelSource(folder, repo, revision, folder.name)


def _default_cache() -> Path:
    """The cache folder huggingface_hub would use, by its documented rules (for the message only)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def _repo_cache(repo: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")


def _snapshot(repo: str, revision: str, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, local_files_only=local_only, allow_patterns=list(ALLOW_PATTERNS),
                                  ignore_patterns=list(IGNORE_PATTERNS)))


def _from_cache(repo: str, revision: str) -> Optional[Path]:
    """The cached snapshot of ``repo`` at ``revision`` if it holds complete safetensors weights."""
    try:
        folder = _snapshot(repo, revision, local_only=True)
    except Exception:  # huggingface_hub: not cached, incomplete snapshot, invalid id (all mean "not here")
        return None
    return folder if complete(folder) else None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download(repo: str, revision: str) -> Path:
    where = _repo_cache(repo)
    if _offline():
        raise InvalidModelError(
            f"hub model '{repo}' (revision {revision}) is not in the hub cache {where} with safetensors weights, "
            "and HF_HUB_OFFLINE is set; download it first or unset HF_HUB_OFFLINE"
        )
    try:
        folder = _snapshot(repo, revision, local_only=False)
    except Exception as e:  # not found, gated, no network: all bad input for this run
        detail = " ".join(str(e).split())[:300]
        raise InvalidModelError(
            f"hub model '{repo}' (revision {revision}) is not in the hub cache {where} and could not be downloaded: "
            f"{type(e).__name__}: {detail}"
        ) from None
    if not complete(folder):
        raise InvalidModelError(
            f"hub model '{repo}' (revision {revision}): the snapshot {folder} lacks safetensors weights (a shard its index names "
            "is missing and could not be downloaded, or the repo has only .bin/.pth weights, which are not read)"
        )
    return folder


def complete(folder: Path) -> bool:
    """Whether ``folder`` has safetensors weights the engine can open: every shard its index names
    (a dangling snapshot symlink counts as missing), else ``model.safetensors`` or any ``.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
        except (OSError, ValueError, AttributeError):
            return True  # let the engine name what is wrong with the index
        return all((folder / str(f)).is_file() for f in set(weight_map.values()))
    return any(p.is_file() for p in folder.glob("*.safetensors"))


def hub_report(sources: dict[str, ModelSource]) -> dict[str, dict[str, str]]:
    """The report's ``"hub"`` entry: for each role whose model came from the hub, id, revision, commit."""
    return {role: r for role, s in sources.items() if (r := s.to_report()) is not None}


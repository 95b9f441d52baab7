"""Stub of the private native module ``layerswap_fast._core`` (the Rust engine's binding).

Checked against the built module by ``python -m mypy.stubtest layerswap_fast._core`` (run by the
test suite). Results cross as JSON text; ``api.py`` and ``bulk.py`` turn them into typed objects.
"""

from os import PathLike
from typing import Callable, Optional, Union

_Path = Union[str, PathLike[str]]
_Progress = Optional[Callable[[str, int, int], object]]

__version__: str
__all__ = [
    "IncompatibleModelsError",
    "InvalidModelError",
    "InvalidOptionError",
    "LayerswapError",
    "MemoryBudgetError",
    "NonFiniteTensorError",
    "__version__",
    "analyze",
    "builtin_layouts",
    "checksums",
    "inspect",
    "merge",
    "plans_from_sums",
    "sums",
    "write",
]

class LayerswapError(Exception): ...
class InvalidModelError(LayerswapError): ...
class IncompatibleModelsError(LayerswapError): ...
class NonFiniteTensorError(InvalidModelError): ...
class MemoryBudgetError(LayerswapError): ...
class InvalidOptionError(LayerswapError): ...

def inspect(model: _Path, architecture: Optional[str] = None, layout_json: Optional[str] = None) -> str: ...
def analyze(
    base: _Path,
    safety: _Path,
    experts: list[_Path],
    options_json: list[str],
    architecture: Optional[str] = None,
    layout_json: Optional[str] = None,
    saved_stats_json: Optional[str] = None,
    lenient: bool = False,
    progress: _Progress = None,
) -> str: ...
def merge(
    base: _Path,
    safety: _Path,
    expert: _Path,
    out_dir: _Path,
    options_json: str,
    architecture: Optional[str] = None,
    layout_json: Optional[str] = None,
    progress: _Progress = None,
    emit: str = "model",
) -> str: ...
def write(
    base: _Path,
    safety: _Path,
    expert: _Path,
    out_dir: _Path,
    plan_json: str,
    architecture: Optional[str] = None,
    layout_json: Optional[str] = None,
    sync: bool = True,
    progress: _Progress = None,
) -> str: ...
def sums(
    base: _Path,
    safety: _Path,
    expert: _Path,
    measured: str,
    options_json: str,
    architecture: Optional[str] = None,
    layout_json: Optional[str] = None,
    progress: _Progress = None,
) -> str: ...
def plans_from_sums(
    base: _Path,
    safety: _Path,
    experts: list[_Path],
    options_json: list[str],
    safety_sums_json: str,
    expert_sums_json: list[str],
    architecture: Optional[str] = None,
    layout_json: Optional[str] = None,
    lenient: bool = False,
) -> str: ...
def builtin_layouts() -> list[tuple[str, str]]: ...
def checksums(paths: list[_Path], threads: int) -> list[str]: ...

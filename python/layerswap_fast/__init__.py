"""layerswap-fast: training-free layer-wise swapping of an English safety expert into language experts
(Shin & Hwang, "Layer-wise Swapping for Generalizable Multilingual Safety", EACL 2026), streamed by a
Rust engine in bounded memory on CPU.

Quick start::

    import layerswap_fast as lsf
    plan = lsf.analyze("base", "safety", "expert", granularity="module")
    report = lsf.merge("base", "safety", "expert", "merged", max_memory="512MiB")
"""

from layerswap_fast._core import __version__
from layerswap_fast.api import analyze, inspect, merge
from layerswap_fast.errors import (
    IncompatibleModelsError,
    InvalidModelError,
    InvalidOptionError,
    LayerswapError,
    MemoryBudgetError,
    NonFiniteTensorError,
    OutputExistsError,
)
from layerswap_fast.options import MergeOptions
from layerswap_fast._core import Plan, TensorStats, UnitDecision
from layerswap_fast.verify import VerifyResult, verify

__all__ = [
    "__version__",
    "analyze",
    "merge",
    "inspect",
    "verify",
    "VerifyResult",
    "MergeOptions",
    "Plan",
    "UnitDecision",
    "TensorStats",
    "LayerswapError",
    "InvalidModelError",
    "IncompatibleModelsError",
    "NonFiniteTensorError",
    "MemoryBudgetError",
    "InvalidOptionError",
    "OutputExistsError",
]

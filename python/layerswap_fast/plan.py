"""The plan: per unit, the scores, p_S, p_M, d and the decision, exactly as the engine thresholded them.

The classes are the engine's own (frozen, defined once in Rust: ``rust/python/types.rs``); this module
names them where they have always been importable from.
"""

from layerswap_fast._core import Plan, TensorStats, UnitDecision

__all__ = ["Plan", "TensorStats", "UnitDecision"]

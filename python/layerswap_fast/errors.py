"""Exceptions raised by layerswap-fast.

Every error layerswap-fast raises on purpose derives from :class:`LayerswapError`. OS failures keep
their builtin types (``FileNotFoundError``, ``PermissionError``, ``OSError`` for a full disk) so that
ordinary ``except OSError`` handling works. Every message names the file and, where one is concerned,
the tensor.
"""

from layerswap_fast._core import (
    IncompatibleModelsError,
    InvalidModelError,
    InvalidOptionError,
    LayerswapError,
    MemoryBudgetError,
    NonFiniteTensorError,
)

__all__ = [
    "LayerswapError",
    "InvalidModelError",
    "IncompatibleModelsError",
    "NonFiniteTensorError",
    "MemoryBudgetError",
    "InvalidOptionError",
    "OutputExistsError",
]


class OutputExistsError(LayerswapError):
    """The output folder exists (pass ``force=True`` / ``--force`` to replace it) or overlaps an input."""

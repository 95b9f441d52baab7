"""Merging models a pipeline already holds in memory: state dicts of torch tensors or numpy arrays.

:func:`merge_state_dicts` runs the same engine as :func:`layerswap_fast.merge` (same method, numerics,
decisions and bytes) on tensors that never touch the disk:

- every input tensor reaches the engine through DLPack, without a copy (the engine reads the tensors'
  own memory in place, with the GIL released; bf16 torch tensors included, which numpy cannot hold);
- the outputs are allocated here, as tensors of the language expert's kind (``torch.empty`` or
  ``numpy.empty``), and filled by the engine in place through DLPack: no staging buffer, no copy back;
- the statistics use the same chunked float64 kernels as files, so the plan is the file plan.

Bad input gives the errors files give (missing tensors, shape or dtype mismatches, NaN/Inf), naming
the state dict (``expert state dict`` and so on) and the tensor; a non-contiguous tensor, a tensor on
a GPU or of a dtype safetensors cannot hold is refused here, by name. The tensors must not be written
to by another thread while a merge reads them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from layerswap_fast import _core
from layerswap_fast._core import Plan
from layerswap_fast.api import ProgressCallback, _options, read_layout
from layerswap_fast.errors import InvalidModelError, InvalidOptionError
from layerswap_fast.options import MergeOptions, callback_arg, flag_arg

ROLES = ("base", "safety", "expert")
#: dtype names as safetensors (and the engine) spell them, by torch / numpy dtype name.
_TORCH = {
    "bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64", "bool": "BOOL", "uint8": "U8", "int8": "I8",
    "int16": "I16", "uint16": "U16", "int32": "I32", "uint32": "U32", "int64": "I64", "uint64": "U64",
    "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
}
_NUMPY = {
    "float16": "F16", "float32": "F32", "float64": "F64", "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16",
    "uint16": "U16", "int32": "I32", "uint32": "U32", "int64": "I64", "uint64": "U64",
}
_OUT_NAME = {"bf16": "BF16", "f16": "F16", "f32": "F32", "f64": "F64"}


def _capsule(t: Any) -> Any:
    """The tensor's DLPack capsule: DLPack 1.0 when the library offers it (it can export read-only
    numpy arrays), else the older one."""
    try:
        return t.__dlpack__(max_version=(1, 0))
    except TypeError:
        return t.__dlpack__()


def _entry(label: str, name: Any, t: Any) -> tuple[str, str, list[int], Any]:
    """(name, dtype, shape, DLPack capsule) of one tensor, after the checks that name it."""
    if not isinstance(name, str):
        raise InvalidModelError(f"{label}: key {name!r} is not a tensor name (str)")
    module = type(t).__module__.split(".")[0]
    if module == "torch":
        if t.device.type != "cpu":
            raise InvalidModelError(f"{label}: tensor '{name}' is on {t.device}; merging reads CPU memory (move it with .cpu())")
        if t.layout is not _torch().strided:
            raise InvalidModelError(f"{label}: tensor '{name}' has layout {t.layout}; only dense tensors can be merged")
        dtype = _TORCH.get(str(t.dtype).removeprefix("torch."))
        if t.requires_grad:
            t = t.detach()  # a view of the same memory: DLPack refuses tensors that track gradients
    elif module == "numpy":
        dtype = _NUMPY.get(t.dtype.name) if t.dtype.byteorder in "=|<" else None
    else:
        raise InvalidModelError(f"{label}: tensor '{name}' is a {type(t).__name__}; expected a torch tensor or a numpy array")
    if dtype is None:
        raise InvalidModelError(f"{label}: tensor '{name}' has dtype {t.dtype}, which safetensors cannot hold "
                                f"(supported: {', '.join(sorted(set(_TORCH)))})")
    contiguous = t.is_contiguous() if module == "torch" else t.flags.c_contiguous
    if not contiguous:
        raise InvalidModelError(f"{label}: tensor '{name}' is not contiguous (strides {tuple(t.stride() if module == 'torch' else t.strides)}); "
                                "pass .contiguous() tensors")
    return name, dtype, [int(d) for d in t.shape], _capsule(t)


def _entries(role: str, state_dict: Any) -> list[tuple[str, str, list[int], Any]]:
    label = f"{role} state dict"
    if not isinstance(state_dict, Mapping):
        raise InvalidOptionError(f"{label}: expected a dict of tensors, got {type(state_dict).__name__}")
    return [_entry(label, name, t) for name, t in state_dict.items()]


def _torch() -> Any:
    import torch

    return torch


def _kind(expert: Mapping[str, Any]) -> str:
    """The kind of tensors the language expert holds (and the result will): "torch" or "numpy"."""
    if not isinstance(expert, Mapping):
        return "numpy"  # refused by _entries, which names the argument
    first = next(iter(expert.values()), None)
    return "torch" if first is not None and type(first).__module__.split(".")[0] == "torch" else "numpy"


def _allocator(kind: str, out: dict[str, Any]) -> Callable[[list[tuple[str, str, list[int]]]], list[Any]]:
    """Allocates the output tensors the engine asks for (name, dtype, shape), keeps them in ``out``
    and hands their DLPack capsules to the engine, which fills them in place."""

    def allocate(specs: list[tuple[str, str, list[int]]]) -> list[Any]:
        capsules = []
        for name, dtype, shape in specs:
            if kind == "torch":
                torch = _torch()
                tensor = torch.empty(shape, dtype=getattr(torch, _torch_name(dtype)))
            else:
                import numpy as np

                if dtype == "BF16":
                    raise InvalidOptionError("numpy has no bfloat16: pass torch tensors to get bf16 output")
                tensor = np.empty(shape, dtype=_numpy_name(dtype))
            out[name] = tensor
            capsules.append(_capsule(tensor))
        return capsules

    return allocate


def _torch_name(dtype: str) -> str:
    return next(k for k, v in _TORCH.items() if v == dtype)


def _numpy_name(dtype: str) -> str:
    return next(k for k, v in _NUMPY.items() if v == dtype)


def _run(base: Mapping[str, Any], safety: Mapping[str, Any], expert: Mapping[str, Any], opts: MergeOptions, architecture: Optional[str],
         layout: Any, allocate: Optional[Callable[..., list[Any]]], progress: Optional[ProgressCallback]) -> Plan:
    callback_arg(progress, "progress")
    if architecture is not None and not isinstance(architecture, str):
        raise TypeError(f"architecture must be a str (config.json architectures[0]), not {type(architecture).__name__}")
    entries = [_entries(role, sd) for role, sd in zip(ROLES, (base, safety, expert))]
    if allocate is not None and _kind(expert) == "numpy" and opts.out_dtype == "bf16":
        raise InvalidOptionError("out_dtype bf16 needs torch tensors: numpy has no bfloat16")
    b, s, m = entries
    plan, _ = _core.merge_state_dicts(b, s, m, opts, architecture, read_layout(layout), allocate, progress)
    return plan


def analyze_state_dicts(
    base: Mapping[str, Any],
    safety: Mapping[str, Any],
    expert: Mapping[str, Any],
    *,
    options: Optional[MergeOptions] = None,
    architecture: Optional[str] = None,
    layout: Any = None,
    progress: Optional[ProgressCallback] = None,
    **kwargs: Any,
) -> Plan:
    """The plan for three state dicts, as :func:`layerswap_fast.analyze` computes it for files.

    Args:
        base, safety, expert: ``{name: tensor}`` of B, S and M: torch tensors or numpy arrays, on the
            CPU, contiguous, of a dtype safetensors can hold.
        options: a :class:`MergeOptions`; keyword arguments (``granularity=``, ``tau=``, ``alpha=``,
            ``numerics=``...) override its fields.
        architecture: config.json ``architectures[0]`` of the models, to pick the layout by name
            (otherwise the layout is detected from the tensor names).
        layout: a custom layout definition file.
        progress: called about ten times a second with ``(phase, done, total)``.

    Raises:
        InvalidModelError, IncompatibleModelsError, NonFiniteTensorError, InvalidOptionError.
    """
    opts = _options(options, kwargs)
    return _run(base, safety, expert, opts, architecture, layout, None, progress)


def merge_state_dicts(
    base: Mapping[str, Any],
    safety: Mapping[str, Any],
    expert: Mapping[str, Any],
    *,
    options: Optional[MergeOptions] = None,
    architecture: Optional[str] = None,
    layout: Any = None,
    return_plan: bool = False,
    progress: Optional[ProgressCallback] = None,
    **kwargs: Any,
) -> Any:
    """Merges the safety expert into the language expert, in memory: layer-wise swapping of state dicts.

    The result is what :func:`layerswap_fast.merge` would write to disk, tensor for tensor and byte for
    byte, as a new dict with the language expert's keys, in its order, holding tensors of its kind
    (torch or numpy). The inputs are read in place and never modified.

    Args:
        base, safety, expert, options, architecture, layout, progress: as for :func:`analyze_state_dicts`.
            Keyword arguments override option fields (``granularity=``, ``tau=``, ``alpha=``,
            ``out_dtype=``, ``threads=``, ``max_memory=``...); the file options (``shard_size``,
            ``tokenizer_from``) do not apply.
        return_plan: return ``(merged, plan)`` instead of ``merged``.

    Returns:
        The merged state dict, or ``(merged, plan)``.

    Raises:
        InvalidModelError, IncompatibleModelsError, NonFiniteTensorError, InvalidOptionError,
        KeyboardInterrupt (Ctrl-C stops the engine within one chunk).
    """
    opts = _options(options, kwargs)
    flag_arg(return_plan, "return_plan")
    out: dict[str, Any] = {}
    plan = _run(base, safety, expert, opts, architecture, layout, _allocator(_kind(expert), out), progress)
    merged = {name: out[name] for name in expert if name in out}
    return (merged, plan) if return_plan else merged

"""The public Python API: :func:`analyze`, :func:`merge`, :func:`inspect`.

Python owns the people-facing parts (options, side files, the staged output folder, the report); every
byte of tensor data is read, reduced, blended and written by the Rust engine in ``_core``.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from layerswap_fast import _core
from layerswap_fast._core import Plan, Session, WriteSummary
from layerswap_fast.folder import REPORT_FILE, architecture, check_output, copy_side_files, read_toml, staged_output
from layerswap_fast.options import MergeOptions

PathLike = Union[str, os.PathLike]
#: ``progress(phase, done, total)``: phase is "analyze", "write" or "sync"; done/total in bytes.
ProgressCallback = Callable[[str, int, int], None]


def _options(options: Optional[MergeOptions], kwargs: dict[str, Any]) -> MergeOptions:
    if options is None:
        return MergeOptions(**kwargs)
    return options.replace(**kwargs) if kwargs else options


def read_layout(layout: Optional[PathLike]) -> Optional[dict[str, Any]]:
    """A custom layout definition file: JSON, or TOML (``.toml``)."""
    if layout is None:
        return None
    p = Path(layout)
    if p.suffix.lower() == ".toml":
        return read_toml(p)
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        # The engine names what is wrong with a definition; text that is not JSON at all is ours to name.
        from layerswap_fast.errors import InvalidModelError

        raise InvalidModelError(f"{p}: invalid layout definition: not valid JSON ({e})") from None
    return data


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, as the OS counts it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def inspect(model: PathLike, *, layout: Optional[PathLike] = None) -> dict[str, Any]:
    """Opens one model and describes it: detected layout, layers, and where every tensor belongs.

    Args:
        model: a Hugging Face folder or a ``.safetensors`` file.
        layout: a custom layout definition file (JSON or TOML), overriding detection.

    Returns:
        ``{"layout", "description", "n_layers", "data_bytes", "shards", "tensors": [...]}``; each tensor
        has ``name``, ``dtype``, ``shape`` and ``place``: ``"Outside"``, ``"Vocab"`` (outside, with a
        vocabulary axis), ``{"Layer": {"layer", "part", "target"}}`` or ``{"Unassigned": {"layer"}}`` (in a
        layer but in no unit of the layout: a merge refuses those).
    """
    p = Path(model)
    return _core.inspect(p, architecture(p), read_layout(layout))


def analyze(
    base: PathLike,
    safety: PathLike,
    expert: PathLike,
    *,
    options: Optional[MergeOptions] = None,
    layout: Optional[PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    **kwargs: Any,
) -> Plan:
    """Computes the plan: per unit, the scores of the safety and language experts, p_S, p_M, d and the
    decision (METHOD.md §2–§4). Reads the models once, writes nothing.

    Args:
        base, safety, expert: model folders or ``.safetensors`` files of B, S and M.
        options: a :class:`MergeOptions`; keyword arguments (``granularity=``, ``tau=``, ``alpha=``,
            ``numerics=``, ``max_memory=``, ``threads=``...) override its fields.
        layout: a custom layout definition file.
        progress: called about ten times a second with ``(phase, done, total)``.

    Returns:
        The :class:`Plan`.

    Raises:
        InvalidModelError, IncompatibleModelsError, MemoryBudgetError, InvalidOptionError, OSError.
    """
    opts = _options(options, kwargs)
    session = open_session(base, safety, [expert], layout)
    return session.analyze(opts, progress=progress)[0]


def open_session(base: PathLike, safety: PathLike, experts: list[PathLike], layout: Optional[PathLike], lenient: bool = False) -> Session:
    """Opens B, S and the experts once (the first expert's config.json names the architecture)."""
    return Session(base, safety, experts, architecture=architecture(Path(experts[0])), layout=read_layout(layout), lenient=lenient)


def merge(
    base: PathLike,
    safety: PathLike,
    expert: PathLike,
    out: PathLike,
    *,
    options: Optional[MergeOptions] = None,
    layout: Optional[PathLike] = None,
    force: bool = False,
    progress: Optional[ProgressCallback] = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Merges the safety expert into the language expert and writes a Hugging Face folder at ``out``.

    The folder holds the merged safetensors shards (with an index when there is more than one), the
    language expert's config files, the tokenizer files of ``options.tokenizer_from`` and
    ``layerswap_report.json``. It is written beside ``out`` and renamed into place at the end: after a
    failure or Ctrl-C there is no ``out`` and no leftover. Inputs are only ever read.

    Args:
        base, safety, expert: model folders or ``.safetensors`` files of B, S and M.
        out: the output folder; must not exist unless ``force``.
        options, layout, progress: as for :func:`analyze`; keyword arguments override option fields.
        force: replace an existing ``out``.

    Returns:
        The report (also written to ``out/layerswap_report.json``).

    Raises:
        OutputExistsError, InvalidModelError, IncompatibleModelsError, MemoryBudgetError,
        InvalidOptionError, OSError (e.g. disk full), KeyboardInterrupt.
    """
    opts = _options(options, kwargs)
    base_p, safety_p, expert_p, out_p = Path(base), Path(safety), Path(expert), Path(out)
    check_output(out_p, [base_p, safety_p, expert_p], force)
    started = time.perf_counter()
    session = open_session(base_p, safety_p, [expert_p], layout)
    with staged_output(out_p, force) as stage:
        plan = session.analyze(opts, progress=progress, for_write=True)[0]
        write = session.write(0, plan, stage, progress=progress)
        report = finish_output(stage, plan, write, session.bytes_read, opts, (base_p, safety_p, expert_p), started)
    return report


def finish_output(stage: Path, plan: Plan, write: WriteSummary, bytes_read: int, opts: MergeOptions,
                  inputs: tuple[Path, Path, Path], started: float) -> dict[str, Any]:
    """Adds the side files (config from the expert, tokenizer per ``tokenizer_from``) and the report to
    a staged output whose shards the engine has written. Returns the report."""
    base_p, safety_p, expert_p = inputs
    tok_source = {"expert": expert_p, "base": base_p, "safety": safety_p}[opts.effective_tokenizer_from]
    side_files = copy_side_files(stage, expert_p, tok_source)
    report = {
        "tool": "layerswap-fast",
        "version": _core.__version__,
        "method": "layer-wise swapping (Shin & Hwang, EACL 2026)",
        "inputs": {"base": str(base_p), "safety": str(safety_p), "expert": str(expert_p)},
        "parameters": {**opts.to_dict(), "out_dtype": opts.effective_out_dtype, "tokenizer_from": opts.effective_tokenizer_from,
                       "threads": opts.effective_threads},
        "layout": plan.layout,
        "n_layers": plan.n_layers,
        "granularity": plan.granularity,
        "numerics": opts.numerics,
        "counts": plan.counts(),
        "units": [u.to_dict() for u in plan.units],
        "output": {
            "files": sorted(Path(f).name for f in write.files) + sorted(side_files),
            "tensors": write.tensors,
            "bytes_written": write.bytes_written,
        },
        "bytes_read": bytes_read,
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "warnings": [
            f"tensor '{name}' is only in the language expert (not in the safety expert): copied from the language expert"
            for name in write.expert_only
        ],
    }
    (stage / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report

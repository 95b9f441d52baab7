"""The public Python API: :func:`analyze`, :func:`merge`, :func:`inspect`.

Python owns the people-facing parts (options, side files, the staged output folder, the report); every
byte of tensor data is read, reduced, blended and written by the Rust engine in ``_core``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from layerswap_fast import _core
from layerswap_fast._core import Plan, Session, WriteSummary
from layerswap_fast.folder import (REPORT_FILE, TOKENIZER_FILES, architecture, check_output, copy_side_files, ignored_model_files, plan_side_files,
                                   staged_output)
from layerswap_fast.errors import InvalidModelError, InvalidOptionError
from layerswap_fast.lora import is_adapter, model_of, tokenizer_of, write_adapter_config
from layerswap_fast.options import MergeOptions, callback_arg, flag_arg, options_arg, path_arg, toml

PathLike = Union[str, os.PathLike]
#: ``progress(phase, done, total)``: phase is "analyze", "write" or "sync"; done/total in bytes.
ProgressCallback = Callable[[str, int, int], None]


def _options(options: Optional[MergeOptions], kwargs: dict[str, Any]) -> MergeOptions:
    """The options of a call: ``options`` with keyword overrides. Unknown keywords are a TypeError
    naming them (as for any function), wrong values an InvalidOptionError naming the field."""
    options_arg(options)
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(MergeOptions)})
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)} (MergeOptions fields and the documented parameters only)")
    if options is None:
        return MergeOptions(**kwargs)
    return options.replace(**kwargs) if kwargs else options


def read_layout(layout: Optional[PathLike]) -> Optional[dict[str, Any]]:
    """A custom layout definition file as the engine reads it: JSON, or TOML (``.toml``)."""
    if layout is None:
        return None
    p = path_arg(layout, "layout")
    if p.suffix.lower() == ".toml":
        tomllib = toml()
        try:
            return tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise InvalidOptionError(f"{p}: not a valid TOML layout file ({e})") from None
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise InvalidModelError(f"{p}: invalid layout definition: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InvalidModelError(f"{p}: invalid layout definition: a JSON object is expected")
    return data


def open_session(base: PathLike, safety: PathLike, experts: list[PathLike], layout: Optional[PathLike], lenient: bool = False) -> Session:
    """Opens B, S and the experts once (the first expert's config.json, or the base's for a LoRA
    expert, names the architecture)."""
    return Session(base, safety, experts, architecture=architecture(model_of(Path(experts[0]), Path(base))), layout=read_layout(layout), lenient=lenient)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, as the OS counts it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def inspect(model: PathLike, *, layout: Optional[PathLike] = None) -> dict[str, Any]:
    """Opens one model and describes it: detected layout, layers, and where every tensor belongs.

    Args:
        model: a Hugging Face folder or a ``.safetensors`` file.
        layout: a custom layout definition file (JSON, or TOML with a ``.toml`` name), overriding detection.

    Returns:
        ``{"layout", "description", "n_layers", "data_bytes", "shards", "tensors": [...]}``; each tensor
        has ``name``, ``dtype``, ``shape`` and ``place``: ``"Outside"``, ``"Vocab"`` (outside, with a
        vocabulary axis), ``{"Layer": {"layer", "part", "target"}}`` or ``{"Unassigned": {"layer"}}`` (in a
        layer but in no unit of the layout: a merge refuses those).
    """
    p = path_arg(model, "model")
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
    decision (the method, §2–§4, in the README's "How it works"). Reads the models once, writes nothing.

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
    base, safety, expert = path_arg(base, "base"), path_arg(safety, "safety"), path_arg(expert, "expert")
    callback_arg(progress, "progress")
    return open_session(base, safety, [expert], layout).analyze(opts, progress=progress)[0]


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
    config_from: Optional[PathLike] = None,
    emit: str = "model",
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
        force: replace an existing ``out`` if it is empty or an earlier output of this tool (it holds
            ``layerswap_report.json`` or ``layerswap_bulk.json``); anything else is refused untouched.
        config_from: a model folder whose config, processor and tokenizer files go to the output
            instead of the language expert's (for a language expert given as a bare ``.safetensors``).
        emit: ``"model"`` (default) writes a full model. ``"adapter"`` (both experts PEFT LoRA
            adapters) writes the merge as an exact PEFT adapter for ``base`` instead:
            ``adapter_model.safetensors`` and ``adapter_config.json`` (and the tokenizer).

    Returns:
        The report (also written to ``out/layerswap_report.json``).

    Raises:
        OutputExistsError, InvalidModelError, IncompatibleModelsError, MemoryBudgetError,
        InvalidOptionError, OSError (e.g. disk full), KeyboardInterrupt.
    """
    opts = _options(options, kwargs)
    base_p, safety_p, expert_p, out_p = (path_arg(base, "base"), path_arg(safety, "safety"), path_arg(expert, "expert"), path_arg(out, "out"))
    layout_p = path_arg(layout, "layout", optional=True)
    config_p = path_arg(config_from, "config_from", optional=True)
    flag_arg(force, "force")
    callback_arg(progress, "progress")
    if emit not in ("model", "adapter"):
        raise InvalidOptionError(f"emit must be 'model' or 'adapter', got {emit!r}")
    check_output(out_p, [base_p, safety_p, expert_p, layout_p, config_p], force)
    # Side files are checked before any work: a FIFO or dangling link fails now, not after the merge.
    plan_side_files(model_of(expert_p, base_p), _tokenizer_source(opts, (base_p, safety_p, expert_p)), config_p)
    started = time.perf_counter()
    session = open_session(base_p, safety_p, [expert_p], layout_p)
    if emit == "adapter":
        session.check_adapters(0)  # before the analyze pass, not after it
    with staged_output(out_p, force) as stage:
        plan = session.analyze(opts, progress=progress, for_write=True)[0]
        if emit == "adapter":
            write: Union[WriteSummary, dict[str, Any]] = session.emit_adapter(0, plan, stage, progress=progress)
        else:
            write = session.write(0, plan, stage, progress=progress)
        sources = session.sources
        report = finish_output(stage, plan, write, session.bytes_read, opts, (base_p, safety_p, expert_p), started,
                               config_from=config_p, sources={"safety": sources["safety"], "expert": sources["experts"][0]})
    return report


def _tokenizer_source(opts: MergeOptions, inputs: tuple[Path, Path, Path]) -> Path:
    base_p, safety_p, expert_p = inputs
    # A LoRA adapter's tokenizer is its own if it saved one, else the base model's.
    return tokenizer_of({"expert": expert_p, "base": base_p, "safety": safety_p}[opts.effective_tokenizer_from], base_p)


def finish_output(stage: Path, plan: Plan, write: Union[WriteSummary, dict[str, Any]], bytes_read: int, opts: MergeOptions,
                  inputs: tuple[Path, Path, Path], started: float, config_from: Optional[Path] = None,
                  sources: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Adds the side files (config from the expert, tokenizer per ``tokenizer_from``, or both from
    ``config_from``) and the report to a staged output whose shards the engine has written. Returns
    the report. A LoRA language expert stands for B + ΔW: the config is the base model's. An emitted
    adapter (``write`` lists its ``modules``) gets its adapter_config.json and the tokenizer only.
    ``sources`` (from the engine) says whether each expert is a full model or a LoRA adapter."""
    base_p, safety_p, expert_p = inputs
    if isinstance(write, WriteSummary):
        write = {"files": write.files, "tensors": write.tensors, "bytes_written": write.bytes_written, "expert_only": write.expert_only}
    side = plan_side_files(model_of(expert_p, base_p), _tokenizer_source(opts, inputs), config_from)
    adapter_out = "modules" in write
    if adapter_out:
        side.copies = [(src, name) for src, name in side.copies if name in TOKENIZER_FILES]
    side_files = copy_side_files(stage, side, opts.effective_out_dtype)
    if adapter_out:
        side_files.append(write_adapter_config(stage, write, base_p, safety_p, expert_p))
    notes = list(side.notes)
    for role, p in (("base", base_p), ("safety", safety_p), ("expert", expert_p)):
        ignored = [] if is_adapter(p) else ignored_model_files(p)
        if ignored:
            notes.append(f"{p}: ignored {', '.join(ignored)} (not this {role} model's weight files: only model.safetensors, "
                         "the shards its index names, or model-NNNNN-of-NNNNN.safetensors are)")
    report = {
        "tool": "layerswap-fast",
        "version": _core.__version__,
        "method": "layer-wise swapping (Shin & Hwang, EACL 2026)",
        "inputs": {"base": str(base_p), "safety": str(safety_p), "expert": str(expert_p),
                   **({"config_from": str(config_from)} if config_from is not None else {})},
        # Whether each expert is a full model or a LoRA adapter (rank), and where its sums come from.
        **({"sources": sources} if sources else {}),
        "parameters": {**opts.to_dict(), "out_dtype": opts.effective_out_dtype, "tokenizer_from": opts.effective_tokenizer_from,
                       "threads": opts.effective_threads},
        "layout": plan.layout,
        "n_layers": plan.n_layers,
        "granularity": plan.granularity,
        "numerics": opts.numerics,
        "counts": plan.counts(),
        "units": [u.to_dict() for u in plan.units],
        "output": {
            "files": sorted(Path(f).name for f in write["files"]) + sorted(side_files),
            "tensors": write["tensors"],
            "bytes_written": write["bytes_written"],
            **({"kind": "adapter", "modules": write["modules"], "modules_to_save": write["modules_to_save"]} if adapter_out
               else {"kind": "model"}),
        },
        "bytes_read": bytes_read,
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "notes": notes,
        "warnings": [
            f"tensor '{name}' is only in the language expert (not in the safety expert): copied from the language expert"
            for name in write.get("expert_only", [])
        ],
    }
    (stage / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report

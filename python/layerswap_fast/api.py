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
from layerswap_fast import card, page
from layerswap_fast.folder import CARD_FILE, PAGE_FILE, REPORT_FILE, architecture, check_output, copy_side_files, staged_output
from layerswap_fast.errors import InvalidOptionError, LayerswapError
from layerswap_fast.options import MergeOptions
from layerswap_fast.plan import Plan

PathLike = Union[str, os.PathLike]
#: ``progress(phase, done, total)``: phase is "analyze", "write" or "sync"; done/total in bytes.
ProgressCallback = Callable[[str, int, int], None]


def _options(options: Optional[MergeOptions], kwargs: dict[str, Any]) -> MergeOptions:
    if options is None:
        return MergeOptions(**kwargs)
    return options.replace(**kwargs) if kwargs else options


def _layout_json(layout: Optional[PathLike]) -> Optional[str]:
    """A custom layout file as the engine reads it: JSON as is; TOML (``.toml``) converted to JSON."""
    if layout is None:
        return None
    p = Path(layout)
    if p.suffix.lower() != ".toml":
        return p.read_text()
    import tomllib

    try:
        return json.dumps(tomllib.loads(p.read_text()))
    except tomllib.TOMLDecodeError as e:
        raise InvalidOptionError(f"{p}: not a valid TOML layout file ({e})") from None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, as the OS counts it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def inspect(model: PathLike, *, layout: Optional[PathLike] = None) -> dict[str, Any]:
    """Opens one model and describes it: detected layout, layers, and where every tensor belongs.

    Args:
        model: a Hugging Face folder or a ``.safetensors`` file.
        layout: a custom layout definition file (JSON), overriding detection.

    Returns:
        ``{"layout", "description", "n_layers", "data_bytes", "shards", "tensors": [...]}``; each tensor
        has ``name``, ``dtype``, ``shape`` and ``place``: ``"Outside"``, ``"Vocab"`` (outside, with a
        vocabulary axis), ``{"Layer": {"layer", "part", "target"}}`` or ``{"Unassigned": {"layer"}}`` (in a
        layer but in no unit of the layout: a merge refuses those).
    """
    p = Path(model)
    return json.loads(_core.inspect(str(p), architecture(p), _layout_json(layout)))


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
    out = json.loads(
        _core.analyze(str(base), str(safety), [str(expert)], [opts.to_engine_json()], architecture(Path(expert)), _layout_json(layout),
                      progress=progress)
    )
    return Plan.from_engine(out["plans"][0])


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
    language expert's config files, the tokenizer files of ``options.tokenizer_from``,
    ``layerswap_report.json``, its page ``layerswap_report.html`` and a model card ``README.md``. It is written beside ``out`` and renamed into place at the end: after a
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
    layout_json = _layout_json(layout)
    with staged_output(out_p, force) as stage:
        result = json.loads(
            _core.merge(
                str(base_p), str(safety_p), str(expert_p), str(stage), opts.to_engine_json(),
                architecture(expert_p), layout_json, progress,
            )
        )
        plan = Plan.from_engine(result["plan"])
        report = finish_output(stage, plan, result["write"], result["bytes_read"], opts, (base_p, safety_p, expert_p), started,
                               out_p, layout_json)
    return report


def describe_inputs(inputs: dict[str, Path], layout_json: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """Per input (base, safety, expert): its data size, shard count and detected layout, read from the
    safetensors headers (no tensor data). An input that cannot be described is listed by path alone."""
    out: dict[str, dict[str, Any]] = {}
    for role, p in inputs.items():
        try:
            info = json.loads(_core.inspect(str(p), architecture(p), layout_json))
            out[role] = {"bytes": info["data_bytes"], "shards": info["shards"], "layout": info["layout"]}
        except (LayerswapError, OSError, ValueError):
            out[role] = {}
    return out


def build_report(plan: Plan, opts: MergeOptions, inputs: tuple[Path, Path, Path], started: float,
                 layout_json: Optional[str] = None) -> dict[str, Any]:
    """The report of an analysis: tool, inputs (with sizes, shard counts and layouts), parameters and
    every unit's scores and decision. :func:`finish_output` adds what a merge wrote."""
    base_p, safety_p, expert_p = inputs
    return {
        "tool": "layerswap-fast",
        "version": _core.__version__,
        "method": "layer-wise swapping (Shin & Hwang, EACL 2026)",
        "inputs": {"base": str(base_p), "safety": str(safety_p), "expert": str(expert_p)},
        "input_files": describe_inputs({"base": base_p, "safety": safety_p, "expert": expert_p}, layout_json),
        "parameters": {**opts.to_dict(), "out_dtype": opts.effective_out_dtype, "tokenizer_from": opts.effective_tokenizer_from,
                       "threads": opts.effective_threads},
        "layout": plan.layout,
        "n_layers": plan.n_layers,
        "granularity": plan.granularity,
        "numerics": opts.numerics,
        "counts": plan.counts(),
        "units": plan.to_dict()["units"],
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def finish_output(stage: Path, plan: Plan, write: dict[str, Any], bytes_read: int, opts: MergeOptions,
                  inputs: tuple[Path, Path, Path], started: float, target: Optional[Path] = None,
                  layout_json: Optional[str] = None) -> dict[str, Any]:
    """Adds the side files (config from the expert, tokenizer per ``tokenizer_from``), the report, its
    HTML page and the model card to a staged output whose shards the engine has written. ``target`` is
    where the stage will be published (named in the card's commands). Returns the report."""
    base_p, safety_p, expert_p = inputs
    tok_source = {"expert": expert_p, "base": base_p, "safety": safety_p}[opts.effective_tokenizer_from]
    side_files = copy_side_files(stage, expert_p, tok_source)
    report = build_report(plan, opts, inputs, started, layout_json)
    report["output"] = {
        "path": str(target) if target is not None else None,
        "files": sorted(Path(f).name for f in write["files"]) + sorted(set(side_files) | {CARD_FILE, PAGE_FILE}),
        "tensors": write["tensors"],
        "bytes_written": write["bytes_written"],
    }
    report["bytes_read"] = bytes_read
    report["warnings"] = [
        f"tensor '{name}' is only in the language expert (not in the safety expert): copied from the language expert"
        for name in write.get("expert_only", [])
    ]
    report["seconds"] = round(time.perf_counter() - started, 3)
    (stage / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    # The card is written after the side files: a README.md the expert has never replaces it.
    (stage / PAGE_FILE).write_text(page.render(report), encoding="utf-8")
    (stage / CARD_FILE).write_text(card.render(report, card.read_front_matter(expert_p)), encoding="utf-8")
    return report

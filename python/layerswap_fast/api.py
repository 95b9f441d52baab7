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

from layerswap_fast import _core, decisions
from layerswap_fast.folder import REPORT_FILE, architecture, check_output, copy_side_files, staged_output
from layerswap_fast.errors import InvalidOptionError
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


def decide(plan: Plan, opts: MergeOptions, source: str = "measured") -> Plan:
    """The plan with the decision controls of ``opts`` applied (bands, then overrides in order), and
    every unit's ``alpha`` (for blends) and ``source`` filled in; ``source`` names where the plan's own
    decisions came from (``measured``, or ``file`` for a decisions file).

    Raises:
        InvalidOptionError: an override names a unit the model does not have, or bands do not fit.
    """
    d = plan.to_dict()
    d["units"] = decisions.apply(d["units"], n_layers=plan.n_layers, granularity=plan.granularity, alpha=opts.alpha,
                                 select=opts.select, bands=opts.bands, overrides=opts.overrides, source=source)
    return Plan.from_dict(d, plan.stats)


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
    return decide(Plan.from_engine(out["plans"][0]), opts)


def merge(
    base: Optional[PathLike],
    safety: PathLike,
    expert: PathLike,
    out: PathLike,
    *,
    options: Optional[MergeOptions] = None,
    layout: Optional[PathLike] = None,
    force: bool = False,
    progress: Optional[ProgressCallback] = None,
    decisions: Optional[PathLike] = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Merges the safety expert into the language expert and writes a Hugging Face folder at ``out``.

    The folder holds the merged safetensors shards (with an index when there is more than one), the
    language expert's config files, the tokenizer files of ``options.tokenizer_from`` and
    ``layerswap_report.json``. It is written beside ``out`` and renamed into place at the end: after a
    failure or Ctrl-C there is no ``out`` and no leftover. Inputs are only ever read.

    Args:
        base, safety, expert: model folders or ``.safetensors`` files of B, S and M. ``base`` may be
            None with ``decisions`` (no statistics pass runs, so B is not needed).
        out: the output folder; must not exist unless ``force``.
        options, layout, progress: as for :func:`analyze`; keyword arguments override option fields
            (``overrides={"3": "safety"}``, ``select="bands", bands=(2, 2, 1)`` included).
        force: replace an existing ``out``.
        decisions: a decisions file (the JSON ``analyze --json`` writes, possibly edited): merge exactly
            its decisions (per-unit α allowed), then ``options.overrides``. Its layout, granularity and
            layer count must match the models.

    Returns:
        The report (also written to ``out/layerswap_report.json``).

    Raises:
        OutputExistsError, InvalidModelError, IncompatibleModelsError, MemoryBudgetError,
        InvalidOptionError, OSError (e.g. disk full), KeyboardInterrupt.
    """
    opts = _options(options, kwargs)
    if base is None and decisions is None:
        raise InvalidOptionError("the base model is needed unless the decisions come from a file (decisions=...)")
    if decisions is not None and opts.select != "adaptive":
        raise InvalidOptionError("a decisions file already decides every unit; drop select 'bands' (overrides still apply)")
    if base is None and opts.effective_tokenizer_from == "base":
        raise InvalidOptionError("tokenizer_from 'base' needs the base model; pass it or choose the expert's tokenizer")
    safety_p, expert_p, out_p = Path(safety), Path(expert), Path(out)
    base_p = Path(base) if base is not None else None
    check_output(out_p, [p for p in (base_p, safety_p, expert_p) if p is not None], force)
    started = time.perf_counter()
    arch, layout_json = architecture(expert_p), _layout_json(layout)
    if decisions is not None:
        plan, opts = decided_plan(decisions, expert_p, opts, layout_json)
    elif not opts.overrides and opts.select == "adaptive":
        plan = None
    else:
        engine = json.loads(_core.analyze(str(base_p), str(safety_p), [str(expert_p)], [opts.to_engine_json()], arch, layout_json,
                                          progress=progress))
        plan = decide(Plan.from_engine(engine["plans"][0]), opts)
    with staged_output(out_p, force) as stage:
        if plan is None:
            # The paper's rule alone: one engine call measures, decides and writes.
            result = json.loads(_core.merge(str(base_p), str(safety_p), str(expert_p), str(stage), opts.to_engine_json(), arch,
                                            layout_json, progress))
            plan = decide(Plan.from_engine(result["plan"]), opts)
            write, bytes_read = result["write"], result["bytes_read"]
        else:
            # B is only checked by the write pass; without it (a decisions file) S stands in for the
            # check, which then only asks again what S and M must satisfy anyway.
            write = json.loads(_core.write(str(base_p or safety_p), str(safety_p), str(expert_p), str(stage),
                                                json.dumps(plan.to_dict(with_stats=True)), arch, layout_json, True, progress))
            bytes_read = 0
        report = finish_output(stage, plan, write, bytes_read, opts, (base_p, safety_p, expert_p), started)
    return report


def decided_plan(path: PathLike, expert: Path, opts: MergeOptions, layout_json: Optional[str]) -> tuple[Plan, MergeOptions]:
    """The plan a decisions file describes, checked against the language expert's layout and layer
    count, with ``opts.overrides`` applied on top; and the options with the file's granularity."""
    data = decisions.load_decisions(path)
    info = json.loads(_core.inspect(str(expert), architecture(expert), layout_json))
    if (data["layout"], data["n_layers"]) != (info["layout"], info["n_layers"]):
        raise InvalidOptionError(
            f"{path}: the decisions are for a {data['n_layers']}-layer '{data['layout']}' model, but {expert} is a "
            f"{info['n_layers']}-layer '{info['layout']}' model"
        )
    opts = opts.replace(granularity=data["granularity"])
    engine_options = json.loads(opts.to_engine_json())
    plan = Plan.from_dict({"options": engine_options, "layout": data["layout"], "n_layers": data["n_layers"], "units": data["units"]})
    return decide(plan, opts, source="file"), opts


def finish_output(stage: Path, plan: Plan, write: dict[str, Any], bytes_read: int, opts: MergeOptions,
                  inputs: tuple[Optional[Path], Path, Path], started: float) -> dict[str, Any]:
    """Adds the side files (config from the expert, tokenizer per ``tokenizer_from``) and the report to
    a staged output whose shards the engine has written. Returns the report."""
    base_p, safety_p, expert_p = inputs
    tok_source = {"expert": expert_p, "base": base_p, "safety": safety_p}[opts.effective_tokenizer_from]
    assert tok_source is not None, "merge refuses tokenizer_from='base' without the base model"
    side_files = copy_side_files(stage, expert_p, tok_source)
    report = {
        "tool": "layerswap-fast",
        "version": _core.__version__,
        "method": "layer-wise swapping (Shin & Hwang, EACL 2026)",
        "inputs": {"base": str(base_p) if base_p is not None else None, "safety": str(safety_p), "expert": str(expert_p)},
        "parameters": {**opts.to_dict(), "out_dtype": opts.effective_out_dtype, "tokenizer_from": opts.effective_tokenizer_from,
                       "threads": opts.effective_threads},
        "layout": plan.layout,
        "n_layers": plan.n_layers,
        "granularity": plan.granularity,
        "numerics": opts.numerics,
        "counts": plan.counts(),
        "units": plan.to_dict()["units"],
        "output": {
            "files": sorted(Path(f).name for f in write["files"]) + sorted(side_files),
            "tensors": write["tensors"],
            "bytes_written": write["bytes_written"],
        },
        "bytes_read": bytes_read,
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "warnings": [
            f"tensor '{name}' is only in the language expert (not in the safety expert): copied from the language expert"
            for name in write.get("expert_only", [])
        ],
    }
    (stage / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report

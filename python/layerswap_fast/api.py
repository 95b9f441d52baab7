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

from layerswap_fast import _core, card, decisions, hub, page
from layerswap_fast._core import Plan, Session, WriteSummary
from layerswap_fast.folder import (CARD_FILE, PAGE_FILE, REPORT_FILE, TOKENIZER_FILES, architecture, check_output, copy_side_files, ignored_model_files, plan_side_files,
                                   staged_output)
from layerswap_fast.errors import InvalidModelError, InvalidOptionError, LayerswapError
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


def open_session(base: Path, safety: Path, experts: list[Path], layout: Optional[dict[str, Any]], lenient: bool = False) -> Session:
    """Opens B, S and the experts once (the open stage), for the analysis and every write of a run.
    The first expert's config.json (the base model's for a LoRA expert) names the architecture."""
    return Session(base, safety, experts, architecture=architecture(model_of(experts[0], base)), layout=layout, lenient=lenient)


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
    return Plan.from_dict(d, list(plan.stats))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, as the OS counts it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def inspect(model: PathLike, *, layout: Optional[PathLike] = None) -> dict[str, Any]:
    """Opens one model and describes it: detected layout, layers, and where every tensor belongs.

    Args:
        model: a Hugging Face folder, a ``.safetensors`` file or a hub id ``org/name[@REVISION]``.
        layout: a custom layout definition file (JSON, or TOML with a ``.toml`` name), overriding detection.

    Returns:
        ``{"layout", "description", "n_layers", "data_bytes", "shards", "tensors": [...]}``; each tensor
        has ``name``, ``dtype``, ``shape`` and ``place``: ``"Outside"``, ``"Vocab"`` (outside, with a
        vocabulary axis), ``{"Layer": {"layer", "part", "target"}}`` or ``{"Unassigned": {"layer"}}`` (in a
        layer but in no unit of the layout: a merge refuses those).
    """
    p = hub.resolve(path_arg(model, "model")).path
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
        base, safety, expert: model folders, ``.safetensors`` files or hub ids (``org/name[@REVISION]``,
            looked up in the hub cache; an existing local path wins) of B, S and M.
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
    base_p, safety_p, expert_p = (hub.resolve(path_arg(m, role)).path for m, role in ((base, "base"), (safety, "safety"), (expert, "expert")))
    callback_arg(progress, "progress")
    session = open_session(base_p, safety_p, [expert_p], read_layout(layout))
    return decide(session.analyze(opts, progress=progress)[0], opts)


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
    config_from: Optional[PathLike] = None,
    emit: str = "model",
    decisions: Optional[PathLike] = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Merges the safety expert into the language expert and writes a Hugging Face folder at ``out``.

    The folder holds the merged safetensors shards (with an index when there is more than one), the
    language expert's config files, the tokenizer files of ``options.tokenizer_from`` and
    ``layerswap_report.json``. It is written beside ``out`` and renamed into place at the end: after a
    failure or Ctrl-C there is no ``out`` and no leftover. Inputs are only ever read.

    Args:
        base, safety, expert: model folders, ``.safetensors`` files or hub ids of B, S and M (as for
            :func:`analyze`); the report records each hub id with the commit it resolved to. ``base``
            may be None with ``decisions`` (no analyze pass runs, so B is not needed).
        out: the output folder; must not exist unless ``force``.
        options, layout, progress: as for :func:`analyze`; keyword arguments override option fields
            (``overrides={"3": "safety"}``, ``select="bands", bands=(2, 2, 1)`` included).
        force: replace an existing ``out`` if it is empty or an earlier output of this tool (it holds
            ``layerswap_report.json`` or ``layerswap_bulk.json``); anything else is refused untouched.
        config_from: a model folder whose config, processor and tokenizer files go to the output
            instead of the language expert's (for a language expert given as a bare ``.safetensors``).
        emit: ``"model"`` (default) writes a full model. ``"adapter"`` (both experts PEFT LoRA
            adapters) writes the merge as an exact PEFT adapter for ``base`` instead:
            ``adapter_model.safetensors`` and ``adapter_config.json`` (and the tokenizer).
        decisions: a decisions file (the JSON ``analyze --json`` writes, possibly edited): merge exactly
            its decisions (per-unit α allowed), then ``options.overrides``. Its layout and layer count
            must match the models; its granularity is the run's.

    Returns:
        The report (also written to ``out/layerswap_report.json``).

    Raises:
        OutputExistsError, InvalidModelError, IncompatibleModelsError, MemoryBudgetError,
        InvalidOptionError, OSError (e.g. disk full), KeyboardInterrupt.
    """
    opts = _options(options, kwargs)
    sources = {role: hub.resolve(path_arg(m, role)) for role, m in (("base", base), ("safety", safety), ("expert", expert))
               if m is not None or role != "base" or decisions is None}
    base_p = sources["base"].path if "base" in sources else None
    safety_p, expert_p, out_p = sources["safety"].path, sources["expert"].path, path_arg(out, "out")
    layout_p = path_arg(layout, "layout", optional=True)
    config_p = path_arg(config_from, "config_from", optional=True)
    decisions_p = path_arg(decisions, "decisions", optional=True)
    flag_arg(force, "force")
    callback_arg(progress, "progress")
    if emit not in ("model", "adapter"):
        raise InvalidOptionError(f"emit must be 'model' or 'adapter', got {emit!r}")
    controlled = decisions_p is not None or bool(opts.overrides) or opts.select != "adaptive"
    if controlled and emit != "model":
        raise InvalidOptionError("emit='adapter' writes the measured decisions only; drop overrides, bands and decisions files, "
                                 "or write a full model")
    if decisions_p is not None and opts.select != "adaptive":
        raise InvalidOptionError("a decisions file already decides every unit; drop select 'bands' (overrides still apply)")
    if base_p is None and (opts.effective_tokenizer_from == "base" or is_adapter(expert_p) or is_adapter(safety_p)):
        raise InvalidOptionError("the base model is needed here (a LoRA adapter expert, or tokenizer_from 'base'); pass it")
    check_output(out_p, [p for p in (base_p, safety_p, expert_p, layout_p, config_p, decisions_p) if p is not None], force)
    # Side files are checked before any work: a FIFO or dangling link fails now, not after the merge.
    plan_side_files(model_of(expert_p, base_p) if base_p is not None else expert_p, _tokenizer_source(opts, (base_p, safety_p, expert_p)),
                    config_p)
    started = time.perf_counter()
    layout_def = read_layout(layout)
    # The open stage, once: the analysis and the write read the files this opening checked, and the
    # write refuses to finish if one of them changed since. B is only checked by the write stage;
    # without it (a decisions file) S stands in for that check, which then asks again only what S and
    # M must satisfy anyway.
    session = open_session(base_p if base_p is not None else safety_p, safety_p, [expert_p], layout_def)
    if emit == "adapter":
        session.check_adapters(0)  # before the analyze stage, not after it
    plan: Optional[Plan] = None
    if decisions_p is not None:
        # (an adapter expert has its base model's layout and layers)
        plan, opts = decided_plan(decisions_p, expert_p, session, opts)
    with staged_output(out_p, force) as stage:
        written = plan
        if plan is None:
            measured = session.analyze(opts, progress=progress, for_write=True)[0]
            plan = decide(measured, opts)
            # The paper's rule alone writes the engine's plan as measured; decision control its own.
            written = plan if controlled else measured
        assert written is not None
        if emit == "adapter":
            write: Union[WriteSummary, dict[str, Any]] = session.emit_adapter(0, written, stage, progress=progress)
        else:
            write = session.write(0, written, stage, progress=progress)
        kinds = session.sources
        report = finish_output(stage, plan, write, session.bytes_read, opts, (base_p, safety_p, expert_p), started, config_from=config_p,
                               sources={"safety": kinds["safety"], "expert": kinds["experts"][0]} if base_p is not None else None,
                               hub_inputs=hub.hub_report(sources), target=out_p, layout=layout_def)
    return report


def decided_plan(path: Path, expert: Path, session: Session, opts: MergeOptions) -> tuple[Plan, MergeOptions]:
    """The plan a decisions file describes, checked against the layout and layer count of the
    session's models, with ``opts.overrides`` applied on top; and the options with the file's
    granularity."""
    data = decisions.load_decisions(path)
    if (data["layout"], data["n_layers"]) != (session.layout, session.n_layers):
        raise InvalidOptionError(
            f"{path}: the decisions are for a {data['n_layers']}-layer '{data['layout']}' model, but {expert} is a "
            f"{session.n_layers}-layer '{session.layout}' model"
        )
    opts = opts.replace(granularity=data["granularity"])
    plan = Plan.from_dict({"options": opts, "layout": data["layout"], "n_layers": data["n_layers"], "units": data["units"]})
    return decide(plan, opts, source="file"), opts


def _tokenizer_source(opts: MergeOptions, inputs: tuple[Optional[Path], Path, Path]) -> Path:
    base_p, safety_p, expert_p = inputs
    # A LoRA adapter's tokenizer is its own if it saved one, else the base model's.
    source = {"expert": expert_p, "base": base_p, "safety": safety_p}[opts.effective_tokenizer_from]
    assert source is not None, "merge refuses tokenizer_from='base' without the base model"
    return tokenizer_of(source, base_p) if base_p is not None else source


def describe_inputs(inputs: dict[str, Optional[Path]], layout: Optional[dict[str, Any]] = None) -> dict[str, dict[str, Any]]:
    """Per input (base, safety, expert): its data size, shard count and detected layout, read from the
    safetensors headers (no tensor data). An input that cannot be described (e.g. a LoRA adapter) gets
    an empty entry."""
    out: dict[str, dict[str, Any]] = {}
    for role, p in inputs.items():
        if p is None:  # no base model (a merge from a decisions file)
            out[role] = {}
            continue
        try:
            info = _core.inspect(p, architecture(p), layout)
            out[role] = {"bytes": info["data_bytes"], "shards": info["shards"], "layout": info["layout"]}
        except (LayerswapError, OSError, ValueError):
            out[role] = {}
    return out


def build_report(plan: Plan, opts: MergeOptions, inputs: tuple[Optional[Path], Path, Path], started: float,
                 layout: Optional[dict[str, Any]] = None, config_from: Optional[Path] = None) -> dict[str, Any]:
    """The report of an analysis: tool, inputs (with sizes, shard counts and layouts), parameters and
    every unit's scores and decision. :func:`finish_output` adds what a merge wrote."""
    base_p, safety_p, expert_p = inputs
    return {
        "tool": "layerswap-fast",
        "version": _core.__version__,
        "method": "layer-wise swapping (Shin & Hwang, EACL 2026)",
        "inputs": {"base": str(base_p) if base_p is not None else None, "safety": str(safety_p), "expert": str(expert_p),
                   **({"config_from": str(config_from)} if config_from is not None else {})},
        "input_files": describe_inputs({"base": base_p, "safety": safety_p, "expert": expert_p}, layout),
        # As the JSON file holds them (tuples as lists), so that a page made now equals one made from the file.
        "parameters": json.loads(json.dumps({**opts.to_dict(), "out_dtype": opts.effective_out_dtype,
                                             "tokenizer_from": opts.effective_tokenizer_from, "threads": opts.effective_threads})),
        "layout": plan.layout,
        "n_layers": plan.n_layers,
        "granularity": plan.granularity,
        "numerics": opts.numerics,
        "counts": plan.counts(),
        "units": plan.to_dict()["units"],
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def finish_output(stage: Path, plan: Plan, write: Union[WriteSummary, dict[str, Any]], bytes_read: int, opts: MergeOptions,
                  inputs: tuple[Optional[Path], Path, Path], started: float, config_from: Optional[Path] = None,
                  sources: Optional[dict[str, Any]] = None, hub_inputs: Optional[dict[str, dict[str, str]]] = None,
                  target: Optional[Path] = None, layout: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Adds the side files (config from the expert, tokenizer per ``tokenizer_from``, or both from
    ``config_from``), the report, its HTML page and the model card to a staged output whose shards the
    engine has written. ``target`` is where the stage will be published (named in the card's
    commands). Returns the report. A LoRA language expert stands for B + ΔW: the config is the base model's. An emitted
    adapter (``write`` lists its ``modules``) gets its adapter_config.json and the tokenizer only.
    ``sources`` (from the engine) says whether each expert is a full model or a LoRA adapter.
    ``hub_inputs`` (role -> ``{"id", "revision", "commit"}``, see :func:`hub.hub_report`) becomes the
    report's ``"hub"``."""
    base_p, safety_p, expert_p = inputs
    if isinstance(write, WriteSummary):
        write = write.to_dict()
    side = plan_side_files(model_of(expert_p, base_p) if base_p is not None else expert_p, _tokenizer_source(opts, inputs), config_from)
    adapter_out = "modules" in write
    if adapter_out:
        side.copies = [(src, name) for src, name in side.copies if name in TOKENIZER_FILES]
    side_files = copy_side_files(stage, side, opts.effective_out_dtype)
    if adapter_out:
        side_files.append(write_adapter_config(stage, write, base_p, safety_p, expert_p))
    notes = list(side.notes)
    for role, p in (("base", base_p), ("safety", safety_p), ("expert", expert_p)):
        if p is None:
            continue
        ignored = [] if is_adapter(p) else ignored_model_files(p)
        if ignored:
            notes.append(f"{p}: ignored {', '.join(ignored)} (not this {role} model's weight files: only model.safetensors, "
                         "the shards its index names, or model-NNNNN-of-NNNNN.safetensors are)")
    report = build_report(plan, opts, inputs, started, layout, config_from)
    if sources:  # whether each expert is a full model or a LoRA adapter (rank), and where its sums come from
        report["sources"] = sources
    if hub_inputs:  # inputs named by hub id: id, revision and the commit they resolved to (for an exact rerun)
        report["hub"] = hub_inputs
    report["output"] = {
        "path": str(target) if target is not None else None,
        "files": sorted(Path(f).name for f in write["files"]) + sorted(set(side_files) | {CARD_FILE, PAGE_FILE}),
        "tensors": write["tensors"],
        "bytes_written": write["bytes_written"],
        # Shared with the inputs' blocks instead of written (copy-on-write file systems only).
        "bytes_cloned": write.get("bytes_cloned", 0),
        **({"kind": "adapter", "modules": write["modules"], "modules_to_save": write["modules_to_save"]} if adapter_out
           else {"kind": "model"}),
    }
    report["bytes_read"] = bytes_read
    report["notes"] = notes
    report["warnings"] = [
        f"tensor '{name}' is only in the language expert (not in the safety expert): copied from the language expert"
        for name in write.get("expert_only", [])
    ]
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["peak_rss_bytes"] = peak_rss_bytes()
    (stage / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (stage / PAGE_FILE).write_text(page.render(report), encoding="utf-8")
    # Written after the side files: a README.md of the expert's never replaces this card, and its front
    # matter gives the card its license and language.
    (stage / CARD_FILE).write_text(card.render(report, card.read_front_matter(expert_p)), encoding="utf-8")
    return report

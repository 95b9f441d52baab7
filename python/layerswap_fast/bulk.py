"""Bulk merging: one safety expert into many language experts.

One analyze pass reads the base and the safety expert once for all experts (and each expert once);
then every expert gets its own decisions and its own write pass, into ``OUT/<name>/``. A manifest
(``OUT/layerswap_bulk.json``) records finished outputs with checksums (XXH3 of 8 MiB blocks), so a rerun skips experts whose
output is verified intact and redoes the rest. One expert failing does not stop the others.

Executors: ``local`` (default) opens every model once (one :class:`Session`), runs the statistics
pass and then the write passes one after another on that opening, in this process (each uses all
cores): a file changed between the passes makes its write fail, naming it. ``ray`` splits the
analyze pass into Ray tasks (one reads B and S, each other one reads B and one language expert; the
plans are made on the driver from the sums they return, which carry the stamps of the files read) and
runs one write task per expert, which refuses files whose stamps differ from those the sums were
computed on; on the cluster named by the usual ``RAY_ADDRESS`` environment variable (or a local
instance on 127.0.0.1), assuming the inputs and ``OUT`` are on a filesystem every node sees at the
same paths. Both give the same bytes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from layerswap_fast import _core, hub
from layerswap_fast._core import Plan, Session, Sums, TensorStats
from layerswap_fast.api import ProgressCallback, _tokenizer_source, decide, finish_output, open_session, read_layout
from layerswap_fast.errors import InvalidOptionError, LayerswapError, OutputExistsError
from layerswap_fast import page
from layerswap_fast.folder import (BULK_MANIFEST, BULK_PAGE_FILE, PAGE_FILE, REPORT_FILE, write_text_atomic, OUTPUT_MARKERS, architecture, check_not_input, clear_stale, commit_stage,
                                   discard_stage, new_stage, plan_side_files, replace_refusal)
from layerswap_fast.lora import model_of
from layerswap_fast.options import MergeOptions, callback_arg, flag_arg, path_arg, toml

MANIFEST = BULK_MANIFEST
SUMMARY = "layerswap_bulk_summary.json"
#: Files this tool writes (or may write) in OUT beside the experts' folders: no expert may be named
#: like one of them, nor like anything starting with "layerswap" (compared without case, as on
#: case-insensitive filesystems). Writers of new OUT files add their names here.
OWN_FILES = [MANIFEST, SUMMARY, BULK_PAGE_FILE, "report.html", "README.md"]
EXECUTORS = ("local", "ray")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PathLike = Union[str, "os.PathLike[str]"]
#: One expert's write: its index among the session's experts as given, its spec, its plan and what
#: the engine said of its models (full or LoRA).
Job = tuple[int, "ExpertSpec", Plan, dict[str, Any]]


@dataclass(frozen=True)
class ExpertSpec:
    """One language expert of a bulk run: its output name, its model, and its own options.
    ``config_from`` is a model folder whose config, processor and tokenizer files its output takes (for
    an expert given as a bare ``.safetensors`` file), as ``merge(config_from=)`` does."""

    name: str
    path: Path
    options: MergeOptions = field(default_factory=MergeOptions)
    config_from: Optional[Path] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InvalidOptionError(f"expert name {self.name!r} must be letters, digits, '_', '-' or '.', starting with a letter or digit")
        reserved = {n.lower() for n in OWN_FILES}
        if self.name.lower() in reserved or self.name.lower().startswith("layerswap"):
            raise InvalidOptionError(f"expert name {self.name!r} is the name of a file layerswap-fast writes in the output folder; choose another")
        object.__setattr__(self, "path", path_arg(self.path, f"path of expert {self.name!r}"))
        object.__setattr__(self, "config_from", path_arg(self.config_from, f"config_from of expert {self.name!r}", optional=True))
        if not isinstance(self.options, MergeOptions):
            raise InvalidOptionError(f"expert {self.name!r}: options must be MergeOptions, not {type(self.options).__name__}")


@dataclass(frozen=True)
class BulkSpec:
    """What a bulk file describes: base, safety, experts (and optionally where outputs go)."""

    base: Path
    safety: Path
    experts: tuple[ExpertSpec, ...]
    out: Optional[Path] = None


def load_bulk_file(path: PathLike, defaults: Optional[MergeOptions] = None) -> BulkSpec:
    """Reads a bulk file (the CLI's ``--plan``): TOML (``.toml``) or YAML (``.yaml``/``.yml``, needs PyYAML).

    Format (paths relative to the file)::

        base = "base/"
        safety = "safety/"
        out = "merged/"            # optional
        config_from = "model/"     # optional: side files for every expert given as a bare .safetensors file
        [defaults]                 # optional: any MergeOptions field
        granularity = "module"
        [experts.ko]
        path = "expert-ko/"
        tau = 0.002                # per-expert overrides
        [experts.sw]
        path = "expert-sw/"
        overrides = { "3" = "safety", "2.mlp" = "blend:0.25" }   # decision control per expert
        [experts.te]
        path = "expert-te/"
        select = "bands"
        bands = [2, 2, 1]
        [experts.ar]
        path = "ar.safetensors"
        config_from = "ar-model/"  # this expert's side files (overrides the top-level one)
    """
    p = Path(path)
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InvalidOptionError(f"{p}: YAML bulk files need PyYAML (pip install pyyaml); TOML needs nothing") from None
        data = yaml.safe_load(text)
    else:
        tomllib = toml()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InvalidOptionError(f"{p}: not valid TOML ({e})") from None
    if not isinstance(data, dict):
        raise InvalidOptionError(f"{p}: expected a table with base, safety and experts")
    for key in ("base", "safety", "experts"):
        if key not in data:
            raise InvalidOptionError(f"{p}: missing '{key}'")
    unknown = set(data) - {"base", "safety", "experts", "defaults", "out", "config_from"}
    if unknown:
        raise InvalidOptionError(f"{p}: unknown keys {sorted(unknown)} (allowed: base, safety, out, config_from, defaults, experts)")
    root = p.parent
    shared_config = root / str(data["config_from"]) if data.get("config_from") else None
    base_opts = defaults or MergeOptions()
    try:
        common = base_opts.replace(**data.get("defaults", {}))
        experts = []
        for name, spec in data["experts"].items():
            spec = dict(spec) if isinstance(spec, dict) else {"path": spec}
            if "path" not in spec:
                raise InvalidOptionError(f"{p}: expert '{name}' has no path")
            epath = _bulk_path(root, spec.pop("path"))
            own = spec.pop("config_from", None)
            config_from = root / str(own) if own else shared_config if epath.is_file() else None
            experts.append(ExpertSpec(name, epath, common.replace(**spec) if spec else common, config_from))
    except TypeError as e:
        raise InvalidOptionError(f"{p}: {e}") from None
    out = root / data["out"] if data.get("out") else None
    return BulkSpec(_bulk_path(root, data["base"]), _bulk_path(root, data["safety"]), tuple(experts), out)


def _bulk_path(root: Path, value: Any) -> Path:
    """A model named in a bulk file: a path relative to the file, or a hub id when no such path exists."""
    local = root / str(value)
    if not (local.exists() or local.is_symlink()) and hub.looks_like_hub_id(str(value)):
        return Path(str(value))
    return local


# --- checksums and the manifest ---------------------------------------------------------------------


def checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """size and checksum of every file in an output folder (the engine hashes in parallel blocks)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    digests = _core.checksums([str(p) for p in files], os.cpu_count() or 1)
    return {p.name: {"size": p.stat().st_size, "checksum": d} for p, d in zip(files, digests)}


def _verified(folder: Path, entry: dict[str, Any]) -> bool:
    files = entry.get("files") or {}
    if not folder.is_dir() or not files:
        return False
    present = {p.name for p in folder.iterdir() if p.is_file()}
    if present != set(files):
        return False
    if any((folder / n).stat().st_size != f["size"] for n, f in files.items()):
        return False
    return checksums(folder) == files


def _read_manifest(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / MANIFEST).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("experts"), dict) else {"experts": {}}
    except (OSError, ValueError):
        return {"experts": {}}


def _write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# --- one expert's write pass (runs locally or as a Ray task) ---------------------------------------


def _write_stage(session: Session, shared: tuple[Path, Path], job: Job, target: Path, layout: Optional[dict[str, Any]], sync: bool,
                 progress: Optional[ProgressCallback], hub_inputs: Optional[dict[str, dict[str, str]]] = None) -> tuple[Path, dict[str, Any]]:
    """Writes one expert's output (engine shards, side files, report) into a fresh staging folder
    beside ``target``, on the run's session; returns the stage and the report. On any error the stage
    is removed."""
    index, e, plan, sources = job
    started = time.perf_counter()
    stage = new_stage(target)
    try:
        before = session.bytes_read
        write = session.write(index, plan, stage, sync=sync, progress=progress)
        report = finish_output(stage, plan, write, session.bytes_read - before, e.options, (*shared, e.path), started,
                               config_from=e.config_from, sources=sources, hub_inputs=hub_inputs, target=target, layout=layout)
        return stage, report
    except BaseException:
        discard_stage(stage)
        raise


# --- the bulk run ----------------------------------------------------------------------------------


def bulk_merge(
    base: PathLike,
    safety: PathLike,
    experts: Iterable[ExpertSpec],
    out: PathLike,
    *,
    layout: Optional[PathLike] = None,
    executor: str = "local",
    force: bool = False,
    saved_stats: Optional[PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    on_expert: Optional[Callable[[str, dict[str, Any]], None]] = None,
) -> dict[str, Any]:
    """Merges the safety expert into every expert, writing ``out/<name>/`` for each.

    Args:
        base, safety: model folders or files of B and S, or hub ids (``org/name[@REVISION]``).
        experts: :class:`ExpertSpec` per language expert (name, path or hub id, options). An expert
            whose hub id cannot be resolved fails alone.
        out: parent folder of the outputs (created if needed); holds the manifest and summary.
        layout: custom layout definition file.
        executor: ``local`` or ``ray``.
        force: redo experts even if the manifest says they are finished, and replace outputs that exist
            without a manifest entry.
        saved_stats: a file from ``analyze --save-stats`` (or :func:`save_stats`): the safety expert's
            statistics are taken from it instead of reading S in the analyze pass.
        progress: engine progress callback.
        on_expert: called with (name, entry) as each expert finishes, fails or is skipped.

    Returns:
        The summary (also written to ``out/layerswap_bulk_summary.json``): per expert status, decisions,
        time, and the cross-language table of decisions per unit.
    """
    if not isinstance(executor, str) or executor not in EXECUTORS:
        raise InvalidOptionError(f"executor must be one of {', '.join(EXECUTORS)}; got {executor!r}")
    if isinstance(experts, (str, bytes, os.PathLike)) or not isinstance(experts, Iterable):
        raise TypeError(f"experts must be a list of ExpertSpec, not {type(experts).__name__} {experts!r}")
    specs = list(experts)
    if not specs:
        raise InvalidOptionError("no language experts given")
    for e in specs:
        if not isinstance(e, ExpertSpec):
            raise InvalidOptionError(f"experts must be ExpertSpec values, not {type(e).__name__}")
    names = [e.name for e in specs]
    if len({n.lower() for n in names}) != len(names):
        raise InvalidOptionError(f"expert names must be unique (without regard to case); got {names}")
    base_p, safety_p, out_p = path_arg(base, "base"), path_arg(safety, "safety"), path_arg(out, "out")
    flag_arg(force, "force")
    callback_arg(progress, "progress")
    callback_arg(on_expert, "on_expert")
    hub_ids = _resolve(base_p, safety_p, specs)
    base_p, safety_p, specs = hub_ids.base, hub_ids.safety, hub_ids.specs
    inputs = [base_p, safety_p, *(e.path for e in specs), *(e.config_from for e in specs if e.config_from is not None),
              path_arg(layout, "layout", optional=True),
              path_arg(saved_stats, "saved_stats", optional=True)]
    check_bulk_out(out_p, inputs)
    created = not out_p.exists()
    published: list[str] = []
    try:
        summary = _bulk_run(base_p, safety_p, specs, out_p, layout, executor, force, saved_stats, progress, on_expert, published, hub_ids)
    except KeyboardInterrupt as interrupted:
        # Say truthfully what exists now: the outputs published (and recorded in the manifest)
        # before the interruption; whatever was being written is gone.
        interrupted.written = (  # type: ignore[attr-defined]
            f"published before the interruption: {', '.join(str(out_p / n) for n in published)} (recorded in {out_p / MANIFEST}); "
            f"not written: {', '.join(n for n in names if n not in published) or 'none'}"
            if published else "no expert's output was written"
        )
        _remove_if_unused(out_p, created, published)
        raise
    except BaseException:
        _remove_if_unused(out_p, created, published)
        raise
    if not published:
        _remove_if_unused(out_p, created, published)
    return summary


@dataclass(frozen=True)
class _HubIds:
    """A bulk run's models after hub ids were resolved (see :mod:`layerswap_fast.hub`)."""

    base: Path
    safety: Path
    #: The experts, each with its local folder (an expert whose id did not resolve keeps its id).
    specs: list[ExpertSpec]
    #: Each expert's model as the user gave it (path or hub id), for the manifest.
    given: dict[str, str]
    #: Per expert, the report's "hub" entry (ids and commits of its inputs from the hub).
    reports: dict[str, dict[str, dict[str, str]]]
    #: Experts whose hub id could not be resolved: their failure entries (the others still run).
    unresolved: dict[str, dict[str, Any]]


def _resolve(base: Path, safety: Path, specs: list[ExpertSpec]) -> _HubIds:
    """Resolves hub ids among the models (local paths stay as they are). B and S must resolve; an
    expert that does not fails alone."""
    shared = {"base": hub.resolve(base), "safety": hub.resolve(safety)}
    resolved, reports, unresolved = [], {}, {}
    for e in specs:
        try:
            src = hub.resolve(e.path)
        except LayerswapError as err:
            unresolved[e.name] = _failure(err)
            resolved.append(e)
            continue
        reports[e.name] = hub.hub_report({**shared, "expert": src})
        resolved.append(dataclasses.replace(e, path=src.path))
    return _HubIds(shared["base"].path, shared["safety"].path, resolved, {e.name: str(e.path) for e in specs}, reports, unresolved)


def check_bulk_out(out: Path, inputs: list[Optional[Path]]) -> None:
    """OUT of a bulk run must not overlap any input, and must be new, empty, or an earlier bulk
    output (it holds layerswap_bulk.json): a bulk run adds folders and files there."""
    check_not_input(out, inputs)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputExistsError(f"{out}: exists and is not a folder")
        names = {p.name for p in out.iterdir()}
        if names and not names & {MANIFEST, SUMMARY}:
            hint = " (it is a single merge's output; give a new OUT)" if set(OUTPUT_MARKERS) & names else ""
            raise OutputExistsError(f"{out}: is not empty and not an output of a bulk run (no {MANIFEST}){hint}; nothing in it was touched")


def _remove_if_unused(out: Path, created: bool, published: list[str]) -> None:
    """A run that created OUT and published nothing leaves no OUT (only its own files are removed)."""
    if not created or published or not out.is_dir():
        return
    for name in (SUMMARY, MANIFEST, BULK_PAGE_FILE):
        with contextlib.suppress(OSError):
            (out / name).unlink()
    with contextlib.suppress(OSError):
        out.rmdir()


def _bulk_run(base_p: Path, safety_p: Path, specs: list[ExpertSpec], out_p: Path, layout: Optional[PathLike], executor: str,
              force: bool, saved_stats: Optional[PathLike], progress: Optional[ProgressCallback],
              on_expert: Optional[Callable[[str, dict[str, Any]], None]], published: list[str], hub_ids: "_HubIds") -> dict[str, Any]:
    names = [e.name for e in specs]
    entries: dict[str, dict[str, Any]] = dict(hub_ids.unresolved)
    for name, entry in entries.items():
        _notify(on_expert, name, entry)
    manifest = _read_manifest(out_p)
    layout_def = read_layout(layout)
    todo: list[ExpertSpec] = []
    for e in specs:
        if e.name in entries:  # its hub id did not resolve
            continue
        old = manifest["experts"].get(e.name)
        target = out_p / e.name
        if not force and old and old.get("status") == "ok" and _same_output(old.get("options"), e.options) and _verified(target, old):
            entries[e.name] = {**old, "status": "skipped", "note": "finished earlier; output verified against the manifest"}
            _notify(on_expert, e.name, entries[e.name])
            continue
        refusal = replace_refusal(target) if target.exists() or target.is_symlink() else None
        if target.exists() and not force and not (old and old.get("status") == "ok"):
            refusal = "exists and is not a finished output of this run (use --force to replace it)"
        if refusal:
            entries[e.name] = {"status": "failed", "error": f"{target}: {refusal}", "kind": "OutputExistsError"}
            _notify(on_expert, e.name, entries[e.name])
            continue
        try:  # a side file that is a FIFO or a dangling link fails this expert now, not after its merge
            plan_side_files(model_of(e.path, base_p), _tokenizer_source(e.options, (base_p, safety_p, e.path)), e.config_from)
        except LayerswapError as err:
            entries[e.name] = _failure(err)
            _notify(on_expert, e.name, entries[e.name])
            continue
        clear_stale(target)
        todo.append(e)
    stats_seconds = 0.0
    nodes: dict[str, str] = {}
    if todo:
        t0 = time.perf_counter()
        saved = load_saved_stats(saved_stats, todo[0].options.numerics) if saved_stats else None
        session: Optional[Session] = None
        if executor == "ray":
            result = _analyze_ray(base_p, safety_p, todo, layout_def, saved, nodes)
        else:
            # The open stage, once for the whole run: the statistics and every write use this opening.
            session = open_session(base_p, safety_p, [e.path for e in todo], layout_def, lenient=True)
            result = _outcome(session, session.analyze([todo[i].options for i in session.opened], saved=saved, progress=progress), len(todo))
        stats_seconds = time.perf_counter() - t0
        jobs: list[Job] = []
        for i, e in enumerate(todo):
            if i in result.failures:
                entries[e.name] = _failure(result.failures[i])
                _notify(on_expert, e.name, entries[e.name])
                continue
            try:
                # Each expert's own bands and overrides; a unit that does not exist fails that expert only.
                plan = decide(result.plans[i], e.options)
            except InvalidOptionError as err:
                entries[e.name] = _failure(err)
                _notify(on_expert, e.name, entries[e.name])
                continue
            # The engine's word on each expert (full or LoRA) rides with its plan into its report.
            jobs.append((i, e, plan, {"safety": result.safety_source, "expert": result.sources[i]}))

        def record(e: ExpertSpec, outcome: dict[str, Any]) -> None:
            if "error" in outcome:
                entries[e.name] = outcome
            else:
                published.append(e.name)
                r = outcome["report"]
                entries[e.name] = {"status": "ok", "options": e.options.to_dict(), "files": outcome["files"], "counts": r["counts"],
                                   "seconds": r["seconds"], "units": r["units"], "expert": hub_ids.given[e.name]}
                manifest["experts"][e.name] = {k: entries[e.name][k] for k in ("status", "options", "files", "counts", "units", "expert")}
                _write_json_atomic(out_p / MANIFEST, manifest)
            _notify(on_expert, e.name, entries[e.name])

        if session is None:
            _run_ray(jobs, (base_p, safety_p), out_p, layout_def, record, nodes, hub_ids.reports, result.shares)
        else:
            _run_local(session, jobs, (base_p, safety_p), out_p, layout_def, progress, record, hub_ids.reports)
    summary = _summary(entries, names, stats_seconds)
    if nodes:
        summary["ray_nodes"] = nodes
    if out_p.exists():
        _write_json_atomic(out_p / SUMMARY, summary)
        write_index(out_p, summary)
    return summary


def write_index(out: Path, summary: dict[str, Any], target: Optional[Path] = None) -> Path:
    """Writes ``OUT/index.html`` (or ``target``): the cross-language page of a bulk run, from its
    summary and each expert's own ``OUT/NAME/layerswap_report.json``."""
    target = target or out / BULK_PAGE_FILE
    reports: dict[str, Optional[dict[str, Any]]] = {}
    links: dict[str, str] = {}
    for name in summary.get("experts") or {}:
        try:
            reports[name] = json.loads((out / name / REPORT_FILE).read_text())
        except (OSError, ValueError):
            reports[name] = None
        if (out / name / PAGE_FILE).is_file():
            links[name] = os.path.relpath(out / name / PAGE_FILE, target.absolute().parent)
    write_text_atomic(target, page.render_bulk(summary, reports, links))
    return target


def _same_output(saved: Any, opts: MergeOptions) -> bool:
    """Whether saved options give the same output as these (threads and memory budget do not matter)."""
    if not isinstance(saved, dict):
        return False
    ignore = ("threads", "max_memory")
    now = json.loads(json.dumps(opts.to_dict()))  # as the manifest holds them (tuples become lists)
    return {k: v for k, v in saved.items() if k not in ignore} == {k: v for k, v in now.items() if k not in ignore}


def _notify(cb: Optional[Callable[[str, dict[str, Any]], None]], name: str, entry: dict[str, Any]) -> None:
    if cb is not None:
        cb(name, entry)


def _failure(e: BaseException) -> dict[str, Any]:
    return {"status": "failed", "error": " ".join(str(e).split()) or type(e).__name__, "kind": type(e).__name__}


def _publish(stage: Path, target: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Checksums, syncs and renames one finished stage into place (runs in the background)."""
    try:
        sums = checksums(stage)
        commit_stage(stage, target, force=True)
        return {"report": report, "files": sums}
    except BaseException as err:
        discard_stage(stage)
        if isinstance(err, (LayerswapError, OSError)):
            return _failure(err)
        raise


@dataclass
class _Analysis:
    """The analyze stage's outcome for the experts of a run (by their index in it)."""

    plans: dict[int, Plan]
    failures: dict[int, BaseException]
    #: The engine's word on each expert's model (full or LoRA), and on the safety expert's.
    sources: dict[int, dict[str, Any]]
    safety_source: Optional[dict[str, Any]]
    #: Ray only: the shares of the analyze pass each expert's plan was made from (the safety
    #: expert's and its own), whose file stamps its write checks.
    shares: dict[int, list[Sums]] = field(default_factory=dict)


def _outcome(session: Session, plans: list[Plan], n: int, index: Optional[list[int]] = None) -> _Analysis:
    """Plans and failures of a (lenient) session, by expert index (``index`` maps the session's
    experts to the run's, when the session holds some of them only)."""
    where = index or list(range(n))
    sources = session.sources
    return _Analysis({where[i]: p for i, p in zip(session.opened, plans)}, {where[i]: err for i, err in session.failures},
                     {where[i]: src for i, src in zip(session.opened, sources["experts"])}, sources["safety"])


def _run_local(session: Session, jobs: list[Job], shared: tuple[Path, Path], out: Path, layout: Optional[dict[str, Any]],
               progress: Optional[ProgressCallback], record: Callable[[ExpertSpec, dict[str, Any]], None],
               hub_inputs: dict[str, dict[str, dict[str, str]]]) -> None:
    """Write passes one after another on the run's session; each expert's disk sync, checksums and
    rename run in a background thread while the next expert is being written, so the disk and the
    cores work at once."""
    pending: Optional[tuple[ExpertSpec, concurrent.futures.Future[dict[str, Any]]]] = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as committer:
        try:
            for job in jobs:
                e = job[1]
                target = out / e.name
                try:
                    stage, report = _write_stage(session, shared, job, target, layout, False, progress, hub_inputs.get(e.name))
                except (LayerswapError, OSError) as err:
                    record(e, _failure(err))
                    continue
                future = committer.submit(_publish, stage, target, report)
                if pending is not None:
                    record(pending[0], pending[1].result())
                pending = (e, future)
        finally:
            # Even when interrupted, an output already being published is finished and recorded, so
            # the manifest never misses an output that exists.
            if pending is not None:
                record(pending[0], pending[1].result())


# --- the Ray executor ------------------------------------------------------------------------------


def _connect_ray() -> Any:
    """Imports Ray and connects to the cluster named by RAY_ADDRESS, or starts a local instance.

    Ray picks the machine's outward address for every process unless
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is in its environment before Ray is imported. For a cluster
    on this machine's loopback address (and for a local instance, which nobody else joins) it is set
    here, so the driver's address matches the nodes' 127.0.0.1.
    """
    address = os.environ.get("RAY_ADDRESS")
    host = (address or "").rsplit(":", 1)[0].removeprefix("ray://")
    if not address or host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise InvalidOptionError("--executor ray needs Ray: pip install 'layerswap-fast[ray]'") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    return ray


def _placer(ray: Any) -> Callable[[Any, int], Any]:
    """Task i goes to node i mod N of the cluster's live nodes with CPUs (soft affinity: elsewhere if
    that node goes away). Every task reads or writes whole models, so spreading them evenly uses
    every node's disk and link; Ray's own policies pack small tasks onto the first node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
    if not nodes:
        return lambda task, i: task
    return lambda task, i: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=nodes[i % len(nodes)], soft=True))


def _node() -> str:
    """The Ray node this task runs on (recorded in the summary: which node did what)."""
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _sums_task(base: Path, safety: Path, expert: Path, measured: str, options: MergeOptions,
               layout: Optional[dict[str, Any]]) -> tuple[Union[Sums, dict[str, Any]], str]:
    """One Ray task of the analyze pass: B and the safety expert, or B and one language expert.
    Returns the sums (with the stamps of the files read), or the failure of a bad model as data (as
    the write task does), which crosses back to the driver whatever the exception's class."""
    try:
        return open_session(base, safety, [expert], layout).sums(measured, options), _node()
    except (LayerswapError, OSError) as err:
        return _failure(err), _node()


def _write_task(shared: tuple[Path, Path], job: Job, out: Path, layout: Optional[dict[str, Any]],
                hub_inputs: Optional[dict[str, dict[str, str]]], shares: list[Sums]) -> tuple[dict[str, Any], str]:
    """One Ray task of the write passes: opens the models, checks that they are the files the
    statistics were computed on (their stamps), then an expert's write pass, checksums, sync and
    rename (a bad model's failure comes back as data, as in ``_sums_task``)."""
    try:
        session = open_session(*shared, [job[1].path], layout)
        session.check_stamps(shares)
        stage, report = _write_stage(session, shared, (0, *job[1:]), out, layout, True, None, hub_inputs)
        return _publish(stage, out, report), _node()
    except (LayerswapError, OSError) as err:
        return _failure(err), _node()


def _analyze_ray(base: Path, safety: Path, todo: list[ExpertSpec], layout: Optional[dict[str, Any]], saved: Optional[list[TensorStats]],
                 nodes: dict[str, str]) -> _Analysis:
    """The analyze pass as Ray tasks: one reads B and S (unless saved statistics stand in for S),
    each other one reads B and one language expert; the engine then checks that every share saw the
    same base sums and makes the plans here, from sums of a few bytes per tensor."""
    ray = _connect_ray()
    place = _placer(ray)
    task = ray.remote(_sums_task)
    # The pass follows the first expert's options (numerics, non-finite policy), as a local run's does.
    pass_options = todo[0].options
    numerics = {e.options.numerics for e in todo}
    if len(numerics) > 1:
        raise InvalidOptionError("all experts of one run must use the same numerics (statistics are shared)")
    safety_ref = None if saved else place(task, 0).remote(base, safety, todo[0].path, "safety", pass_options, layout)
    refs = [place(task, i + 1).remote(base, safety, e.path, "expert", pass_options, layout) for i, e in enumerate(todo)]
    if saved:  # the safety expert's share, from its saved statistics (no files read: no stamps)
        safety_sums = Sums.from_dict({"measured": "safety", "stamps": [],
                                      "tensors": [{"name": t.name, "numel": t.numel, "base_ss": t.base_ss, "diff_ss": [t.safety_ss]}
                                                  for t in saved]})
    else:
        assert safety_ref is not None
        share, nodes["statistics:safety"] = ray.get(safety_ref)
        if isinstance(share, dict):  # B or S is bad: nothing can be merged (a local run raises too)
            raise _kinds().get(share["kind"], LayerswapError)(share["error"])
        safety_sums = share
    result = _Analysis({}, {}, {}, None)
    ok: list[int] = []
    shares: list[Sums] = []
    for i, (e, ref) in enumerate(zip(todo, refs)):
        share, nodes[f"statistics:{e.name}"] = ray.get(ref)
        if isinstance(share, dict):
            result.failures[i] = _kinds().get(share["kind"], LayerswapError)(share["error"])
            continue
        ok.append(i)
        shares.append(share)
    if ok:
        # Headers only: the driver reads no tensor data.
        session = open_session(base, safety, [todo[i].path for i in ok], layout, lenient=True)
        plans = session.plans_from_sums([todo[ok[k]].options for k in session.opened], safety_sums, [shares[k] for k in session.opened])
        planned = _outcome(session, plans, len(ok), ok)
        result.plans, result.sources, result.safety_source = planned.plans, planned.sources, planned.safety_source
        result.failures.update(planned.failures)
        result.shares = {ok[k]: [safety_sums, shares[k]] for k in session.opened}
    return result


def _kinds() -> dict[str, type[Exception]]:
    """Exception classes by name, to raise a task's failure on the driver as what it was."""
    from layerswap_fast import errors

    kinds: dict[str, type[Exception]] = {n: getattr(errors, n) for n in errors.__all__ if isinstance(getattr(errors, n), type)}
    kinds.update({c.__name__: c for c in (OSError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)})
    return kinds


def _run_ray(jobs: list[Job], shared: tuple[Path, Path], out: Path, layout: Optional[dict[str, Any]],
             record: Callable[[ExpertSpec, dict[str, Any]], None], nodes: dict[str, str], hub_inputs: dict[str, dict[str, dict[str, str]]],
             shares: dict[int, list[Sums]]) -> None:
    """One Ray task per expert (write pass, side files, sync, rename), on the cluster from RAY_ADDRESS."""
    ray = _connect_ray()
    place = _placer(ray)
    task = ray.remote(_write_task)
    pending = {place(task, k).remote(shared, job, out / job[1].name, layout, hub_inputs.get(job[1].name), shares[job[0]]): job[1]
               for k, job in enumerate(jobs)}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        e = pending.pop(done[0])
        try:
            outcome, nodes[f"write:{e.name}"] = ray.get(done[0])
        except Exception as err:  # a Ray task error wraps the original exception
            outcome = _failure(getattr(err, "cause", None) or err)
        record(e, outcome)


def _summary(entries: dict[str, dict[str, Any]], names: list[str], stats_seconds: float) -> dict[str, Any]:
    table: dict[str, dict[str, str]] = {}
    for name in names:
        for u in entries[name].get("units") or []:
            label = f"layer {u['layer']}" if u.get("part") is None else f"layer {u['layer']} {u['part']}"
            table.setdefault(label, {})[name] = u["decision"]
    return {
        "tool": "layerswap-fast",
        "version": _core.__version__,
        "statistics_seconds": round(stats_seconds, 3),
        "experts": {n: {k: v for k, v in entries[n].items() if k not in ("units", "files")} for n in names},
        "decisions": table,
    }


# --- saved statistics ---------------------------------------------------------------------------


def check_stats_path(path: PathLike, inputs: Iterable[Optional[PathLike]]) -> None:
    """Refuses a ``--save-stats`` path that overlaps an input, or that holds something other than a
    statistics file (which would be overwritten). Called before any work."""
    p = Path(path)
    check_not_input(p, [Path(i) if i is not None else None for i in inputs], "--save-stats file")
    if p.is_symlink() or (p.exists() and not p.is_file()):
        raise OutputExistsError(f"{p}: --save-stats file exists and is not a regular file; refusing to replace it")
    if p.exists() and p.stat().st_size > 0:
        with open(p, "rb") as f:
            head = f.read(64)
        if not head.startswith(b'{\n  "layerswap_stats"'):
            raise OutputExistsError(f"{p}: exists and is not a statistics file of layerswap-fast; refusing to overwrite it")


def save_stats(path: PathLike, plan: Plan, base: PathLike, safety: PathLike, expert: Optional[PathLike] = None) -> None:
    """Saves the base and safety-expert statistics of an analysis, for reuse by later bulk runs.

    Raises:
        OutputExistsError: ``path`` overlaps an input or holds something else than a statistics file.
    """
    check_stats_path(path, [base, safety, expert])
    data = {
        "layerswap_stats": 1,
        "version": _core.__version__,
        "numerics": plan.options["numerics"],
        "base": str(base),
        "safety": str(safety),
        "tensors": [{"name": s.name, "numel": s.numel, "base_ss": s.base_ss, "diff_ss": [s.safety_ss]} for s in plan.stats],
    }
    _write_json_atomic(Path(path), data)


def load_saved_stats(path: PathLike, numerics: str) -> list[TensorStats]:
    """The saved statistics (B's and S's sums) as the engine reads them; checks the file's kind and numerics."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise InvalidOptionError(f"{p}: not a statistics file ({e})") from None
    if not isinstance(data, dict) or data.get("layerswap_stats") != 1:
        raise InvalidOptionError(f"{p}: not a layerswap-fast statistics file (make one with analyze --save-stats)")
    if data.get("numerics") != numerics:
        raise InvalidOptionError(f"{p}: statistics were computed with {data.get('numerics')} numerics, this run uses {numerics}")
    try:
        return [TensorStats.from_dict({"name": t["name"], "numel": t["numel"], "base_ss": t["base_ss"], "safety_ss": t["diff_ss"][0],
                                       "expert_ss": 0.0})
                for t in data["tensors"]]
    except (KeyError, IndexError, TypeError, InvalidOptionError) as e:
        raise InvalidOptionError(f"{p}: not a valid statistics file ({e!r})") from None

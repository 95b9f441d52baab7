"""The ``layerswap-fast`` command line.

Exit status: 0 success; 2 bad input or options (one line on stderr naming the file and tensor);
1 other failures such as a full disk; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 129 hung up
(SIGHUP). A failed or interrupted merge leaves no output folder and no staging folder behind.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import click

from layerswap_fast import api, bulk
from layerswap_fast import decisions
from layerswap_fast.errors import InvalidOptionError, LayerswapError, OutputExistsError
from layerswap_fast.folder import LeftoverWarning, check_not_input
from layerswap_fast.options import decision_options, from_cli, method_options, output_options, resource_options
from layerswap_fast.progress import ProgressBar
from layerswap_fast import page
from layerswap_fast.errors import InvalidOptionError as InvalidReportError
from layerswap_fast.folder import BULK_PAGE_FILE, PAGE_FILE, REPORT_FILE, write_text_atomic
from layerswap_fast.report import bulk_strips, bulk_table, decision_strip, decision_table, fmt_bytes, merge_summary, plural, report_table, sweep_table

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
#: How the binding words a caught engine panic (rust/python/progress.rs).
ENGINE_PANIC = "internal error in the layerswap-fast engine"
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, turned into an exception so that the engine is cancelled and the staging
    folder removed (only SIGKILL can leave one behind)."""


    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


#: Signals that would otherwise end the process without cleanup: the terminal closing, kill's default.
_CAUGHT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    click.echo(f"layerswap-fast: warning: {' '.join(str(message).split())}", err=True)


def _interrupted(e: KeyboardInterrupt, verb: str) -> str:
    """What an interrupted run wrote, truthfully (a bulk run names the outputs it published)."""
    written = getattr(e, "written", None)
    return f"layerswap-fast: {verb}; {written or 'nothing was written'}"


def _errors(f: Callable) -> Callable:
    """Turns expected exceptions into one line on stderr and an exit status (no traceback)."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = {}
        for sig in _CAUGHT_SIGNALS:
            try:
                previous[sig] = signal.signal(sig, _on_signal)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        caught = warnings.catch_warnings()
        caught.__enter__()
        warnings.simplefilter("always", LeftoverWarning)  # the user must see these, once each
        warnings.showwarning = _show_warning
        try:
            return f(*args, **kwargs)
        except _Terminated as e:
            click.echo(_interrupted(e, "terminated" if e.signum == signal.SIGTERM else f"terminated by {signal.Signals(e.signum).name}"), err=True)
            sys.exit(128 + e.signum)
        except KeyboardInterrupt as e:
            click.echo(_interrupted(e, "interrupted"), err=True)
            sys.exit(130)
        except (LayerswapError, *_USER_OS_ERRORS) as e:
            click.echo(f"layerswap-fast: error: {_one_line(e)}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except OSError as e:
            click.echo(f"layerswap-fast: error: {_one_line(e)}", err=True)
            sys.exit(EXIT_FAILURE)
        except RuntimeError as e:
            # A panic inside the engine arrives as this RuntimeError (the binding catches it); the
            # panic message with its location is already on stderr for the bug report.
            if not str(e).startswith(ENGINE_PANIC):
                raise
            click.echo(f"layerswap-fast: {_one_line(e)}", err=True)
            sys.exit(EXIT_FAILURE)
        finally:
            caught.__exit__(None, None, None)
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    return wrapper


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename and str(e.filename) not in (e.strerror or ""):
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split())


def _models(multiple: bool = False, base_required: bool = True) -> Callable[[Callable], Callable]:
    """-b/-s/-m (and --layout). With ``multiple``, -m may repeat as NAME=PATH and all three may come
    from a --plan file instead, so none is required by Click; without ``base_required`` -b may be
    left out (a decisions file needs no base model)."""

    def decorator(f: Callable) -> Callable:
        expert_help = (
            "Language expert M (B fine-tuned on a language): the host of the merge. Repeat as NAME=PATH "
            "(-m ko=expert-ko/ -m sw=expert-sw/) to merge several experts in one pass into OUT/NAME/."
            if multiple
            else "Language expert M (B fine-tuned on a language): the host of the merge."
        )
        for flags, name, help_ in reversed(
            [
                (("-b", "--base"), "base", "Base model B: Hugging Face folder, .safetensors file, or hub id org/name[@REVISION] "
                                          "(looked up in the Hugging Face cache; any model option takes one; a local path wins)."),
                (("-s", "--safety"), "safety", "English safety expert S (B fine-tuned on safety data)."),
                (("-m", "--expert"), "expert", expert_help),
            ]
        ):
            kind = str if (multiple and name == "expert") else click.Path(path_type=Path)
            required = not multiple and (base_required or name != "base")
            f = click.option(*flags, name, required=required, multiple=multiple and name == "expert", type=kind, help=help_)(f)
        f = click.option("--layout", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                         help="Custom layout definition (JSON or TOML) for models no built-in layout recognises.")(f)
        return f

    return decorator


def _parse_experts(values: tuple[str, ...]) -> tuple[bool, list[tuple[str, Path]]]:
    """(named, [(name, path)]) from -m values: PATH, or NAME=PATH (a value that exists as a path is a path)."""
    out = []
    named = False
    for v in values:
        name, sep, path = v.partition("=")
        if sep and name and not Path(v).exists():
            out.append((name, Path(path)))
            named = True
        else:
            out.append((Path(v).name or "expert", Path(v)))
    return named, out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="layerswap-fast", prog_name="layerswap-fast")
def main() -> None:
    """Make a language expert as safe as an English safety expert, without training.

    Layer-wise swapping (Shin & Hwang, EACL 2026): from a base model B, an English safety expert S and a
    language expert M, measure how far each layer (or attention / MLP module) moved from B in S and in
    M, and per unit take S's weights, keep M's, or blend them. Streams tensors in bounded memory on CPU.

    \b
    Typical use:
      layerswap-fast analyze -b base/ -s safety/ -m expert-ko/       # see the decisions
      layerswap-fast merge   -b base/ -s safety/ -m expert-ko/ -o merged-ko/
      layerswap-fast demo /tmp/lsf-demo                                # try it on a built-in toy trio
    """


_DECISIONS_FILE_HELP = ("Merge exactly the decisions in this file (the JSON 'analyze --json' writes, possibly edited; "
                       "per-unit alpha allowed): no analyze pass, -b may be left out. --override still applies.")


def _granularity_clash(ctx: click.Context, path: Path, params: dict[str, Any]) -> None:
    """A decisions file brings its granularity; an explicit -g that says otherwise is an error."""
    if ctx.get_parameter_source("granularity") == click.core.ParameterSource.COMMANDLINE:
        data = decisions.load_decisions(path)
        if data["granularity"] != params["granularity"]:
            raise InvalidOptionError(
                f"{path}: the decisions are in {data['granularity']} granularity, but --granularity {params['granularity']} was given"
            )


@main.command()
@_models()
@method_options
@decision_options
@resource_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead of a table (merge --decisions reads it back).")
@click.option("--sweep-tau", "sweep_tau", default=None, metavar="A:B:N",
              help="Decision counts at N values of tau evenly spaced from A to B (inclusive), from one analyze pass, "
                   "and per unit the tau above which it becomes a blend (|d|). With --json: [{tau, counts}, ...].")
@click.option("--save-stats", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save the base and safety-expert statistics to this file, for later bulk runs (merge --stats).")
@click.option("--compare-numerics", is_flag=True,
              help="Analyse in both exact and official numerics and list the units whose decision differs.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report page (heatmap, ratios, unit table) that a merge would write, to this file.")
@_errors
def analyze(base: Path, safety: Path, expert: Path, layout: Optional[Path], as_json: bool, save_stats: Optional[Path],
            compare_numerics: bool, sweep_tau: Optional[str], html_file: Optional[Path], **params: Any) -> None:
    """Compute the per-unit scores and decisions; write nothing (but the --save-stats and --html files).

    Prints, per unit, the raw scores A_S and A_M, the normalised p_S and p_M, d = p_S - p_M, the
    decision (with its alpha when it is a blend) and where it came from: measured (d and tau), band
    (--select bands) or override (--override); then the decisions per layer and the count of fragile
    units (whose decision would flip if tau were halved or doubled). 'analyze --json > plan.json',
    edit, then 'merge --decisions plan.json' merges exactly that.
    """
    options = from_cli(params)
    taus = decisions.parse_sweep(sweep_tau) if sweep_tau is not None else None
    if save_stats is not None:
        bulk.check_stats_path(save_stats, [base, safety, expert, layout])
    if html_file is not None:
        check_not_input(html_file, [base, safety, expert, layout], "--html file")
    started = time.perf_counter()
    if compare_numerics:
        _compare_numerics(base, safety, expert, layout, options, as_json)
        return
    bar = ProgressBar()
    try:
        plan = api.analyze(base, safety, expert, options=options, layout=layout, progress=bar)
    finally:
        bar.close()
    if save_stats is not None:
        bulk.save_stats(save_stats, plan, base, safety, expert)
    if taus is not None:
        rows = decisions.sweep(plan.to_dict()["units"], taus, n_layers=plan.n_layers, granularity=plan.granularity,
                               alpha=options.alpha, select=options.select, bands=options.bands, overrides=options.overrides)
        click.echo(json.dumps(rows, indent=2) if as_json else sweep_table(plan, rows))
        return
    if html_file is not None:
        report = api.build_report(plan, options, (base, safety, expert), started, api.read_layout(layout))
        write_text_atomic(html_file, page.render(report))
    if as_json:
        click.echo(plan.to_json())
    else:
        click.echo(decision_table(plan))
        click.echo(decision_strip(plan.to_dict()["units"], float(plan.options["tau"])))


@main.command()
@_models(multiple=True)
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (must not exist unless --force). With several experts: the parent of OUT/NAME/.")
@click.option("--plan", "plan_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Bulk file (TOML, or YAML with PyYAML): base, safety, out, [defaults], [experts.NAME] with path and per-expert options.")
@click.option("--executor", type=click.Choice(bulk.EXECUTORS), default="local", show_default=True,
              help="Where the per-expert write passes run: here, or on Ray (cluster from RAY_ADDRESS; shared filesystem).")
@click.option("--stats", "saved_stats", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Reuse base and safety statistics saved by analyze --save-stats (the safety expert is then not re-read).")
@click.option("--force", is_flag=True, help="Replace an existing output folder that is empty or an earlier output of this tool (only once the new one is complete); "
                                            "anything else is refused untouched. In bulk runs, redo finished experts.")
@click.option("--config-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Model folder whose config, processor and tokenizer files go to the output (for a language expert given as a bare .safetensors file; "
                   "in bulk runs, for every such expert).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@click.option("--emit", type=click.Choice(("model", "adapter")), default="model", show_default=True,
              help="What to write: a full model, or (both experts PEFT LoRA adapters) the merge as an exact PEFT adapter for the base.")
@click.option("--decisions", "decisions_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help=_DECISIONS_FILE_HELP)
@method_options
@decision_options
@resource_options
@output_options
@_errors
@click.pass_context
def merge(ctx: click.Context, base: Optional[Path], safety: Optional[Path], expert: tuple[str, ...], layout: Optional[Path],
          out: Optional[Path], plan_file: Optional[Path], executor: str, saved_stats: Optional[Path], force: bool,
          config_from: Optional[Path], quiet: bool, emit: str, decisions_file: Optional[Path], **params: Any) -> None:
    """Merge the safety expert into the language expert(s) and write Hugging Face folders.

    The output holds merged safetensors shards (and their index), the language expert's config, the
    tokenizer (see --tokenizer-from) and layerswap_report.json with every unit's scores and decision.
    It is written beside OUT and renamed into place when complete; inputs are only read.

    \b
    Several experts (one analyze pass over the shared models, then one output each):
      layerswap-fast merge -b base/ -s safety/ -m ko=expert-ko/ -m sw=expert-sw/ -o merged/
      layerswap-fast merge --plan experts.toml
    Rerunning a bulk merge skips experts whose outputs the manifest verifies, and redoes the rest.

    \b
    Decision control:
      --override 3=safety --override '*.mlp=blend:0.25'   set units by hand (later wins)
      --select bands --bands 2,2,1                         fixed bands (Bandarkar et al.)
      --decisions plan.json                                merge an edited 'analyze --json' (no -b needed)
    """
    options = from_cli(params)
    named, experts = _parse_experts(expert)
    if decisions_file is not None:
        if plan_file is not None or named or len(experts) != 1 or executor != "local" or saved_stats is not None:
            raise click.UsageError("--decisions merges one language expert: give -s, -m and -o (-b is optional), no --plan/--stats/--executor")
        _granularity_clash(ctx, decisions_file, params)
    if plan_file is None and ((base is None and decisions_file is None) or safety is None or not experts):
        raise click.UsageError("give -b/--base, -s/--safety and -m/--expert, or --plan FILE")
    if plan_file is None and not named and len(experts) == 1 and executor == "local" and saved_stats is None:
        assert safety is not None  # checked just above (without --plan)
        if out is None:
            raise click.UsageError("give -o/--out")
        bar = ProgressBar(enabled=False if quiet else None)
        try:
            report = api.merge(base, safety, experts[0][1], out, options=options, layout=layout, force=force, progress=bar,
                               config_from=config_from, emit=emit, decisions=decisions_file)
        finally:
            bar.close()
        if not quiet:
            click.echo(merge_summary(report, str(out)))
            click.echo(decision_strip(report["units"], float(report["parameters"]["tau"])))
        return
    if emit != "model":
        raise click.UsageError("--emit adapter writes one adapter: give one -m/--expert without a name (bulk runs write full models)")
    if plan_file is not None:
        plan = bulk.load_bulk_file(plan_file, options)
        base, safety = base or plan.base, safety or plan.safety
        specs = list(plan.experts) + [bulk.ExpertSpec(n, p, options) for n, p in experts]
        out = out or plan.out
    else:
        specs = [bulk.ExpertSpec(n, p, options) for n, p in experts]
    if out is None:
        raise click.UsageError("give -o/--out (or 'out' in the --plan file)")
    assert base is not None and safety is not None  # given (checked above), or from the --plan file (required there)
    if config_from is not None:
        # Side files for every expert given as a bare .safetensors file (one with its own config_from keeps it).
        bare = [e.name for e in specs if e.config_from is None and e.path.is_file()]
        if not bare:
            raise click.UsageError("--config-from gives side files to experts given as bare .safetensors files, and this run has none")
        specs = [dataclasses.replace(e, config_from=config_from) if e.name in bare else e for e in specs]
    check_not_input(out, [plan_file])
    bar = ProgressBar(enabled=False if quiet else None)

    def said(name: str, entry: dict[str, Any]) -> None:
        bar.close()
        if not quiet:
            detail = entry.get("error") or entry.get("note") or ", ".join(f"{n} {k}" for k, n in (entry.get("counts") or {}).items())
            click.echo(f"{name}: {entry['status']}: {detail}", err=entry["status"] == "failed")

    try:
        summary = bulk.bulk_merge(base, safety, specs, out, layout=layout, executor=executor, force=force, saved_stats=saved_stats,
                                  progress=bar, on_expert=said)
    finally:
        bar.close()
    if not quiet:
        click.echo(bulk_table(summary))
        reports = {name: json.loads((out / name / REPORT_FILE).read_text())
                   for name, e in summary["experts"].items() if e["status"] == "ok" and (out / name / REPORT_FILE).is_file()}
        if reports:
            click.echo(bulk_strips(reports))
    if any(e["status"] == "failed" for e in summary["experts"].values()):
        sys.exit(EXIT_FAILURE)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Custom layout definition (JSON or TOML).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor outside the layers, not just the first few.")
@_errors
def inspect(model: Path, layout: Optional[Path], as_json: bool, show_all: bool) -> None:
    """Show the detected layout of MODEL: layers, units, tensors per unit, tensors outside the layers and
    tensors inside a layer that no unit claims (a merge refuses those; a custom --layout can assign them)."""
    info = api.inspect(model, layout=layout)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(_layout_summary(str(model), info, show_all))


def _layout_summary(model: str, info: dict[str, Any], show_all: bool = False) -> str:
    n = info["n_layers"]
    parts = {"attention": "attention", "mlp": "mlp", "norm": "layer's own (norms)"}
    # (part, measured) -> tensors per layer
    per_layer: dict[tuple[str, bool], list[int]] = {(p, m): [0] * n for p in parts for m in (False, True)}
    outside, unassigned = [], []
    for t in info["tensors"]:
        place = t["place"]
        if place in ("Outside", "Vocab"):
            outside.append(t["name"] + (" [vocab]" if place == "Vocab" else ""))
        elif "Unassigned" in place:
            unassigned.append(f"{t['name']} (layer {place['Unassigned']['layer']})")
        else:
            p = place["Layer"]
            per_layer[(p["part"], bool(p["target"]))][p["layer"]] += 1

    def span(counts: list[int]) -> str:
        return str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"

    lines = [
        f"{model}: layout {info['layout']}: {info['description']}",
        f"{plural(n, 'layer')}, {plural(len(info['tensors']), 'tensor')}, {fmt_bytes(info['data_bytes'])} in {plural(info['shards'], 'shard')}",
        f"units: {n} in layer granularity, {2 * n} in module granularity (attention and MLP of each layer)",
        f"  {'per layer':<22} {'tensors':>8} {'measured':>9}",
    ]
    for p, label in parts.items():
        total = [a + b for a, b in zip(per_layer[(p, False)], per_layer[(p, True)])]
        lines.append(f"  {label:<22} {span(total):>8} {span(per_layer[(p, True)]):>9}")
    shown = outside if show_all else outside[:12]
    more = f", ... and {len(outside) - len(shown)} more (--all)" if len(shown) < len(outside) else ""
    lines.append(f"outside the layers ({len(outside)}): {', '.join(shown) if shown else 'none'}{more}")
    lines.append(f"not assigned to any unit ({len(unassigned)}): {', '.join(unassigned) if unassigned else 'none'}")
    return "\n".join(lines)


def _compare_numerics(base: Path, safety: Path, expert: Path, layout: Optional[Path], options: Any, as_json: bool) -> None:
    from layerswap_fast.verify import compare_numerics

    res = compare_numerics(base, safety, expert, options=options, layout=layout)
    if as_json:
        click.echo(json.dumps({"flips": res["flips"], "exact": res["exact"].to_dict(), "official": res["official"].to_dict()}, indent=2))
        return
    click.echo(decision_table(res["exact"]))
    click.echo(decision_table(res["official"]))
    if not res["flips"]:
        click.echo(f"no unit flips between exact and official numerics ({len(res['exact'].units)} units)")
    for f in res["flips"]:
        click.echo(f"flips: {f['unit']:<20} exact {f['exact']} (d {f['d_exact']:+.6f}), official {f['official']} (d {f['d_official']:+.6f})")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@_models(base_required=False)
@method_options
@decision_options
@output_options
@click.option("--decisions", "decisions_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The decisions file the merge was given (then -b may be left out).")
@click.option("--json", "as_json", is_flag=True, help="Print the full comparison as JSON.")
@click.option("--max-ulp", type=click.IntRange(min=0), default=0, show_default=True,
              help="Accept computed values up to N units in the last place off (for outputs of other tools); 0 requires every byte.")
@_errors
@click.pass_context
def verify(ctx: click.Context, out: Path, base: Optional[Path], safety: Path, expert: Path, layout: Optional[Path], as_json: bool,
           max_ulp: int, decisions_file: Optional[Path], **params: Any) -> None:
    """Recompute a merge with the torch reference and check OUT against it (needs torch).

    Pass the same method options as to merge. Checks that every unit's decision matches, that every
    tensor is present with the right dtype and shape, that every byte equals the reference's (exact
    and official numerics are reproducible bit for bit; --max-ulp N allows a tolerance), and that the
    folder (index, shard headers, side files, the dtype config.json states) is complete. The
    reference finds each family's units in its own table, not in the engine's layout files.
    Overrides, bands and decisions files are applied to the reference's decisions as the merge
    applied them, and each unit's source and alpha must match the report's. -s/-m may be PEFT LoRA
    adapters (with -b): the reference builds B + ΔW from their files; an output of --emit adapter is
    checked module by module. Prints a table and every mismatch; exits 1 on any.
    """
    from layerswap_fast.verify import verify as run_verify

    if base is None and decisions_file is None:
        raise click.UsageError("give -b/--base (or --decisions FILE for a merge made from a decisions file)")
    if decisions_file is not None:
        _granularity_clash(ctx, decisions_file, params)
    try:
        result = run_verify(out, base, safety, expert, options=from_cli(params), layout=layout, max_ulp=max_ulp, decisions=decisions_file)
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.summary())
    if not result.ok:
        sys.exit(EXIT_FAILURE)


@main.command()
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--layers", default=8, show_default=True, help="Decoder layers of the toy model.")
@click.option("-g", "--granularity", type=click.Choice(("layer", "module")), default="layer", show_default=True)
@click.option("--force", is_flag=True, help="Use OUTDIR even if it is a non-empty folder that an earlier demo did not make.")
@_errors
def demo(outdir: Path, layers: int, granularity: str, force: bool) -> None:
    """Build a small base / safety / language-expert trio with planted structure in OUTDIR and merge it.

    The safety expert is planted to differ most from the base in the top half of the layers, the
    language expert in the bottom half: the decisions should take the top half from the safety expert.
    Running it again in the same OUTDIR rebuilds everything.
    """
    from layerswap_fast import synth  # numpy-heavy generation, only for the demo

    marker = outdir / ".layerswap-demo"
    if outdir.exists() and any(outdir.iterdir()) and not marker.exists() and not force:
        raise OutputExistsError(f"{outdir}: exists and is not a folder an earlier demo made; choose another or pass --force")
    outdir.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by layerswap-fast demo\n")

    cfg = synth.LlamaConfig(n_layers=layers, hidden=128, intermediate=352, heads=4, kv_heads=2, vocab=512)
    click.echo(f"building base, safety and expert ({cfg.param_count():,} parameters each, bf16) in {outdir}")
    paths = synth.make_trio(outdir, cfg, shard_bytes={"base": None, "safety": 200_000, "expert": 300_000})
    report = api.merge(paths["base"], paths["safety"], paths["expert"], outdir / "merged", granularity=granularity, force=True)
    click.echo(report_table(report))
    click.echo(merge_summary(report, str(outdir / "merged"), units=False))
    click.echo(decision_strip(report["units"], float(report["parameters"]["tau"])))
    click.echo(f"report page: {outdir / 'merged' / PAGE_FILE}")


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write: .html regenerates the report page; .png, .svg or .pdf draws the paper's two figures "
                   "(decision heatmap and ratio plot; needs the plot extra). [default: the page beside the report]")
@_errors
def report(path: Path, out_file: Optional[Path]) -> None:
    """Regenerate the report page, or draw the paper's figures, from a merge's layerswap_report.json.

    PATH is a merge's output folder, its layerswap_report.json, a bulk run's output folder (whose
    index.html is regenerated from layerswap_bulk_summary.json and each expert's report), or the JSON
    of 'analyze --sweep-tau A:B:N --json' (drawn as decision counts against tau; needs -o FILE).
    """
    from layerswap_fast import figures

    if path.is_dir() and not (path / REPORT_FILE).is_file():
        summary_file = path / bulk.SUMMARY
        if summary_file.is_file():
            if out_file is not None and out_file.suffix.lower() != ".html":
                raise click.UsageError(f"{path} is a bulk run: figures are drawn per expert (report {path}/NAME -o FILE)")
            summary = _load_json(summary_file)
            if not isinstance(summary, dict) or not isinstance(summary.get("experts"), dict):
                raise InvalidReportError(f"{summary_file}: not a layerswap-fast bulk summary (no 'experts')")
            click.echo(f"wrote {bulk.write_index(path, summary, out_file)}")
            return
        raise click.BadParameter(f"{path}: no {REPORT_FILE} (nor {bulk.SUMMARY}) in this folder", param_hint="PATH")
    report_file = path / REPORT_FILE if path.is_dir() else path
    data = _load_json(report_file)
    if isinstance(data, list) and data and all(isinstance(r, dict) and "tau" in r for r in data):  # analyze --sweep-tau --json
        if out_file is None:
            raise click.UsageError(f"{report_file} is a tau sweep: name the figure with -o FILE ({', '.join(figures.FORMATS)})")
        check_not_input(out_file, [report_file], "figure")
        try:
            figures.draw_sweep(data, out_file)
        except figures.PlotExtraMissing as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"wrote {out_file}")
        return
    if not isinstance(data, dict) or not isinstance(data.get("units"), list):
        raise InvalidReportError(f"{report_file}: not a layerswap-fast report (no 'units')")
    target = out_file or report_file.parent / PAGE_FILE
    check_not_input(target, [Path(p) for p in (data.get("inputs") or {}).values() if isinstance(p, str)], "report file")
    suffix = target.suffix.lower()
    if suffix == ".html":
        write_text_atomic(target, page.render(data))
    elif suffix in figures.FORMATS:
        try:
            figures.draw(data, target)
        except figures.PlotExtraMissing as e:
            raise click.ClickException(str(e)) from None
    else:
        raise click.BadParameter(f"{target}: write .html, or {', '.join(figures.FORMATS)} for the figures", param_hint="-o")
    click.echo(f"wrote {target}")


def _load_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise InvalidReportError(f"{p}: not valid JSON ({e})") from None

"""The ``layerswap-fast`` command line.

Exit status: 0 success; 2 bad input or options (one line on stderr naming the file and tensor);
1 other failures such as a full disk; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). A failed or
interrupted merge leaves no output folder behind.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click

from layerswap_fast import api, synth
from layerswap_fast.errors import LayerswapError
from layerswap_fast.options import from_cli, method_options, output_options, resource_options
from layerswap_fast.progress import ProgressBar
from layerswap_fast.report import decision_table, fmt_bytes, merge_summary

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
_USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the engine is cancelled and the staging folder removed."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _errors(f: Callable) -> Callable:
    """Turns expected exceptions into one line on stderr and an exit status (no traceback)."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            previous = None
        try:
            return f(*args, **kwargs)
        except _Terminated:
            click.echo("layerswap-fast: terminated; nothing was written", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("layerswap-fast: interrupted; nothing was written", err=True)
            sys.exit(130)
        except (LayerswapError, *_USER_OS_ERRORS) as e:
            click.echo(f"layerswap-fast: error: {_one_line(e)}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except OSError as e:
            click.echo(f"layerswap-fast: error: {_one_line(e)}", err=True)
            sys.exit(EXIT_FAILURE)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename and str(e.filename) not in (e.strerror or ""):
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split())


def _models(f: Callable) -> Callable:
    for flags, name, help_ in reversed(
        [
            (("-b", "--base"), "base", "Base model B: Hugging Face folder or .safetensors file."),
            (("-s", "--safety"), "safety", "English safety expert S (B fine-tuned on safety data)."),
            (("-m", "--expert"), "expert", "Language expert M (B fine-tuned on a language): the host of the merge."),
        ]
    ):
        f = click.option(*flags, name, required=True, type=click.Path(path_type=Path), help=help_)(f)
    f = click.option("--layout", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="Custom layout definition (JSON) for models no built-in layout recognises.")(f)
    return f


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


@main.command()
@_models
@method_options
@resource_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead of a table.")
@_errors
def analyze(base: Path, safety: Path, expert: Path, layout: Optional[Path], as_json: bool, **params: Any) -> None:
    """Compute the per-unit scores and decisions; write nothing.

    Prints, per unit, the raw scores A_S and A_M, the normalised p_S and p_M, d = p_S - p_M and the
    decision, exactly as thresholded.
    """
    options = from_cli(params)
    bar = ProgressBar()
    try:
        plan = api.analyze(base, safety, expert, options=options, layout=layout, progress=bar)
    finally:
        bar.close()
    click.echo(plan.to_json() if as_json else decision_table(plan))


@main.command()
@_models
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist unless --force).")
@click.option("--force", is_flag=True, help="Replace an existing output folder (only once the new one is complete).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@method_options
@resource_options
@output_options
@_errors
def merge(base: Path, safety: Path, expert: Path, layout: Optional[Path], out: Path, force: bool, quiet: bool, **params: Any) -> None:
    """Merge the safety expert into the language expert and write a Hugging Face folder.

    The output holds merged safetensors shards (and their index), the language expert's config, the
    tokenizer (see --tokenizer-from) and layerswap_report.json with every unit's scores and decision.
    It is written beside OUT and renamed into place when complete; inputs are only read.
    """
    options = from_cli(params)
    bar = ProgressBar(enabled=False if quiet else None)
    try:
        report = api.merge(base, safety, expert, out, options=options, layout=layout, force=force, progress=bar)
    finally:
        bar.close()
    if not quiet:
        click.echo(merge_summary(report, str(out)))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Custom layout definition (JSON).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@_errors
def inspect(model: Path, layout: Optional[Path], as_json: bool) -> None:
    """Show the detected layout of MODEL: layers, units, and where every tensor belongs."""
    info = api.inspect(model, layout=layout)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    per_unit: dict[str, int] = {}
    outside = []
    for t in info["tensors"]:
        place = t["place"]
        if place == "Outside":
            outside.append(t["name"])
            continue
        p = place["Layer"]
        key = f"{p['part']}{' (measured)' if p['target'] else ''}"
        per_unit[key] = per_unit.get(key, 0) + 1
    click.echo(f"{model}: layout {info['layout']} ({info['description']})")
    click.echo(f"{info['n_layers']} decoder layers, {len(info['tensors'])} tensors, {fmt_bytes(info['data_bytes'])} in {info['shards']} shard(s)")
    for key, n in sorted(per_unit.items()):
        click.echo(f"  {key:<24} {n / info['n_layers']:g} tensors per layer")
    click.echo(f"  outside the layers: {', '.join(outside) if outside else 'none'}")


@main.command()
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--layers", default=8, show_default=True, help="Decoder layers of the toy model.")
@click.option("-g", "--granularity", type=click.Choice(("layer", "module")), default="layer", show_default=True)
@click.option("--force", is_flag=True, help="Replace OUTDIR/merged if it exists.")
@_errors
def demo(outdir: Path, layers: int, granularity: str, force: bool) -> None:
    """Build a small base / safety / language-expert trio with planted structure in OUTDIR and merge it.

    The safety expert is planted to differ most from the base in the top half of the layers, the
    language expert in the bottom half: the decisions should take the top half from the safety expert.
    """
    cfg = synth.LlamaConfig(n_layers=layers, hidden=128, intermediate=352, heads=4, kv_heads=2, vocab=512)
    click.echo(f"building base, safety and expert ({cfg.param_count():,} parameters each, bf16) in {outdir}")
    paths = synth.make_trio(outdir, cfg, shard_bytes={"base": None, "safety": 200_000, "expert": 300_000})
    report = api.merge(paths["base"], paths["safety"], paths["expert"], outdir / "merged", granularity=granularity, force=force)
    plan = api.analyze(paths["base"], paths["safety"], paths["expert"], granularity=granularity)
    click.echo(decision_table(plan))
    click.echo(merge_summary(report, str(outdir / "merged")))

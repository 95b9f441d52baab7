"""The Hugging Face model card (``README.md``) of a merged model, built from the report dict alone.

Front matter as the hub reads it: ``base_model`` (the language expert: its hub id when it came from
the hub, else its folder name), ``base_model_relation: merge``, ``tags``, ``library_name``, and the
``license`` and ``language`` of the language expert's own card when it has one. The body says how the
model was made, what was decided per layer, and the exact commands that reproduce and verify it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, Optional

from layerswap_fast.options import cli_args
from layerswap_fast.report import decision_strip, fmt_bytes, fragile_units, input_source

#: Keys copied from the language expert's card front matter.
COPIED_KEYS = ("license", "license_name", "license_link", "language")
TAGS = ("merge", "layerswap-fast", "layer-wise-swapping", "safety")
#: Largest card read from an expert (real ones are tens of kilobytes).
MAX_CARD_BYTES = 1 << 20

CITATION = """@inproceedings{shin2026layerwise,
  title     = {Layer-wise Swapping for Generalizable Multilingual Safety},
  author    = {Shin and Hwang},
  booktitle = {Proceedings of EACL 2026},
  year      = {2026},
  note      = {arXiv:2601.22620}
}"""


# --- reading the expert's own card ---------------------------------------------------------------


def read_front_matter(model: Path) -> dict[str, Any]:
    """The YAML front matter of a model folder's ``README.md`` ({} when there is none, it is not a
    regular file, it is too large, or it does not parse: a card is never a reason to fail a merge)."""
    folder = Path(model) if Path(model).is_dir() else None
    if folder is None:
        return {}
    readme = folder / "README.md"
    try:
        if not readme.is_file() or readme.stat().st_size > MAX_CARD_BYTES:
            return {}
        text = readme.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    return parse_front_matter(text)


def parse_front_matter(text: str) -> dict[str, Any]:
    """The mapping between a leading ``---`` line and the next ``---`` line ({} if none)."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() in ("---", "..."))
    except StopIteration:
        return {}
    block = "\n".join(lines[1:end])
    try:
        import yaml
    except ImportError:
        return _simple_yaml(block)
    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _scalar(v: str) -> Any:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        return v[1:-1]
    return v


def _simple_yaml(block: str) -> dict[str, Any]:
    """Top-level ``key: value``, ``key: [a, b]`` and ``key:`` followed by ``- item`` lines (enough for
    the keys this module copies when PyYAML is not installed)."""
    out: dict[str, Any] = {}
    key: Optional[str] = None
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_][\w-]*):\s*(.*)$", line)
        if m:
            key, value = m.group(1), m.group(2).strip()
            if value.startswith("[") and value.endswith("]"):
                out[key] = [_scalar(x) for x in value[1:-1].split(",") if x.strip()]
            elif value:
                out[key] = _scalar(value)
            else:
                out[key] = []
            continue
        item = re.match(r"^\s*-\s+(.*)$", line)
        if item and key is not None and isinstance(out.get(key), list):
            out[key].append(_scalar(item.group(1)))
    return out


# --- writing the card ------------------------------------------------------------------------------


def _yaml_value(v: Any) -> str:
    """A value as YAML: JSON scalars and flow collections are valid YAML."""
    return json.dumps(v, ensure_ascii=False)


def front_matter(report: dict[str, Any], expert_front: dict[str, Any]) -> dict[str, Any]:
    """The card's metadata as a dict (in the order it is written)."""
    adapter = (report.get("output") or {}).get("kind") == "adapter"
    meta: dict[str, Any] = {"base_model": base_model(report), "base_model_relation": "merge",
                            "library_name": "peft" if adapter else "transformers"}
    for k in COPIED_KEYS:
        if expert_front.get(k) not in (None, "", []):
            meta[k] = expert_front[k]
    meta["tags"] = list(TAGS)
    return meta


def base_model(report: dict[str, Any]) -> str:
    """The language expert's hub id when it came from the hub, else its folder name."""
    src = input_source(report, "expert")
    if src.get("hub_id"):
        return str(src["hub_id"])
    p = Path(str(src.get("path") or "expert"))
    if p.suffix == ".safetensors":
        p = p.absolute().parent
    return p.name or str(p)


def _model_arg(report: dict[str, Any], role: str) -> str:
    """How a command names an input: hub id (at the commit it resolved to, when known), else its path."""
    src = input_source(report, role)
    if src.get("hub_id"):
        rev = src.get("commit") or src.get("revision")
        return f"{src['hub_id']}@{rev}" if rev else str(src["hub_id"])
    return str(src.get("path", ""))


def commands(report: dict[str, Any], out: Optional[str] = None) -> tuple[str, str]:
    """The ``merge`` command that reproduces this output and the ``verify`` command that checks it."""
    params = report.get("parameters") or {}
    out = out or (report.get("output") or {}).get("path") or "OUT"
    models = ["-b", _model_arg(report, "base"), "-s", _model_arg(report, "safety"), "-m", _model_arg(report, "expert")]
    flags = cli_args(params)
    merge = ["layerswap-fast", "merge", *models, "-o", out, *flags]
    verify = ["layerswap-fast", "verify", out, *models, *flags]
    return shlex.join(merge), shlex.join(verify)


def render(report: dict[str, Any], expert_front: Optional[dict[str, Any]] = None) -> str:
    """The model card: front matter, then how the model was made and how to reproduce and verify it."""
    meta = front_matter(report, expert_front or {})
    fm = ["---"]
    for k, v in meta.items():
        if isinstance(v, list) and all(not isinstance(x, (list, dict)) for x in v):
            fm.append(f"{k}:")
            fm += [f"- {_yaml_value(x)}" for x in v]
        else:
            fm.append(f"{k}: {_yaml_value(v)}")
    fm.append("---")
    params = report.get("parameters") or {}
    tau = float(params.get("tau", 0.001))
    units = report.get("units") or []
    counts = report.get("counts") or {}
    name = meta["base_model"]
    merge_cmd, verify_cmd = commands(report)
    files = report.get("input_files") or {}

    def input_row(role: str, label: str) -> str:
        src = input_source(report, role)
        where = src.get("hub_id") or src.get("path", "")
        commit = src.get("commit") or src.get("revision") or ""
        f = files.get(role) or {}
        size = fmt_bytes(f["bytes"]) if f.get("bytes") is not None else ""
        return f"| {label} | `{where}` | {commit} | {size} | {f.get('shards', '')} |"

    param_rows = [f"| `{k}` | `{json.dumps(v)}` |" for k, v in params.items() if k not in ("threads", "max_memory")]
    strip = decision_strip(units, tau, colour=False)
    fragile = len(fragile_units(units, tau))
    body = [
        f"# {name} + English safety expert (layer-wise swapping)",
        "",
        f"This model is the language expert `{name}` with the units of an English safety expert swapped in where "
        "the safety fine-tuning changed them more than the language fine-tuning did, made without training by "
        "layerswap-fast with *layer-wise swapping* "
        "(Shin & Hwang, \"Layer-wise Swapping for Generalizable Multilingual Safety\", EACL 2026): per "
        f"{'decoder layer' if report.get('granularity') != 'module' else 'attention and MLP module'}, the normalised "
        "change from the base model is compared between the two experts (d = p_S − p_M); d > τ takes the safety "
        "expert's weights, d < −τ keeps the language expert's, and units in between are blended.",
        "",
        "## Inputs",
        "",
        "| role | model | commit | size | shards |",
        "|---|---|---|---:|---:|",
        input_row("base", "base model B"),
        input_row("safety", "English safety expert S"),
        input_row("expert", "language expert M (host)"),
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
        *param_rows,
        "",
        f"layout `{report.get('layout')}`, {report.get('n_layers')} layers, {report.get('granularity')} granularity, "
        f"{report.get('numerics')} numerics; layerswap-fast {report.get('version', '')}.",
        "",
        "## Decisions",
        "",
        f"{counts.get('safety', 0)} units from the safety expert, {counts.get('expert', 0)} kept from the language expert, "
        f"{counts.get('blend', 0)} blended; {fragile} fragile (the decision would flip if τ were halved or doubled). "
        "`layerswap_report.html` beside this card shows every unit's numbers; `layerswap_report.json` has them all.",
        "",
        "```text",
        strip,
        "```",
        "",
        "## Reproduce",
        "",
        "```bash",
        "pip install layerswap-fast",
        merge_cmd,
        "```",
        "",
        "## Verify",
        "",
        "Recomputes the merge with an independent torch implementation and compares every decision and tensor:",
        "",
        "```bash",
        "pip install 'layerswap-fast[check]'",
        verify_cmd,
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(fm) + "\n\n" + "\n".join(body)

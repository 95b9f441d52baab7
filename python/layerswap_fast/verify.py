"""``layerswap-fast verify``: recompute a merge with the torch reference (:mod:`layerswap_fast.reference`)
and compare it with the output folder and its report.

What is checked, and the tolerance of each check:

- the folder: index complete (every tensor of the index in the shard it names, every shard named,
  ``total_size`` right), every shard's header valid (JSON, known dtypes, offsets contiguous and
  inside the file, file size exact), no tensor missing or extra compared with the language expert;
- the report: made with the same method options, and every unit's decision identical to the
  reference's; its numbers (scores, p, d) equal to the reference's up to float64 summation order;
- every tensor: dtype and shape, and every byte: in ``exact`` and ``official`` numerics the reference
  reproduces each value exactly, so any difference is a failure. ``max_ulp=N`` (``--max-ulp N``)
  accepts blended or converted values up to N units in the last place off, for outputs made by other
  tools; a tensor copied whole must be byte-identical to its source in any case;
- side files: config.json from the language expert, tokenizer files from the model the report names.

A safety or language expert may be a PEFT LoRA adapter folder (then ``base`` is required): the
reference builds its tensors as B + ΔW from the adapter's own files, and the full output must match it
byte for byte like any other. An adapter written by ``merge --emit adapter`` is checked module by
module (:func:`_check_emitted_adapter`).

The comparison reads the output with its own safetensors header parser, not the engine's.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from layerswap_fast import decisions as decision_control
from layerswap_fast import hub, reference
from layerswap_fast.folder import CONFIG_FILES, PROCESSOR_FILES, REPORT_FILE, TOKENIZER_FILES, auto_map_files
from layerswap_fast.errors import InvalidOptionError
from layerswap_fast.lora import model_of, tokenizer_of
from layerswap_fast.options import MergeOptions, options_arg, path_arg

PathLike = Union[str, Path]

_ELEM = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
_ALL_DTYPES = set(_ELEM) | {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F8_E5M2", "F8_E4M3"}
#: Relative tolerance on the report's float64 numbers: sums in another order differ in the last bits.
REPORT_RTOL = 1e-9


@dataclass
class TensorCheck:
    """One output tensor compared with the reference.

    Attributes:
        name: tensor name.
        source: ``safety``, ``expert`` or ``blend`` per the reference plan.
        status: ``identical``, ``within-tolerance`` (only with ``max_ulp`` > 0), or a failure:
            ``missing``, ``extra``, ``dtype``, ``shape``, ``bytes`` (a whole copy that is not
            byte-identical), ``ulp`` (a computed value that differs from the reference's by more than
            ``max_ulp`` units in the last place; by default any difference).
        max_ulp: largest distance in units in the last place (-1 when not compared).
        differing: number of elements that are not bit-identical.
        detail: what is wrong, for failures.
    """

    name: str
    source: str
    status: str
    max_ulp: int = -1
    differing: int = 0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("identical", "within-tolerance")


@dataclass
class UnitCheck:
    """One unit: the reference's decision and d next to the report's; ``source`` (measured,
    override, file or band) and ``alpha`` (the blend weight, for blends) are the reference's."""

    layer: int
    part: Optional[str]
    decision_reference: str
    decision_report: Optional[str]
    d_reference: float
    d_report: Optional[float]
    detail: str = ""
    source: str = "measured"
    alpha: Optional[float] = None

    @property
    def ok(self) -> bool:
        return not self.detail

    @property
    def label(self) -> str:
        return f"layer {self.layer}" if self.part is None else f"layer {self.layer} {self.part}"


@dataclass
class VerifyResult:
    """Everything :func:`verify` found.

    Attributes:
        out: the output folder checked.
        options: the method options the reference used.
        units: one :class:`UnitCheck` per unit.
        tensors: one :class:`TensorCheck` per tensor of the reference or the output.
        problems: folder, report and side-file problems, one sentence each.
    """

    out: str
    options: dict[str, Any]
    units: list[UnitCheck] = field(default_factory=list)
    tensors: list[TensorCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    max_ulp: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing mismatched."""
        return not self.problems and all(u.ok for u in self.units) and all(t.ok for t in self.tensors)

    def mismatches(self) -> list[str]:
        """Every failure, one line each, naming the unit or the tensor."""
        lines = list(self.problems)
        lines += [f"{u.label}: {u.detail}" for u in self.units if not u.ok]
        lines += [f"tensor '{t.name}' ({t.source}): {t.status}: {t.detail}" for t in self.tensors if not t.ok]
        return lines

    def summary(self) -> str:
        """A table of what was compared and how it came out, then every mismatch."""
        o = self.options
        rows = [
            f"verify {self.out}: granularity {o['granularity']}, tau {o['tau']:g}, alpha {o['alpha']:g}, numerics {o['numerics']}",
            f"{'checked':<30} {'total':>6} {'identical':>10} {f'<= {self.max_ulp} ulp' if self.max_ulp else '':>9} {'mismatch':>9}",
        ]
        n_units_bad = sum(not u.ok for u in self.units)
        rows.append(f"{'unit decisions':<30} {len(self.units):>6} {len(self.units) - n_units_bad:>10} {'-':>9} {n_units_bad:>9}")
        sources = {s: sum(u.source == s for u in self.units) for s in ("measured", "band", "file", "override")}
        if any(n for s, n in sources.items() if s != "measured"):
            rows.append("  decided by: " + ", ".join(f"{n} {s}" for s, n in sources.items() if n))
        for source in ("safety", "expert", "blend"):
            ts = [t for t in self.tensors if t.source == source]
            if not ts:
                continue
            ident = sum(t.status == "identical" for t in ts)
            near = sum(t.status == "within-tolerance" for t in ts)
            rows.append(f"{'tensors from ' + source:<30} {len(ts):>6} {ident:>10} {near if self.max_ulp or near else '':>9} {len(ts) - ident - near:>9}")
        other = [t for t in self.tensors if t.source not in ("safety", "expert", "blend")]
        if other:
            rows.append(f"{'tensors not in the reference':<30} {len(other):>6} {0:>10} {0:>9} {len(other):>9}")
        rows.append(f"{'folder, report, side files':<30} {'':>6} {'':>10} {'':>9} {len(self.problems):>9}")
        bad = self.mismatches()
        rows.append("verified: output matches the reference" if not bad else f"MISMATCH: {len(bad)} problem(s)")
        rows += [f"  {line}" for line in bad]
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for ``--json``)."""
        return {
            "ok": self.ok,
            "out": self.out,
            "options": self.options,
            "max_ulp": self.max_ulp,
            "problems": self.problems,
            "units": [{**asdict(u), "ok": u.ok} for u in self.units],
            "tensors": [{**asdict(t), "ok": t.ok} for t in self.tensors],
        }


# --- the output folder ----------------------------------------------------------------------------------


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """Parses and validates one safetensors file's header. Returns name -> entry.

    Raises:
        ValueError: naming the file and what is wrong.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{path}: tensor '{name}': malformed entry {entry!r}")
        if entry["dtype"] not in _ALL_DTYPES:
            raise ValueError(f"{path}: tensor '{name}': unknown dtype {entry['dtype']!r}")
        shape, (lo, hi) = entry["shape"], entry["data_offsets"]
        if not all(isinstance(x, int) and x >= 0 for x in shape):
            raise ValueError(f"{path}: tensor '{name}': bad shape {shape!r}")
        want = math.prod(shape) * _ELEM.get(entry["dtype"], 1)
        if entry["dtype"] in _ELEM and hi - lo != want:
            raise ValueError(f"{path}: tensor '{name}': {hi - lo} bytes for shape {shape} {entry['dtype']} ({want} expected)")
        spans.append((lo, hi, name))
    spans.sort()
    pos = 0
    for lo, hi, name in spans:
        if lo != pos:
            raise ValueError(f"{path}: tensor '{name}': data starts at {lo}, expected {pos} (gap or overlap)")
        pos = hi
    if 8 + n + pos != size:
        raise ValueError(f"{path}: data ends at byte {8 + n + pos} but the file has {size} bytes")
    return header


def check_folder(out: Path) -> tuple[dict[str, Path], list[str]]:
    """Checks the output folder's shards and index. Returns tensor name -> shard file, and problems."""
    problems: list[str] = []
    where: dict[str, Path] = {}
    index_path = out / reference.INDEX_FILE
    shards = sorted(p for p in out.glob("*.safetensors"))
    if not shards:
        return where, [f"{out}: no .safetensors file"]
    headers: dict[Path, dict] = {}
    for p in shards:
        try:
            headers[p] = read_header(p)
        except ValueError as e:
            problems.append(str(e))
    for p, h in headers.items():
        for name in h:
            if name in where:
                problems.append(f"tensor '{name}' is in both {where[name].name} and {p.name}")
            where[name] = p
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        weight_map = index.get("weight_map", {})
        for name, fname in weight_map.items():
            if not (out / fname).is_file():
                problems.append(f"{index_path.name}: tensor '{name}' is in {fname}, which does not exist")
            elif name not in headers.get(out / fname, {}):
                problems.append(f"{index_path.name}: tensor '{name}' is not in {fname}, where the index says it is")
        for name in where:
            if name not in weight_map:
                problems.append(f"{index_path.name}: tensor '{name}' ({where[name].name}) is missing from the index")
        unnamed = {p.name for p in shards} - set(weight_map.values())
        if unnamed:
            problems.append(f"{index_path.name}: shard(s) {', '.join(sorted(unnamed))} not named by the index")
        total = sum(e["data_offsets"][1] - e["data_offsets"][0] for h in headers.values() for e in h.values())
        if index.get("metadata", {}).get("total_size") not in (None, total):
            problems.append(f"{index_path.name}: total_size {index['metadata']['total_size']} but the shards hold {total} bytes")
    elif len(shards) > 1:
        problems.append(f"{out}: {len(shards)} shards but no {reference.INDEX_FILE}")
    return where, problems


def _side_files(out: Path, expert: Optional[Path], tokenizer_source: Optional[Path], out_dtype: Optional[str]) -> list[str]:
    """Every side file of the sources is in the output; config.json states the output dtype."""
    problems = []
    for src, names, config_name in ((expert, CONFIG_FILES + PROCESSOR_FILES, "config.json"),
                                    (tokenizer_source, TOKENIZER_FILES, "tokenizer_config.json")):
        if src is None or not src.is_dir():
            continue
        code, _ = auto_map_files(src, config_name)
        for name in list(names) + code:
            if not (src / name).is_file():
                continue
            if not (out / name).is_file():
                problems.append(f"{out / name}: missing (the source has {src / name})")
            elif name == "config.json" and out_dtype is not None:
                want = _config_stating(json.loads((src / name).read_text()), _TORCH_NAMES[out_dtype])
                if json.loads((out / name).read_text()) != want:
                    problems.append(f"{out / name}: not {src / name} with torch_dtype/dtype {_TORCH_NAMES[out_dtype]!r}")
            elif (out / name).read_bytes() != (src / name).read_bytes():
                problems.append(f"{out / name}: not the same as {src / name}")
    return problems


_TORCH_NAMES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64"}


def _config_stating(cfg: Any, name: str) -> Any:
    """What config.json must say for an output of dtype ``name``: every dtype field set to it."""
    if isinstance(cfg, dict):
        return {k: name if k in ("torch_dtype", "dtype") and isinstance(v, str) and v != "auto" else _config_stating(v, name)
                for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [_config_stating(v, name) for v in cfg]
    return cfg


# --- tensors ---------------------------------------------------------------------------------------------


def ulp_distance(a: Any, b: Any) -> tuple[int, int]:
    """(largest distance in units in the last place, number of elements not bit-identical) between two
    torch tensors of the same float dtype and shape. NaN against NaN counts as equal; NaN against a
    number counts as infinitely far."""
    torch = reference._torch()
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
    it = ints[a.dtype]
    bits = torch.finfo(a.dtype).bits
    sign = 1 << (bits - 1)

    def ordered(t: Any) -> Any:
        # Sign-magnitude bit patterns to integers in the order of the values they encode.
        i = t.contiguous().view(it).to(torch.int64)
        mag = i & (sign - 1)
        return torch.where(i < 0, -mag, mag)

    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    same_bits = a.contiguous().view(it) == b.contiguous().view(it)
    differing = int((~same_bits & ~(nan_a & nan_b)).sum())
    if differing == 0:
        return 0, 0
    if bool((nan_a ^ nan_b).any()):
        return 1 << 62, differing
    d = (ordered(a) - ordered(b)).abs()
    d = torch.where(nan_a & nan_b, torch.zeros_like(d), d)
    return int(d.max()), differing


def _first_diff(a: Any, b: Any) -> str:
    torch = reference._torch()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    it = ints[a.element_size()]
    flat = (a.contiguous().view(it) != b.contiguous().view(it)).flatten().nonzero()
    if not len(flat):
        return ""
    i = int(flat[0])
    return f"first at flat index {i}: {float(a.flatten()[i])!r} in the output, {float(b.flatten()[i])!r} expected"


_ST_NAMES = {"bf16": "BF16", "f16": "F16", "f32": "F32", "f64": "F64"}


def verify(
    out: PathLike,
    base: Optional[PathLike],
    safety: PathLike,
    expert: PathLike,
    *,
    options: Optional[MergeOptions] = None,
    layout: Optional[PathLike] = None,
    max_ulp: int = 0,
    decisions: Optional[PathLike] = None,
    **kwargs: Any,
) -> VerifyResult:
    """Recomputes a merge with the torch reference and compares it with the output folder ``out``.

    Args:
        out: the folder ``merge`` wrote.
        base, safety, expert: the models it was made from (paths or hub ids, as for ``merge``).
        options: the :class:`MergeOptions` of the merge; keyword arguments (``granularity=``,
            ``tau=``, ``alpha=``, ``numerics=``, ``outside=``, ``norms=``, ``vocab_from=``,
            ``out_dtype=``...) override its fields. Resource options are ignored.
        layout: the custom layout file given to the merge, if any. Without one, the reference takes
            the units of the family the report names from its own table (:data:`reference.FAMILIES`,
            written from the families' modeling code); it never reads the engine's layout files.
        max_ulp: 0 (the default) requires every byte to equal the reference's, as ``exact`` and
            ``official`` numerics guarantee; N > 0 accepts blended or converted values up to N units
            in the last place off, for outputs made by other tools.
        decisions: the decisions file given to the merge, if any: the reference takes its decisions
            (then ``options.overrides``) instead of measuring, and ``base`` may be None.

    Overrides and bands in ``options`` are applied to the reference's measured decisions the way the
    merge applied them; every unit's decision, α and source must match the report's.

    Returns:
        A :class:`VerifyResult`; ``result.ok`` is False on any mismatch.

    Raises:
        ImportError: torch or safetensors is not installed (says how to install them).
        FileNotFoundError: ``out`` or a model does not exist.
    """
    if isinstance(max_ulp, bool) or not isinstance(max_ulp, int) or max_ulp < 0:
        raise InvalidOptionError(f"max_ulp must be a whole number >= 0; got {max_ulp!r}")
    options_arg(options)
    reference._torch()
    _dtype_cache.clear()  # models may have been rewritten since the last call
    opts = options.replace(**kwargs) if options is not None and kwargs else options or MergeOptions(**kwargs)
    out_p = path_arg(out, "out")
    safety_p, expert_p = (hub.resolve(path_arg(m, role)).path for m, role in ((safety, "safety"), (expert, "expert")))
    base_p = hub.resolve(path_arg(base, "base")).path if base is not None or decisions is None else None
    if not out_p.is_dir():
        raise FileNotFoundError(f"{out_p}: no such output folder")
    from_file = decision_control.load_decisions(decisions) if decisions is not None else None
    if from_file is not None:
        opts = opts.replace(granularity=from_file["granularity"])
    elif base_p is None:
        raise ValueError("verify needs the base model unless the merge's decisions came from a file")
    vocab_from = getattr(opts, "vocab_from", "outside")
    method = {"granularity": opts.granularity, "tau": opts.tau, "alpha": opts.alpha, "numerics": opts.numerics,
              "outside": opts.outside, "norms": opts.norms, "vocab_from": vocab_from, "out_dtype": opts.effective_out_dtype,
              "select": opts.select, "bands": opts.bands, "overrides": opts.overrides}
    result = VerifyResult(str(out_p), method, max_ulp=max_ulp)

    report: dict[str, Any] = {}
    report_path = out_p / REPORT_FILE
    if report_path.is_file():
        report = json.loads(report_path.read_text())
    else:
        result.problems.append(f"{report_path}: missing")
    params = report.get("parameters", {})
    for key, want in method.items():
        want = json.loads(json.dumps(want))  # tuples as the report's JSON lists
        if key in params and params[key] != want and not (isinstance(want, float) and params[key] == want):
            result.problems.append(f"{REPORT_FILE}: the merge used {key}={params[key]!r}, but verify was asked for {want!r}")

    # The units come from the reference's own family table (written from the modeling code), chosen
    # by the family name the report states; a custom layout file is the user's own definition.
    patterns_layout: Any = layout
    if layout is None and report.get("layout") is not None:
        try:
            patterns_layout = reference.family_patterns(report["layout"])
        except KeyError as e:
            result.problems.append(f"{REPORT_FILE}: {e.args[0]}")
            return result

    lora = [p for p in (safety_p, expert_p) if reference.is_adapter(p)]
    if lora and opts.numerics != "exact":
        result.problems.append(f"{lora[0]} is a LoRA adapter: LoRA merges are made in exact numerics only")
        return result
    if lora and base_p is None:
        result.problems.append(f"{lora[0]} is a LoRA adapter: verify needs the base model (-b) it was trained on")
        return result
    plan = _reference_plan(base_p, safety_p, expert_p, opts, patterns_layout, from_file)
    _check_units(result, plan, report)

    if report.get("output", {}).get("kind") == "adapter" or (out_p / reference.ADAPTER_CONFIG).is_file():
        assert base_p is not None
        _check_emitted_adapter(result, out_p, base_p, safety_p, expert_p, plan, opts, patterns_layout, report)
        return result

    where, problems = check_folder(out_p)
    result.problems += problems
    tok = {"expert": expert_p, "base": base_p, "safety": safety_p}.get(params.get("tokenizer_from", opts.effective_tokenizer_from))
    if tok is not None and base_p is not None:
        tok = tokenizer_of(tok, base_p)  # an adapter's own tokenizer if it saved one, else the base model's
    host = model_of(expert_p, base_p) if base_p is not None else expert_p  # B + ΔW has B's config
    if report.get("inputs", {}).get("config_from"):  # merge --config-from: every side file came from there
        host = tok = Path(report["inputs"]["config_from"])
    result.problems += _side_files(out_p, host, tok, opts.effective_out_dtype)

    from safetensors import safe_open

    handles: dict[Path, Any] = {}
    seen = set()
    opened: dict[str, Any] = {}
    if lora:
        B = reference.Checkpoint(base_p)  # type: ignore[arg-type]
        opened = {"safety": reference.open_model(safety_p, B), "expert": reference.open_model(expert_p, B)}
    for name, source, want in reference.merged_tensors(safety_p, expert_p, plan, outside=opts.outside, norms=opts.norms,
                                                        vocab_from=vocab_from, out_dtype=opts.effective_out_dtype,
                                                        layout=patterns_layout, base=base_p):
        seen.add(name)
        if name not in where:
            result.tensors.append(TensorCheck(name, source, "missing", detail="not in the output"))
            continue
        if where[name] not in handles:
            handles[where[name]] = safe_open(str(where[name]), framework="pt")
        got = handles[where[name]].get_tensor(name)
        if opened:
            whole = _whole_copy_lora(source, opened, name, want.dtype)
        else:
            whole = _whole_copy(source, opts, safety_p, expert_p, name)
        result.tensors.append(_compare(name, source, got, want, whole_copy=whole, max_ulp=max_ulp))
    for name in sorted(set(where) - seen):
        result.tensors.append(TensorCheck(name, "-", "extra", detail=f"in {where[name].name} but not in the language expert"))
    return result


#: Unit roundoff of a factor dtype: an emitted factor scaled by α (or a folded scale) is rounded once to it.
_UNIT_ROUNDOFF = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}


def _check_emitted_adapter(result: VerifyResult, out: Path, base: Path, safety: Path, expert: Path, plan: reference.RefPlan,
                           opts: MergeOptions, layout: Any, report: dict[str, Any]) -> None:
    """Checks an adapter written by ``merge --emit adapter`` against the reference, module by module.

    The emitted adapter is read the way PEFT reads it (its ``adapter_config.json``: rank and alpha per
    module through ``rank_pattern``/``alpha_pattern``). For every tensor of the language expert, the
    reference's decision says which adapters' updates it must carry, with which weight: ΔW_ref =
    w_S·ΔW_S + w_M·ΔW_M. Then:

    - a module taken unchanged from one adapter must have that adapter's factor bytes (exact), and a
      tensor saved whole (``modules_to_save``) the saving adapter's bytes;
    - a blended module's ΔW (explicit product of its factors) must be within the rounding of scaled
      factors: ``|ΔW_out − ΔW_ref| ≤ (u + 4·r·2⁻⁵³) · Σ_X w_X·scale_X·(|P_X|·|Q_X|)`` element-wise, u
      the unit roundoff of the emitted lora_B dtype (2⁻²⁴ for F32) and r the emitted rank: the factor
      α·B (and a scale folded into it when the two adapters' scales differ) is rounded once;
    - no module or tensor is missing or extra.
    """
    torch = reference._torch()
    where, problems = check_folder(out)
    result.problems += problems
    if not (out / reference.ADAPTER_CONFIG).is_file() or not (out / reference.ADAPTER_WEIGHTS).is_file():
        result.problems.append(f"{out}: an emitted adapter needs {reference.ADAPTER_CONFIG} and {reference.ADAPTER_WEIGHTS}")
        return
    if not (reference.is_adapter(safety) and reference.is_adapter(expert)):
        result.problems.append(f"{out}: an adapter output needs two LoRA adapter experts")
        return
    if problems:
        return
    tok = {"expert": expert, "base": base, "safety": safety}[opts.effective_tokenizer_from]
    result.problems += _side_files(out, None, tokenizer_of(tok, base), None)
    B = reference.Checkpoint(base)
    S, M = reference.AdapterCheckpoint(safety, B), reference.AdapterCheckpoint(expert, B)
    try:
        E = reference.AdapterCheckpoint(out, B)
    except (ValueError, KeyError) as e:
        result.problems.append(f"{out / reference.ADAPTER_CONFIG}: {e}")
        return
    patterns = reference.Patterns.from_layout(layout)
    seen_saved = set()
    for name in M.names():
        place = patterns.place(name)
        source = reference.source_of(place, plan, opts.outside, opts.norms, getattr(opts, "vocab_from", "outside"))
        alpha = plan.alpha_of(place.layer, place.part) if place.part != "unassigned" else plan.alpha
        if name not in S:
            source = "expert"
        weights = {"safety": ((S, 1.0),), "expert": ((M, 1.0),), "blend": ((S, alpha), (M, 1.0 - alpha))}[source]
        weights = tuple((X, w) for X, w in weights if w != 0.0)
        updates = [(X, w) for X, w in weights if X.updated(name)]
        # (a targeted embedding PEFT also saved whole as its base_layer is B's own weight, not a saved module)
        saved = [(X, w) for X, w in weights if name in X.saved and not X.updated(name)]
        if saved and name not in E.saved:
            result.tensors.append(TensorCheck(name, source, "missing", detail=f"saved whole by {saved[0][0].path}, not in the emitted adapter"))
        elif saved:
            seen_saved.add(name)
            got, want = E.get(name), saved[0][0].get(name)
            result.tensors.append(_compare(name, source, got, want, whole_copy=True))
        if not updates:
            if E.updated(name):
                result.tensors.append(TensorCheck(name, source, "extra", detail="the emitted adapter updates it, but no adapter the decisions take does"))
            continue
        if not E.updated(name):
            result.tensors.append(TensorCheck(name, source, "missing", detail="no LoRA factors for it in the emitted adapter"))
            continue
        eu = E.updates[name]
        a_shape = E.raw_info(eu.a)[1]
        if a_shape[0] != eu.rank:
            result.tensors.append(TensorCheck(name, source, "shape", detail=f"lora_A has {a_shape[0]} rows but the config gives rank {eu.rank}"))
            continue
        if len(updates) == 1 and updates[0][1] == 1.0:
            X = updates[0][0]
            xu = X.updates[name]
            same = all(torch.equal(E.raw(getattr(eu, f)), X.raw(getattr(xu, f))) for f in ("a", "b"))
            if not same or eu.rank != xu.rank or not math.isclose(eu.scale, xu.scale, rel_tol=4 * 2.0**-52):
                result.tensors.append(TensorCheck(name, source, "bytes", detail=f"not the factors (rank {xu.rank}, scale {xu.scale!r}) of {X.path}: "
                                                  f"rank {eu.rank}, scale {eu.scale!r}"))
            else:
                result.tensors.append(TensorCheck(name, source, "identical", 0, 0))
            continue
        want = updates[0][1] * updates[0][0].delta(name)
        for X, w in updates[1:]:
            want = want + w * X.delta(name)
        bound = torch.zeros_like(want)
        for X, w in updates:
            xu = X.updates[name]
            a, b = X.raw(xu.a).to(torch.float64).abs(), X.raw(xu.b).to(torch.float64).abs()
            p_, q_ = (a.T, b.T) if xu.transposed else (b, a)
            bound = bound + abs(w * xu.scale) * (p_ @ q_)
        u = _UNIT_ROUNDOFF[E.raw_info(eu.b)[0]]
        tol = (u + 4 * eu.rank * 2.0**-53) * bound
        err = (E.delta(name) - want).abs()
        over = int((err > tol).sum())
        if over:
            i = int((err - tol).flatten().argmax())
            result.tensors.append(TensorCheck(name, source, "ulp", -1, over,
                                              f"{over} element(s) of its ΔW beyond the rounding bound of its factors; worst at flat index {i}: "
                                              f"{float(E.delta(name).flatten()[i])!r} vs {float(want.flatten()[i])!r} (bound {float(tol.flatten()[i]):.3e})"))
        else:
            result.tensors.append(TensorCheck(name, source, "within-tolerance", -1, 0, "ΔW within the rounding bound of its scaled factors"))
    for name in sorted(set(E.saved) - seen_saved):
        result.tensors.append(TensorCheck(name, "-", "extra", detail="saved whole in the emitted adapter, but no adapter the decisions take saved it"))
    modules = {m["module"]: m for m in report.get("output", {}).get("modules", [])}
    for name, eu in E.updates.items():
        m = modules.get(name[: -len(".weight")])
        if m is not None and m["rank"] != eu.rank:
            result.problems.append(f"{REPORT_FILE}: module {m['module']} has rank {m['rank']} in the report, {eu.rank} in the adapter")


def _reference_plan(base: Optional[Path], safety: Path, expert: Path, opts: MergeOptions, layout: Any,
                    from_file: Optional[dict[str, Any]]) -> reference.RefPlan:
    """The reference's plan: measured by the reference (or read from the decisions file), then the
    bands and overrides of ``opts`` applied to its units."""
    if from_file is None:
        assert base is not None
        plan = reference.compute_plan(base, safety, expert, granularity=opts.granularity, tau=opts.tau, alpha=opts.alpha,
                                      numerics=opts.numerics, layout=layout)
        source = "measured"
    else:
        units = [reference.RefUnit(u["layer"], u["part"], u["score_safety"], u["score_expert"], u["p_safety"], u["p_expert"], u["d"],
                                   u["decision"], u["alpha"], "file") for u in from_file["units"]]
        plan = reference.RefPlan(opts.granularity, opts.numerics, float(opts.tau), float(opts.alpha), from_file["n_layers"], units)
        source = "file"
    controlled = decision_control.apply([asdict(u) for u in plan.units], n_layers=plan.n_layers, granularity=plan.granularity,
                                        alpha=opts.alpha, select=opts.select, bands=opts.bands, overrides=opts.overrides, source=source)
    return plan.with_decisions({(u["layer"], u["part"]): (u["decision"], u["alpha"], u["source"]) for u in controlled})


def _whole_copy(source: str, opts: MergeOptions, safety: Path, expert: Path, name: str) -> bool:
    """True when the output tensor must be the source's bytes unchanged: a copy in the source's own
    dtype (exact numerics), or of a bf16 source (official numerics load in bf16, which changes nothing)."""
    if source not in ("safety", "expert"):
        return False
    stored = _stored_dtype(safety if source == "safety" else expert, name)
    out_dtype = opts.effective_out_dtype
    same = out_dtype is None or _ST_NAMES[out_dtype] == stored
    return same and (opts.numerics == "exact" or stored == "BF16")


def _whole_copy_lora(source: str, opened: dict[str, Any], name: str, out_dtype: Any) -> bool:
    """:func:`_whole_copy` when an expert is a LoRA adapter (exact numerics): a tensor from an adapter is
    a whole copy when the adapter leaves it as stored (B's, or saved whole) in the output's dtype."""
    if source not in ("safety", "expert") or opened[source].updated(name):
        return False
    return bool(opened[source].stored_dtype(name) == out_dtype)


_dtype_cache: dict[Path, dict[str, str]] = {}


def _stored_dtype(model: Path, name: str) -> str:
    if model not in _dtype_cache:
        m: dict[str, str] = {}
        for f in reference.shard_files(model):
            m.update({k: v["dtype"] for k, v in read_header(f).items()})
        _dtype_cache[model] = m
    return _dtype_cache[model][name]


def _compare(name: str, source: str, got: Any, want: Any, whole_copy: bool, max_ulp: int = 0) -> TensorCheck:
    if got.dtype != want.dtype:
        return TensorCheck(name, source, "dtype", detail=f"{got.dtype} in the output, {want.dtype} expected")
    if tuple(got.shape) != tuple(want.shape):
        return TensorCheck(name, source, "shape", detail=f"{list(got.shape)} in the output, {list(want.shape)} expected")
    if not want.is_floating_point():
        # Non-float tensors are copied verbatim: equal or wrong, there is no ulp.
        differing = int((got != want).sum())
        if differing == 0:
            return TensorCheck(name, source, "identical", 0, 0)
        return TensorCheck(name, source, "bytes", 0, differing, f"{differing} element(s) differ from the {source} expert's")
    ulp, differing = ulp_distance(got, want)
    if differing == 0:
        return TensorCheck(name, source, "identical", 0, 0)
    if whole_copy:
        return TensorCheck(name, source, "bytes", ulp, differing,
                           f"{differing} element(s) differ from the {source} expert's bytes; {_first_diff(got, want)}")
    if ulp <= max_ulp:
        return TensorCheck(name, source, "within-tolerance", ulp, differing)
    allowed = "the reference reproduces every byte" if max_ulp == 0 else f"--max-ulp {max_ulp}"
    return TensorCheck(name, source, "ulp", ulp, differing,
                       f"{differing} element(s) differ, up to {ulp} ulp ({allowed}); {_first_diff(got, want)}")


def _close(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= REPORT_RTOL * max(abs(a), abs(b)) + 1e-15


def _check_units(result: VerifyResult, plan: reference.RefPlan, report: dict[str, Any]) -> None:
    got = {(u["layer"], u.get("part")): u for u in report.get("units", [])}
    for u in plan.units:
        r = got.pop((u.layer, u.part), None)
        check = UnitCheck(u.layer, u.part, u.decision, r and r["decision"], u.d, r and r["d"], source=u.source, alpha=u.alpha)
        if r is None:
            check.detail = "missing from the report"
        elif r["decision"] != u.decision:
            check.detail = f"decision {r['decision']} in the report, {u.decision} in the reference (d {r['d']:+.3e} vs {u.d:+.3e}, tau {plan.tau:g})"
        elif (r.get("source", "measured"), r.get("alpha", plan.alpha if r["decision"] == "blend" else None)) != (u.source, u.alpha):
            # (reports written before decision control carry neither field: measured, at the run's alpha)
            check.detail = (f"{u.decision} from {r.get('source')} with alpha {r.get('alpha')} in the report, "
                            f"from {u.source} with alpha {u.alpha} in the reference")
        else:
            off = [k for k, v in (("score_safety", u.score_safety), ("score_expert", u.score_expert), ("p_safety", u.p_safety),
                                  ("p_expert", u.p_expert), ("d", u.d)) if not _close(float(r[k]), v)]
            if off:
                check.detail = "report numbers differ from the reference: " + ", ".join(f"{k} {r[k]!r} vs {getattr(u, k)!r}" for k in off)
        result.units.append(check)
    for layer, part in got:
        result.units.append(UnitCheck(layer, part, "-", got[(layer, part)]["decision"], math.nan, got[(layer, part)]["d"],
                                      "in the report but not a unit of the reference"))


# --- exact vs official --------------------------------------------------------------------------------------


def compare_numerics(base: PathLike, safety: PathLike, expert: PathLike, *, options: Optional[MergeOptions] = None,
                     layout: Optional[PathLike] = None, **kwargs: Any) -> dict[str, Any]:
    """Runs the engine's analysis in ``exact`` and in ``official`` numerics and lists the units whose
    decision differs between them (units whose d lies within about 1e-4 of ±τ can flip).

    Returns:
        ``{"exact": Plan, "official": Plan, "flips": [{"unit", "layer", "part", "exact", "official",
        "d_exact", "d_official"}, ...]}``.
    """
    from layerswap_fast import api

    kwargs.pop("numerics", None)
    opts = options.replace(**kwargs) if options is not None and kwargs else options or MergeOptions(**kwargs)
    plans = {n: api.analyze(base, safety, expert, options=opts.replace(numerics=n), layout=layout) for n in ("exact", "official")}
    flips = [
        {"unit": a.label, "layer": a.layer, "part": a.part, "exact": a.decision, "official": b.decision, "d_exact": a.d, "d_official": b.d}
        for a, b in zip(plans["exact"].units, plans["official"].units)
        if a.decision != b.decision
    ]
    return {**plans, "flips": flips}

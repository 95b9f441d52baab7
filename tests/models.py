"""Test helpers independent of the engine: the tests' one safetensors reader, a straightforward numpy
computation of METHOD.md (Llama naming), and the one check of a merge's output against it (decisions and
bytes).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

NP_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header of one .safetensors file as written (``__metadata__`` included, in file order) and the
    absolute offset of its data section, from which every ``data_offsets`` counts."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)), 8 + n


def shard_files(model: Path) -> list[Path]:
    """The .safetensors files of a model folder (all of them, sorted), or the file itself."""
    model = Path(model)
    return [model] if model.is_file() else sorted(model.glob("*.safetensors"))


def locate(model: Path, name: str) -> tuple[Path, int, int, str]:
    """(file, absolute byte offset, size in bytes, dtype) of one tensor of a model folder or file."""
    for f in shard_files(model):
        header, start = read_header(f)
        if name in header:
            lo, hi = header[name]["data_offsets"]
            return f, start + lo, hi - lo, header[name]["dtype"]
    raise KeyError(name)


def read_file(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes) of one .safetensors file."""
    header, start = read_header(path)
    header.pop("__metadata__", None)
    data = Path(path).read_bytes()
    return {k: (v["dtype"], v["shape"], data[start + v["data_offsets"][0] : start + v["data_offsets"][1]]) for k, v in header.items()}


def read_model(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """All tensors of a model folder (index or single file) or a single file."""
    path = Path(path)
    if path.is_file():
        return read_file(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, Any] = {}
    for f in files:
        out.update(read_file(path / f))
    return out


def decode(dtype: str, raw: bytes) -> np.ndarray:
    """Raw bytes to float64 (exact)."""
    if dtype == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.frombuffer(raw, NP_DTYPES[dtype]).astype(np.float64)


def encode_f32(values: np.ndarray, dtype: str) -> bytes:
    """float32 values to bytes of dtype, rounding once to nearest even."""
    v = np.asarray(values, dtype=np.float32)
    if dtype == "BF16":
        u = v.view(np.uint32)
        return ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype("<u2").tobytes()
    if dtype == "F64":
        return v.astype("<f8").tobytes()
    return v.astype(NP_DTYPES[dtype]).tobytes()


LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
TARGET = re.compile(r"^(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.(weight|bias)$")


def unit_of(name: str, granularity: str) -> Any:
    """The unit a tensor's decision comes from, or 'outside' / 'norm'."""
    m = LAYER.match(name)
    if not m:
        return "outside"
    layer, rest = int(m.group(1)), m.group(2)
    if granularity == "layer":
        return layer
    if rest.startswith("self_attn."):
        return (layer, "attention")
    if rest.startswith("mlp."):
        return (layer, "mlp")
    return "norm"


def method_decisions(measured: Any, granularity: str, tau: float = 0.001) -> dict[Any, dict[str, Any]]:
    """METHOD.md §2–§4 in plain numpy over ``(unit, B, S, M)`` float64 arrays of every measured
    tensor: unit -> {A_s, A_m, p_s, p_m, d, decision}."""
    scores: dict[Any, list[float]] = {}
    for unit, b, s, m in measured:
        nb = np.linalg.norm(b)
        acc = scores.setdefault(unit, [0.0, 0.0])
        for i, x in enumerate((s, m)):
            nd = np.linalg.norm(x - b)
            r = nd / nb if nb > 1e-8 else nd
            acc[i] += r if granularity == "layer" else r * r
    if granularity == "module":
        scores = {u: [np.sqrt(a), np.sqrt(c)] for u, (a, c) in scores.items()}
    tot_s = sum(v[0] for v in scores.values()) + 1e-8
    tot_m = sum(v[1] for v in scores.values()) + 1e-8
    out = {}
    for u, (a_s, a_m) in scores.items():
        ps, pm = a_s / tot_s, a_m / tot_m
        d = ps - pm
        out[u] = dict(A_s=a_s, A_m=a_m, p_s=ps, p_m=pm, d=d, decision="safety" if d > tau else "expert" if d < -tau else "blend")
    return out


def numpy_plan(base: Path, safety: Path, expert: Path, granularity: str = "layer", tau: float = 0.001) -> dict[Any, dict[str, Any]]:
    """METHOD.md §1–§4 in plain numpy for Llama names: unit -> {A_s, A_m, p_s, p_m, d, decision}."""
    B, S, M = read_model(base), read_model(safety), read_model(expert)

    def measured() -> Any:
        for name, (dtype, _, raw) in B.items():
            m = LAYER.match(name)
            if m and TARGET.match(m.group(2)):
                yield unit_of(name, granularity), decode(dtype, raw), decode(S[name][0], S[name][2]), decode(M[name][0], M[name][2])

    return method_decisions(measured(), granularity, tau)


def engine_units(plan: Any) -> dict[Any, Any]:
    """The engine's plan keyed like :func:`numpy_plan`."""
    return {(u.layer if u.part is None else (u.layer, u.part)): u for u in plan.units}


def expected_bytes(name: str, decision: str, S: dict, M: dict, alpha: float, out_dtype: str | None = None) -> bytes:
    """What METHOD.md says the output tensor is, for the default 'exact' numerics."""
    dtype = out_dtype or M[name][0]
    if decision in ("safety", "expert"):
        src = S if decision == "safety" else M
        if src[name][0] == dtype:
            return src[name][2]
        return encode_f32(decode(src[name][0], src[name][2]).astype(np.float32), dtype)
    if "F64" in (dtype, S[name][0]):
        # F64 models are blended in float64 (float32 would lose precision the input had).
        s64, m64 = decode(S[name][0], S[name][2]), decode(M[name][0], M[name][2])
        return (alpha * s64 + (1.0 - alpha) * m64).astype("<f8").tobytes() if dtype == "F64" else encode_f32((alpha * s64 + (1.0 - alpha) * m64).astype(np.float32), dtype)
    s = decode(S[name][0], S[name][2]).astype(np.float32)
    m = decode(M[name][0], M[name][2]).astype(np.float32)
    blended = np.float32(alpha) * s + np.float32(1.0 - alpha) * m
    return encode_f32(blended, dtype)


def tensor_decision(name: str, plan_units: dict[Any, Any], granularity: str, outside: str = "blend", norms: str = "expert") -> str:
    unit = unit_of(name, granularity)
    if unit == "outside":
        return outside
    if unit == "norm":
        return norms
    return plan_units[unit]["decision"] if isinstance(plan_units[unit], dict) else plan_units[unit].decision


# --- the one check of a merge's output -------------------------------------------------------------------


def unit_key(unit: dict[str, Any]) -> Any:
    """A report unit's key, as :func:`numpy_plan` keys them: the layer, or (layer, part)."""
    return unit["layer"] if unit["part"] is None else (unit["layer"], unit["part"])


def numpy_units(ref: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """What the report must say of every unit, from a numpy plan: the decision, and the scores and d to
    float64 rounding (d = p_s - p_m cancels, hence its looser relative tolerance)."""
    return {key: {"decision": r["decision"], "score_safety": pytest.approx(r["A_s"], rel=1e-9),
                  "score_expert": pytest.approx(r["A_m"], rel=1e-9), "d": pytest.approx(r["d"], rel=1e-7, abs=1e-12)}
            for key, r in ref.items()}


def numpy_expected(paths: dict[str, Path], granularity: str, alpha: float = 0.5, tau: float = 0.001) -> dict[str, Any]:
    """``units`` and ``source`` for :func:`check_output` from :func:`numpy_plan` (Llama names, the
    method's rule alone): every unit's measured decision and scores, every tensor's source at ``alpha``."""
    ref = numpy_plan(paths["base"], paths["safety"], paths["expert"], granularity, tau=tau)
    return {"units": numpy_units(ref), "source": lambda name: (tensor_decision(name, ref, granularity), alpha)}


def check_output(paths: dict[str, Path], out: Path, report: dict[str, Any], units: dict[Any, dict[str, Any]],
                 source: Callable[[str], tuple[str, float]], out_dtype: str | None = None) -> None:
    """A merge's output against an independent expectation: the report has exactly the units of ``units``
    and each has the values given there (any of its fields); the output has exactly the language expert's
    tensors, each with its shape, its dtype (or ``out_dtype``) and the bytes of :func:`expected_bytes`
    for ``source(name)`` = (decision, alpha)."""
    got = {unit_key(u): u for u in report["units"]}
    assert set(got) == set(units)
    for key, want in units.items():
        assert {field: got[key][field] for field in want} == want, key
    S, M, O = read_model(paths["safety"]), read_model(paths["expert"]), read_model(out)
    assert set(O) == set(M)
    for name in M:
        decision, alpha = source(name)
        dtype = out_dtype.upper() if out_dtype else M[name][0]
        assert O[name][:2] == (dtype, M[name][1]), name
        assert O[name][2] == expected_bytes(name, decision, S, M, alpha, dtype), f"{name} ({decision} {alpha}) differs"

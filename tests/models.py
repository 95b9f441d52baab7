"""Test helpers independent of the engine: a plain safetensors reader and a straightforward numpy
computation of METHOD.md (Llama naming), used to check the engine's decisions and bytes.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

NP_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


def read_file(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes) of one .safetensors file."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    return {k: (v["dtype"], v["shape"], data[base + v["data_offsets"][0] : base + v["data_offsets"][1]]) for k, v in header.items()}


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

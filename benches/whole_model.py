#!/usr/bin/env python3
"""The whole-model way, as users run layer-wise swapping today: load the three state dicts fully into
memory with torch, compute the method (METHOD.md §2–§5) with whole-tensor torch operations in the
checkpoint dtype, and save the result. A benchmark baseline, not a reference: it is deliberately the
plain approach (three models resident at once, one core-bound torch op after another).

    python benches/whole_model.py BASE SAFETY EXPERT OUT [--granularity layer|module] [--tau 0.001] [--alpha 0.5]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.(weight|bias)$")
IN_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=Path)
    ap.add_argument("safety", type=Path)
    ap.add_argument("expert", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--granularity", choices=["layer", "module"], default="layer")
    ap.add_argument("--tau", type=float, default=0.001)
    ap.add_argument("--alpha", type=float, default=0.5)
    a = ap.parse_args()

    B, S, M = load(a.base), load(a.safety), load(a.expert)

    # §2-§3: relative change per measured tensor, summed per unit.
    scores: dict[str, dict[object, list[float]]] = {"S": {}, "M": {}}
    for name, b in B.items():
        m = LAYER.match(name)
        if not m:
            continue
        unit = int(m.group(1)) if a.granularity == "layer" else (int(m.group(1)), "attention" if m.group(2) == "self_attn" else "mlp")
        nb = float(torch.linalg.vector_norm(b))
        for role, X in (("S", S), ("M", M)):
            nd = float(torch.linalg.vector_norm(X[name] - b))
            r = nd / nb if nb > 1e-8 else nd
            scores[role].setdefault(unit, []).append(r)
    A = {}
    for role in ("S", "M"):
        if a.granularity == "layer":
            A[role] = {u: sum(v) for u, v in scores[role].items()}
        else:
            A[role] = {u: sum(x * x for x in v) ** 0.5 for u, v in scores[role].items()}
    # §4: normalise jointly, compare, decide.
    p = {role: {u: s / (sum(A[role].values()) + 1e-8) for u, s in A[role].items()} for role in A}
    decision = {}
    for u in A["S"]:
        d = p["S"][u] - p["M"][u]
        decision[u] = "safety" if d > a.tau else "expert" if d < -a.tau else "blend"
    del B

    # §5: build the output from M, tensor by tensor.
    out: dict[str, torch.Tensor] = {}
    for name, mt in M.items():
        m = IN_LAYER.match(name)
        if not m:
            how = "blend"
        elif a.granularity == "layer":
            how = decision[int(m.group(1))]
        else:
            part = "attention" if m.group(2).startswith("self_attn.") else "mlp" if m.group(2).startswith("mlp.") else None
            how = decision[(int(m.group(1)), part)] if part else "expert"
        if how == "safety":
            out[name] = S[name]
        elif how == "expert":
            out[name] = mt
        else:
            out[name] = (a.alpha * S[name] + (1 - a.alpha) * mt).to(mt.dtype)
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(out, str(a.out / "model.safetensors"), metadata={"format": "pt"})
    for f in a.expert.iterdir():
        if f.suffix == ".json" and not f.name.startswith("model.safetensors"):
            shutil.copy(f, a.out / f.name)
    counts = {k: sum(1 for v in decision.values() if v == k) for k in ("safety", "expert", "blend")}
    (a.out / "whole_model_report.json").write_text(json.dumps({"counts": counts}) + "\n")


if __name__ == "__main__":
    main()

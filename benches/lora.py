#!/usr/bin/env python3
"""LoRA benchmark: a LoRA safety expert and a LoRA language expert on the benchmark base, merged by
layerswap-fast (full model, and --emit adapter) against what users do today: materialise both adapters
with PEFT (``merge_and_unload`` + ``save_pretrained``), then run a full merge of the two models.

    python benches/lora.py                       # 1b base, rank 16, one round
    python benches/lora.py --size 1b --rank 16 --repeat 3
    python benches/lora.py --smoke               # tiny base, one round: checks that everything runs

The base comes from benches/generate.py (``bench-data/<size>/base``). The two adapters are written in
PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's tensor names, float32
factors, every attention and MLP projection targeted, random factors of a realistic size) by a child
process; the PEFT contender loads them with ``PeftModel.from_pretrained``, which checks the format.

Contenders, each a child process (wall time around it; CPU and peak RSS from ``os.wait4``, which covers
the children it waited for), on a warm page cache:
  lsf-full         layerswap-fast merge -b B -s S_lora -m M_lora -o OUT           (B + ΔW, streamed)
  lsf-adapter      the same with --emit adapter                                    (an exact PEFT adapter)
  lsf-analyze      layerswap-fast analyze on the adapters (statistics from the factors)
  peft-then-merge  for S and M: transformers load of B (bf16), PeftModel.from_pretrained,
                   merge_and_unload, save_pretrained; then layerswap-fast merge of the two full models
  analyze-full     layerswap-fast analyze on the two materialised models (statistics pass over full
                   models, for comparison with lsf-analyze)
Results: benches/results/lora-<time>.json and .md (the table is also printed). No timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import generate  # noqa: E402  (benches/generate.py)
from merge_e2e import lsf_exe, machine, model_files, run_child, set_cache  # noqa: E402

MIB = 1 << 20
PROJ = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}

MAKE_ADAPTER = r"""
import json, sys
from pathlib import Path
import numpy as np
from safetensors.numpy import save_file
base, out, rank, seed, layer_scale = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
cfg = json.loads((base / "config.json").read_text())
h, inter, heads, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
hd = cfg.get("head_dim") or h // heads
shapes = {"q_proj": (heads * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h), "o_proj": (h, heads * hd),
          "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
rng = np.random.default_rng(seed)
tensors = {}
for i in range(cfg["num_hidden_layers"]):
    for part, projs in (("self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("mlp", ["gate_proj", "up_proj", "down_proj"])):
        for p in projs:
            rows, cols = shapes[p]
            name = f"base_model.model.model.layers.{i}.{part}.{p}"
            tensors[f"{name}.lora_A.weight"] = (rng.standard_normal((rank, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float32)
            tensors[f"{name}.lora_B.weight"] = (rng.standard_normal((rows, rank), dtype=np.float32) * 0.002 * layer_scale[i % len(layer_scale)]).astype(np.float32)
out.mkdir(parents=True, exist_ok=True)
save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
(out / "adapter_config.json").write_text(json.dumps({
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": rank, "lora_alpha": 2 * rank,
    "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    "modules_to_save": None, "inference_mode": True, "init_lora_weights": True}, indent=2))
"""

PEFT_THEN_MERGE = r"""
import gc, subprocess, sys, time, json
from pathlib import Path
import torch, transformers, peft
base, s, m, work, lsf = sys.argv[1:6]
t = {}
for role, adapter in (("safety", s), ("expert", m)):
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(Path(work) / f"{role}-full")
    del model, merged
    gc.collect()
    t[role] = time.perf_counter() - t0
t0 = time.perf_counter()
subprocess.run([lsf, "merge", "-q", "-b", base, "-s", str(Path(work) / "safety-full"), "-m", str(Path(work) / "expert-full"),
                "-o", str(Path(work) / "out")], check=True)
t["merge"] = time.perf_counter() - t0
print(json.dumps(t))
"""


def make_adapters(base: Path, root: Path, rank: int) -> dict[str, Path]:
    """The two adapters (kept between runs, like the trios)."""
    out = {}
    n = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    for role, seed, scale in (("safety", 1, [3.0] * (n // 2) + [0.3] * (n - n // 2)), ("expert", 2, [0.3] * (n // 2) + [3.0] * (n - n // 2))):
        d = root / f"{role}-lora-r{rank}"
        if not (d / "adapter_model.safetensors").exists():
            subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(base), str(d), str(rank), str(seed), json.dumps(scale)], check=True)
        out[role] = d
    return out


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    paths = generate.ensure(args.size, root=args.root)
    base = paths["base"]
    adapters = make_adapters(base, base.parent.parent / f"{base.parent.name}-lora", args.rank)
    lsf = lsf_exe()
    inputs = model_files(base) + [a / "adapter_model.safetensors" for a in adapters.values()]
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.repeat):
        rw = work / f"round{r}"
        rw.mkdir()
        cmds = {
            "lsf-full": [lsf, "merge", "-q", "-b", str(base), "-s", str(adapters["safety"]), "-m", str(adapters["expert"]), "-o", str(rw / "full")],
            "lsf-adapter": [lsf, "merge", "-q", "-b", str(base), "-s", str(adapters["safety"]), "-m", str(adapters["expert"]), "-o", str(rw / "adapter"),
                            "--emit", "adapter"],
            "lsf-analyze": [lsf, "analyze", "--json", "-b", str(base), "-s", str(adapters["safety"]), "-m", str(adapters["expert"])],
            "peft-then-merge": [sys.executable, "-c", PEFT_THEN_MERGE, str(base), str(adapters["safety"]), str(adapters["expert"]), str(rw / "peft"), lsf],
            "analyze-full": [lsf, "analyze", "--json", "-b", str(base), "-s", str(rw / "peft" / "safety-full"), "-m", str(rw / "peft" / "expert-full")],
        }
        for name, cmd in cmds.items():
            if args.only and name not in args.only:
                continue
            if name == "analyze-full" and not (rw / "peft" / "expert-full").exists():
                continue
            set_cache(inputs, "warm")
            res = run_child(cmd)
            if name == "peft-then-merge":
                res["steps_s"] = json.loads(res["stdout"].strip().splitlines()[-1])
            res.pop("stdout")
            runs.setdefault(name, []).append(res)
            print(f"  round {r}: {name}: {res['wall_s']:.2f} s, peak RSS {res['peak_rss_bytes'] / MIB:.0f} MiB", file=sys.stderr, flush=True)
            for out in ("full", "adapter"):
                if name == f"lsf-{out}":
                    shutil.rmtree(rw / out, ignore_errors=True)
        shutil.rmtree(rw, ignore_errors=True)
    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "cpu_s", "peak_rss_bytes")} for name, rs in runs.items()}
    return {"size": args.size, "rank": args.rank, "repeat": args.repeat, "base_bytes": sum(f.stat().st_size for f in model_files(base)),
            "adapter_bytes": {k: (v / "adapter_model.safetensors").stat().st_size for k, v in adapters.items()}, "runs": runs, "median": med}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"LoRA S + LoRA M (rank {res['rank']}) on the {res['size']} base ({res['base_bytes'] / 2**30:.2f} GiB), "
             f"median of {res['repeat']}, warm cache", "", "| contender | wall | CPU | peak RSS |", "|---|---:|---:|---:|"]
    for name, m in res["median"].items():
        lines.append(f"| {name} | {m['wall_s']:.2f} s | {m['cpu_s']:.2f} s | {m['peak_rss_bytes'] / MIB:,.0f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1b")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--root", type=Path, default=generate.ROOT)
    ap.add_argument("--smoke", action="store_true", help="tiny base in a temporary folder, one round")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lsf-lora-bench-", dir=None if args.smoke else args.root.parent) as tmp:
        if args.smoke:
            args.size, args.rank, args.repeat, args.root = "tiny", 4, 1, Path(tmp) / "data"
        work = Path(tmp) / "work"
        work.mkdir()
        res = bench(args, work)
    res["machine"] = machine()
    md = markdown(res)
    print(md)
    if not args.smoke:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (out / f"lora-{stamp}.json").write_text(json.dumps(res, indent=2))
        (out / f"lora-{stamp}.md").write_text(md + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

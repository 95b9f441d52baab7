#!/usr/bin/env python3
"""LoRA benchmark: a LoRA safety expert and a LoRA language expert on the benchmark base, merged by
layerswap-fast (full model, and --emit adapter) against what users do today: materialise both adapters
with PEFT (``merge_and_unload`` + ``save_pretrained``), then run a full merge of the two models.

    python benches/lora.py                       # 1b base, rank 16, one round
    python benches/lora.py --size 1b --rank 16 --repeat 3
    python benches/lora.py --smoke               # tiny base, one round: checks that everything runs
    python benches/lora.py --size 8b             # memory: an 8B Llama-shaped base, --max-memory 1GiB and 256MiB

``--size 8b`` is the memory benchmark: a Llama-3-8B-shaped BF16 base (32 layers, hidden 4096, MLP 14336,
GQA 8 KV heads, vocabulary 128256: 8.03 B parameters, 16.1 GB) written as **sparse files with real
headers** (four Hugging Face shards and their index, every tensor's data a hole that reads as zeros:
no disk space, and reads cost no I/O, so the runs are compute- and write-bound), two rank-16 adapters
on every projection (real random float32 factors, 168 MiB each), then: ``merge`` full output with
``--max-memory 1GiB`` and with ``--max-memory 256MiB`` (16.1 GB written each, deleted right after),
``merge --emit adapter`` and ``analyze``. Wall, CPU and peak RSS per run; the peak RSS is compared with
the budget. It holds ``flock`` on the disk lock (``--disk-lock``, default /work/.disk.lock when it
exists) for the whole run, checks free space first, and deletes every file it made, also on failure.

The base comes from benches/generate.py (``bench-data/<size>/base``). The two adapters are written in
PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's tensor names, float32
factors, every attention and MLP projection targeted, random factors of a realistic size) by a child
process; the PEFT contender loads them with ``PeftModel.from_pretrained``, which checks the format.

Contenders, each a child process (wall time around it; CPU and peak RSS from ``os.wait4``, which covers
the children it waited for), on a warm page cache:
  lsf-full         layerswap-fast merge -b B -s S_lora -m M_lora -o OUT           (B + ΔW, streamed)
  lsf-full-256MiB  the same with --max-memory 256MiB
  lsf-adapter      the same with --emit adapter                                    (an exact PEFT adapter)
  lsf-analyze      layerswap-fast analyze on the adapters (statistics from the factors)
  peft-then-merge  for S and M: transformers load of B (bf16), PeftModel.from_pretrained,
                   merge_and_unload, save_pretrained; then layerswap-fast merge of the two full models
  analyze-full     layerswap-fast analyze on the two materialised models (analyze pass over full
                   models, for comparison with lsf-analyze)
Results: benches/results/lora-<time>.json and .md (the table is also printed). No timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
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
    # Generated by a child process: a child's peak RSS (from wait4) starts from this process's RSS at
    # fork, so this process must stay small; generating here (numpy) made every contender's figure ours.
    subprocess.run([sys.executable, str(HERE / "generate.py"), args.size, "--root", str(args.root)], check=True)
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
            "lsf-full-256MiB": [lsf, "merge", "-q", "-b", str(base), "-s", str(adapters["safety"]), "-m", str(adapters["expert"]),
                                "-o", str(rw / "full256"), "--max-memory", "256MiB"],
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
            for out in ("full", "full256", "adapter"):
                shutil.rmtree(rw / out, ignore_errors=True)
        shutil.rmtree(rw, ignore_errors=True)
    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "cpu_s", "peak_rss_bytes")} for name, rs in runs.items()}
    return {"size": args.size, "rank": args.rank, "repeat": args.repeat, "base_bytes": sum(f.stat().st_size for f in model_files(base)),
            "adapter_bytes": {k: (v / "adapter_model.safetensors").stat().st_size for k, v in adapters.items()}, "runs": runs, "median": med}


# --- the 8B-shaped memory benchmark (sparse base) --------------------------------------------------

#: Llama-3-8B's shapes (config.json of meta-llama/Meta-Llama-3-8B).
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001}
SHARD_BYTES = 5_000_000_000


def llama_tensors(cfg: dict[str, Any]) -> list[tuple[str, list[int]]]:
    """Tensor names and shapes of a LlamaForCausalLM, in Hugging Face's order."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", [v, h])]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]),
                (p + "self_attn.q_proj.weight", [q, h]), (p + "self_attn.k_proj.weight", [kv, h]), (p + "self_attn.v_proj.weight", [kv, h]),
                (p + "self_attn.o_proj.weight", [h, q]), (p + "mlp.gate_proj.weight", [inter, h]), (p + "mlp.up_proj.weight", [inter, h]),
                (p + "mlp.down_proj.weight", [h, inter])]
    return out + [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]


def write_sparse_model(folder: Path, cfg: dict[str, Any]) -> int:
    """A BF16 model as Hugging Face shards whose headers are real and whose data are holes
    (``truncate``): it occupies no disk space and reads as zeros. Returns the bytes of tensor data."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in llama_tensors(cfg):
        n = 2 * int(math.prod(shape))
        if size and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for name, shape in tensors:
            n = 2 * int(math.prod(shape))
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [pos, pos + n]}
            pos += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + pos)
        total += pos
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def bench_8b(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The memory benchmark of ``--size 8b`` in ``work`` (which the caller deletes)."""
    base = work / "base-8b"
    data_bytes = write_sparse_model(base, LLAMA_8B)
    adapters = make_adapters(base, work / "adapters", args.rank)
    lsf = lsf_exe()
    need = data_bytes + (2 << 30)
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / 2**30:.1f} GiB free, the full output needs {need / 2**30:.1f} GiB")
    common = ["-b", str(base), "-s", str(adapters["safety"]), "-m", str(adapters["expert"])]
    cmds = {
        "lsf-full-1GiB": [lsf, "merge", "-q", *common, "-o", str(work / "out"), "--max-memory", "1GiB"],
        "lsf-full-256MiB": [lsf, "merge", "-q", *common, "-o", str(work / "out"), "--max-memory", "256MiB"],
        "lsf-adapter-1GiB": [lsf, "merge", "-q", *common, "-o", str(work / "out"), "--emit", "adapter", "--max-memory", "1GiB"],
        "lsf-analyze-1GiB": [lsf, "analyze", "--json", *common, "--max-memory", "1GiB"],
    }
    budgets = {"lsf-full-1GiB": 1 << 30, "lsf-full-256MiB": 256 << 20, "lsf-adapter-1GiB": 1 << 30, "lsf-analyze-1GiB": 1 << 30}
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, cmd in cmds.items():
        if args.only and name not in args.only:
            continue
        res = run_child(cmd)
        res.pop("stdout")
        report = work / "out" / "layerswap_report.json"
        if report.is_file():
            res["report_peak_rss_bytes"] = json.loads(report.read_text()).get("peak_rss_bytes")
            res["bytes_written"] = sum(f.stat().st_size for f in (work / "out").glob("*.safetensors"))
        res["budget_bytes"] = budgets[name]
        res["within_budget"] = res["peak_rss_bytes"] <= budgets[name]
        shutil.rmtree(work / "out", ignore_errors=True)
        runs[name] = [res]
        print(f"  {name}: {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU, peak RSS {res['peak_rss_bytes'] / MIB:.0f} MiB "
              f"(budget {budgets[name] / MIB:.0f} MiB)", file=sys.stderr, flush=True)
    med = {name: {k: rs[0][k] for k in ("wall_s", "cpu_s", "peak_rss_bytes")} for name, rs in runs.items()}
    return {"size": "8b", "rank": args.rank, "repeat": 1, "base_bytes": data_bytes, "base": "sparse (real headers, data as holes)",
            "adapter_bytes": {k: (v / "adapter_model.safetensors").stat().st_size for k, v in adapters.items()}, "runs": runs, "median": med}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"LoRA S + LoRA M (rank {res['rank']}) on the {res['size']} base ({res['base_bytes'] / 2**30:.2f} GiB"
             f"{', ' + res['base'] if 'base' in res else ''}), median of {res['repeat']}, warm cache", "",
             "| contender | wall | CPU | peak RSS |", "|---|---:|---:|---:|"]
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
    ap.add_argument("--disk-lock", type=Path, default=Path("/work/.disk.lock") if Path("/work/.disk.lock").exists() else None,
                    help="file to hold flock on for the whole --size 8b run (shared disk)")
    args = ap.parse_args(argv)
    if args.size == "8b":
        import fcntl

        lock = open(args.disk_lock, "a") if args.disk_lock else None  # noqa: SIM115 (held until exit)
        if lock is not None:
            print(f"waiting for {args.disk_lock} ...", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        # (TemporaryDirectory removes every file, also on failure or Ctrl-C.)
        args.root.mkdir(parents=True, exist_ok=True)  # (bench-data/ is git-ignored: a work folder there stays out of git's way)
        with tempfile.TemporaryDirectory(prefix="lsf-lora-8b-", dir=args.root) as tmp:
            print(f"free: {shutil.disk_usage(tmp).free / 2**30:.1f} GiB", file=sys.stderr, flush=True)
            res = bench_8b(args, Path(tmp))
        res["machine"] = machine()
        md = markdown(res)
        print(md)
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (out / f"lora-8b-{stamp}.json").write_text(json.dumps(res, indent=2))
        (out / f"lora-8b-{stamp}.md").write_text(md + "\n")
        return
    if not args.smoke:
        args.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lsf-lora-bench-", dir=None if args.smoke else args.root) as tmp:
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

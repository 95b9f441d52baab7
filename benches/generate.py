#!/usr/bin/env python3
"""Generates the benchmark trios (base, safety expert, language expert) with ``layerswap_fast.synth``.

    python benches/generate.py 1b                 # -> bench-data/1b/{base,safety,expert}
    python benches/generate.py tiny 0.5b --dtype bf16 --root /tmp/lsf-bench

    python benches/generate.py 70b --sparse       # -> bench-data/70b-sparse/: real headers, no data

Sizes are the names in ``synth.SIZES`` (tiny, small, 0.5b, 1b, 3b, 7b, 70b). An existing complete trio
is kept (pass --force to rewrite it). Sizes on disk, BF16: 1b ~ 2.5 GB per model, 3b ~ 6.4 GB, 7b
13.5 GB. ``--sparse`` writes each model as Hugging Face 5 GB shards with real headers, tensor names
and index, and sets the files' length with ``ftruncate``: the data reads as zeros and takes ~0 bytes
on disk (70b: 141 GB apparent per model).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "bench-data"
DONE = ".complete"
ROLES = ("base", "safety", "expert")


def trio_dir(root: Path, size: str, dtype: str) -> Path:
    return root / (size if dtype == "bf16" else f"{size}-{dtype}")


def ensure(size: str, *, root: Path = ROOT, dtype: str = "bf16", force: bool = False) -> dict[str, Path]:
    """The trio for ``size``, generated if missing. Returns ``{"base", "safety", "expert"}`` paths."""
    d = trio_dir(root, size, dtype)
    paths = {r: d / r for r in ROLES}
    if (d / DONE).exists() and not force:
        return paths
    from layerswap_fast import synth  # imported only when generating (numpy), to keep callers lean

    if size not in synth.SIZES:
        raise SystemExit(f"unknown size {size!r}; choose from {', '.join(synth.SIZES)}")
    if d.exists():
        shutil.rmtree(d)
    config = synth.LlamaConfig(**synth.SIZES[size])
    t0 = time.perf_counter()
    print(f"generating {size} ({config.param_count() / 1e9:.2f} B parameters, {dtype}) in {d} ...", file=sys.stderr, flush=True)
    paths = synth.make_trio(d, config, dtype=dtype)
    (d / DONE).write_text("")
    print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return paths


def ensure_sparse(size: str, *, root: Path = ROOT, force: bool = False, shard_bytes: int = 5_000_000_000) -> dict[str, Path]:
    """A trio of sparse models of ``size`` (headers written, data left as holes). Returns the paths."""
    import json

    from layerswap_fast import synth

    d = root / f"{size}-sparse"
    paths = {r: d / r for r in ROLES}
    if (d / DONE).exists() and not force:
        return paths
    if d.exists():
        shutil.rmtree(d)
    config = synth.LlamaConfig(**synth.SIZES[size])
    specs = config.tensors()
    shards = synth.split_shards(specs, "bf16", shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for role in ROLES:
        paths[role].mkdir(parents=True)
        for fname, shard in zip(names, shards):
            header = synth.header_bytes(shard, "bf16")
            data = sum(2 * int(__import__("math").prod(s)) for _, s in shard)
            with open(paths[role] / fname, "wb") as fh:
                fh.write(header)
                fh.truncate(len(header) + data)
        weight_map = {name: names[i] for i, shard in enumerate(shards) for name, _ in shard}
        (paths[role] / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 2 * config.param_count()}, "weight_map": weight_map}))
        (paths[role] / "config.json").write_text(json.dumps(config.config_json("bf16"), indent=2))
    (d / DONE).write_text("")
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from layerswap_fast import synth

    ap.add_argument("sizes", nargs="+", choices=list(synth.SIZES))
    ap.add_argument("--root", type=Path, default=ROOT, help="where trios go (default: bench-data/ in the repo)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--force", action="store_true", help="regenerate even if present")
    ap.add_argument("--sparse", action="store_true", help="headers only, data as holes (bf16)")
    args = ap.parse_args(argv)
    for size in args.sizes:
        if args.sparse:
            p = ensure_sparse(size, root=args.root, force=args.force)
        elif size == "70b":
            raise SystemExit("70b is 423 GB per trio: generate it with --sparse")
        else:
            p = ensure(size, root=args.root, dtype=args.dtype, force=args.force)
        print(p["base"].parent)


if __name__ == "__main__":
    main()

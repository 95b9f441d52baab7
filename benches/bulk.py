#!/usr/bin/env python3
"""Bulk benchmark: one `merge` of N language experts against N single merges (issue target: bulk of 4
at 1b, warm cache, wall <= 0.6 x the sum of the single runs; peak RSS within the budget).

The extra experts share the trio's base and safety expert (same seed and safety planting) and differ in
where their task vectors are strong. Runs alternate (bulk first in odd rounds), repeat, and the table
shows medians; wall time, CPU time and peak RSS come from each child's rusage (see merge_e2e.py).

    python benches/bulk.py --size 1b --experts 4 --repeat 3
    python benches/bulk.py --size 1b --experts 4 --repeat 3 --only bulk floor   # bulk against its I/O floor
    python benches/bulk.py --size tiny --experts 4 --repeat 1      # smoke

The floor (issue 15) is what any bulk merge must do with plain tools, in the same run and cache state:
``cat`` of B, S and M1..Mk once, then ``dd ... conv=fsync`` of each expert's shards into its own
output folder (k outputs written and synced).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import generate  # noqa: E402
from merge_e2e import lsf_exe, machine, model_files, run_child, set_cache  # noqa: E402


def experts_for(size: str, n: int, data: Path) -> dict[str, Path]:
    """The trio's expert plus n-1 more language experts of the same base and safety expert. Runs in a
    child process (see main): a child's peak RSS starts at its parent's, so the launcher must not
    import numpy or the engine itself."""
    from layerswap_fast import synth

    trio = generate.ensure(size, root=data)
    cfg = synth.LlamaConfig(**synth.SIZES[size])
    half = cfg.n_layers // 2
    out = {"x0": trio["expert"]}
    for k in range(1, n):
        d = generate.trio_dir(data, size, "bf16") / f"extra-{k}"
        if not (d / ".complete").exists():
            shutil.rmtree(d, ignore_errors=True)
            # Each extra expert is strong in a different band of the lower layers.
            band = [i for i in range(cfg.n_layers) if (i + k) % 3 == 0 or i < half - k]
            synth.make_trio(d, cfg, planting=synth.Planting(safety_layers=range(half, cfg.n_layers), expert_layers=band), roles=("expert",))
            (d / ".complete").write_text("")
        out[f"x{k}"] = d / "expert"
    return {"base": trio["base"], "safety": trio["safety"], **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1b")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--granularity", default="module", choices=["layer", "module"])
    ap.add_argument("--data", type=Path, default=generate.ROOT)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--only", nargs="+", choices=["bulk", "singles", "floor"], default=["bulk", "singles"])
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare_only:
        print(json.dumps({k: str(v) for k, v in experts_for(args.size, args.experts, args.data).items()}))
        return
    prep = subprocess.run([sys.executable, __file__, "--prepare-only", "--size", args.size, "--experts", str(args.experts), "--data", str(args.data)],
                          check=True, capture_output=True, text=True)
    paths = {k: Path(v) for k, v in json.loads(prep.stdout).items()}
    names = [k for k in paths if k.startswith("x")]
    work = args.data / "bulk-work"
    exe = lsf_exe()
    inputs = [f for k in paths for f in model_files(paths[k])]
    rows: dict[str, list[dict]] = {k: [] for k in args.only}
    for rnd in range(args.repeat):
        order = args.only[rnd % len(args.only):] + args.only[:rnd % len(args.only)]
        for what in order:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            if what == "bulk":
                set_cache(inputs, "warm")
                cmd = [exe, "merge", "-q", "-g", args.granularity, "-b", str(paths["base"]), "-s", str(paths["safety"]), "-o", str(work / "bulk")]
                for n in names:
                    cmd += ["-m", f"{n}={paths[n]}"]
                rows["bulk"].append(run_child(cmd))
            elif what == "floor":
                set_cache(inputs, "warm")
                steps = [f"cat {' '.join(str(f) for f in inputs)} > /dev/null"]
                for n in names:
                    (work / n).mkdir()
                    steps += [f"dd if={f} of={work / n / f.name} bs=16M conv=fsync status=none" for f in model_files(paths[n])]
                rows["floor"].append(run_child(["sh", "-c", " && ".join(steps)]))
            else:
                total = {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_bytes": 0}
                for n in names:
                    set_cache(inputs, "warm")
                    r = run_child([exe, "merge", "-q", "-g", args.granularity, "-b", str(paths["base"]), "-s", str(paths["safety"]),
                                   "-m", str(paths[n]), "-o", str(work / n)])
                    total["wall_s"] += r["wall_s"]
                    total["cpu_s"] += r["cpu_s"]
                    total["peak_rss_bytes"] = max(total["peak_rss_bytes"], r["peak_rss_bytes"])
                    # Outputs stay until the round ends, as the bulk run's do (a user keeps all four).
                rows["singles"].append(total)
            print(f"round {rnd + 1} {what}: {rows[what][-1]['wall_s']:.2f} s", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "cpu_s", "peak_rss_bytes")} for k, v in rows.items()}
    label = {"bulk": f"bulk: one merge of {len(names)} experts", "singles": f"sum of {len(names)} single merges",
             "floor": f"I/O floor: cat of B, S, M1..M{len(names)} + dd conv=fsync of {len(names)} outputs"}
    md = [
        f"Bulk of {len(names)} experts, size {args.size}, {args.granularity} granularity, warm cache, median of {args.repeat}",
        "",
        "| run | wall (s) | CPU (s) | peak RSS (MiB) |",
        "|---|---:|---:|---:|",
        *[f"| {label[k]} | {v['wall_s']:.2f} | {v['cpu_s']:.2f} | {v['peak_rss_bytes'] / 2**20:.0f} |" for k, v in med.items()],
        "",
    ]
    ratio = {}
    if "singles" in med and "bulk" in med:
        ratio["bulk_over_singles"] = med["bulk"]["wall_s"] / med["singles"]["wall_s"]
        md.append(f"bulk / sum of singles (wall): **{ratio['bulk_over_singles']:.2f}** (target <= 0.6)")
    if "floor" in med and "bulk" in med:
        ratio["bulk_over_floor"] = med["bulk"]["wall_s"] / med["floor"]["wall_s"]
        md.append(f"bulk / I/O floor (wall): **{ratio['bulk_over_floor']:.2f}** (target <= 1.2)")
    text = "\n".join(md)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.results / f"bulk-{args.size}-{stamp}.json").write_text(json.dumps({"machine": machine(), "rounds": rows, "median": med, "ratio": ratio}, indent=2))
    (args.results / f"bulk-{args.size}-{stamp}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""merge_state_dicts next to the file merge: wall time and peak RSS, each in a fresh child process.

    python benches/state_dicts.py --size 1b --repeat 1      # generates bench-data/1b on first use

Contenders (warm page cache; the inputs are read once before timing):
- ``file``: ``layerswap-fast merge -b -s -m -o`` (reads the files, writes a folder, fsynced);
- ``state_dicts``: a child that loads the three state dicts with ``safetensors.torch.load_file`` (not
  timed), then times ``layerswap_fast.merge_state_dicts`` alone. Its peak RSS during the merge is
  measured from a reset high-water mark (``/proc/self/clear_refs``), so it is the loaded inputs plus
  whatever the merge adds: the output tensors, and nothing else if the inputs are read in place.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import generate  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import safetensors.torch as st
import layerswap_fast as lsf

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
paths = json.loads(sys.argv[1])
t0 = time.perf_counter()
sds = []
for role in ("base", "safety", "expert"):
    sd = {}
    for f in sorted(Path(paths[role]).glob("*.safetensors")):
        sd.update(st.load_file(str(f)))
    sds.append(sd)
loaded = time.perf_counter() - t0
after_load = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
t1 = time.perf_counter()
merged = lsf.merge_state_dicts(*sds, granularity=sys.argv[2])
seconds = time.perf_counter() - t1
out_bytes = sum(t.numel() * t.element_size() for t in merged.values())
print(json.dumps({"load_seconds": loaded, "seconds": seconds, "rss_after_load": after_load, "peak_rss_during_merge": rss("VmHWM:"),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "output_bytes": out_bytes}))
"""


def warm(paths: dict[str, Path]) -> None:
    for role in paths.values():
        for f in sorted(Path(role).glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def file_merge(paths: dict[str, Path], out: Path, granularity: str) -> dict[str, float]:
    exe = shutil.which("layerswap-fast") or sys.executable
    cmd = [exe] if exe != sys.executable else [sys.executable, "-m", "layerswap_fast"]
    cmd += ["merge", "-b", str(paths["base"]), "-s", str(paths["safety"]), "-m", str(paths["expert"]), "-o", str(out), "--force", "-q",
            "-g", granularity]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest of any child so far: file merges run first, so it is theirs.
    return {"seconds": seconds, "peak_rss": max(peak, before) * 1024}


def state_dict_merge(paths: dict[str, Path], granularity: str) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps({k: str(v) for k, v in paths.items()}), granularity], check=True,
                       capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1b")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--granularity", default="layer", choices=["layer", "module"])
    ap.add_argument("--data", type=Path, default=generate.ROOT)
    args = ap.parse_args(argv)
    paths = generate.ensure(args.size, root=args.data)
    warm(paths)
    work = Path(tempfile.mkdtemp(prefix="lsf-sd-bench-", dir=args.data))
    try:
        files = [file_merge(paths, work / "out", args.granularity) for _ in range(args.repeat)]
        mems = [state_dict_merge(paths, args.granularity) for _ in range(args.repeat)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gib = 1 << 30
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    print(f"{args.size} trio, {args.granularity} granularity, {args.repeat} round(s), medians; warm page cache")
    print(f"| contender | wall | peak RSS |\n|---|---:|---:|")
    print(f"| file merge (`layerswap-fast merge`) | {med(files, 'seconds'):.2f} s | {med(files, 'peak_rss') / (1 << 20):.0f} MiB |")
    print(f"| `merge_state_dicts` (merge only) | {med(mems, 'seconds'):.2f} s | {med(mems, 'peak_rss_during_merge') / gib:.2f} GiB "
          f"(inputs loaded: {med(mems, 'rss_after_load') / gib:.2f} GiB; output {med(mems, 'output_bytes') / gib:.2f} GiB) |")
    print(f"| loading the three state dicts (`safetensors.torch.load_file`, not part of the merge) | {med(mems, 'load_seconds'):.2f} s | |")
    print(json.dumps({"file": files, "state_dicts": mems}))


if __name__ == "__main__":
    main()

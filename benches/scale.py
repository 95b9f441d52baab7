#!/usr/bin/env python3
"""Scale benchmarks (issue 15): a 70B-shaped analyze on sparse files, a 7B merge with cold caches
against its I/O floor, and a merge on a copy-on-write file system (XFS, reflink) against ext4.

    python benches/scale.py sparse70b            # analyze a sparse Llama-3-70B trio (~423 GB apparent, ~0 on disk) and the 1b trio
    python benches/scale.py cold7b               # Llama-2-7B shape, 3 x 13.5 GB: cold merge vs cat + dd conv=fsync; deletes the trio after
    python benches/scale.py xfs --repeat 3       # 1b module merge on a loop-mounted XFS (reflink=1) vs the same on ext4 (needs root)

Every contender runs as a child process (wall around it, CPU and peak RSS from its rusage, bytes
read from disk from its block-input count), as in merge_e2e.py. Results go to benches/results/.
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
import generate  # noqa: E402
from merge_e2e import MEASURED, lsf_exe, machine, model_files, nbytes, run_child, set_cache  # noqa: E402

GB = 1e9
MIB = 1 << 20


def gen(size: str, data: Path, sparse: bool = False) -> dict[str, Path]:
    """Generates a trio in a child (the launcher stays small: its peak RSS is every child's floor)."""
    cmd = [sys.executable, str(HERE / "generate.py"), size, "--root", str(data)] + (["--sparse"] if sparse else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    d = data / (f"{size}-sparse" if sparse else size)
    return {r: d / r for r in generate.ROLES}


def measured_bytes(folder: Path) -> int:
    """Bytes of the measured tensors of one model, from its headers."""
    total = 0
    for f in model_files(folder):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if MEASURED.match(k))
    return total


def drop_caches(files: list[Path]) -> str:
    """Empties the page cache: the whole machine's if permitted, else these files' pages."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        set_cache(files, "cold")  # merge_e2e's: these files' pages only
        return "fadvise"


def write_results(name: str, text: str, data: dict[str, Any], results: Path) -> None:
    print(text)
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results / f"{name}-{stamp}.json").write_text(json.dumps({"machine": machine(), **data}, indent=2))
    (results / f"{name}-{stamp}.md").write_text(text + "\n")


# --- 70B shape on sparse files --------------------------------------------------------------------------


def sparse70b(args: argparse.Namespace) -> None:
    exe = lsf_exe()
    rows = {}
    for size, sparse in (("1b", False), ("70b", True)):
        p = gen(size, args.data, sparse)
        files = [f for r in generate.ROLES for f in model_files(p[r])]
        apparent = nbytes(files)
        on_disk = sum(f.stat().st_blocks * 512 for f in files)
        read = sum(measured_bytes(p[r]) for r in generate.ROLES)
        if not sparse:
            subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)  # warm, as a sparse file's holes are
        r = run_child([exe, "analyze", "-b", str(p["base"]), "-s", str(p["safety"]), "-m", str(p["expert"]), "--json"])
        rows[size] = {"apparent_bytes": apparent, "on_disk_bytes": on_disk, "measured_read_bytes": read,
                      **{k: v for k, v in r.items() if k != "stdout"}}
        print(f"{size}: {r['wall_s']:.1f} s, {r['peak_rss_bytes'] / MIB:.0f} MiB", file=sys.stderr, flush=True)
    a, b = rows["1b"], rows["70b"]
    text = "\n".join([
        "`layerswap-fast analyze` (default budget 1 GiB, all cores), Llama-3-70B shape as sparse files against the 1b trio (warm)",
        "",
        "| trio | apparent size | on disk | measured bytes read | wall (s) | read rate (GB/s) | CPU (s) | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {k} | {v['apparent_bytes'] / GB:.1f} GB | {v['on_disk_bytes'] / MIB:.1f} MiB | {v['measured_read_bytes'] / GB:.1f} GB | {v['wall_s']:.1f} | "
          f"{v['measured_read_bytes'] / v['wall_s'] / GB:.2f} | {v['cpu_s']:.1f} | {v['peak_rss_bytes'] / MIB:.0f} |" for k, v in rows.items()],
        "",
        f"Peak RSS 70b / 1b: **{b['peak_rss_bytes'] / a['peak_rss_bytes']:.3f}** (target: within the default budget and 1.0 +- 0.1)",
    ])
    write_results("sparse70b", text, {"rows": rows}, args.results)


# --- 7B cold -------------------------------------------------------------------------------------------------

MERGE_CHILD = r"""
import json, sys, time
import layerswap_fast as lsf
b, s, m, out = sys.argv[1:5]
granularity = sys.argv[5] if len(sys.argv) > 5 else "layer"
extra = {"outside": sys.argv[6]} if len(sys.argv) > 6 else {}
def io():
    return {k: int(v) for k, v in (line.split(": ") for line in open("/proc/self/io").read().splitlines())}
t0 = time.perf_counter()
phases, phase_io = {}, {}
def progress(phase, done, total):
    if phase not in phases:
        phases[phase] = time.perf_counter() - t0
        phase_io[phase] = io()  # disk bytes read and written up to the start of each phase
report = lsf.merge(b, s, m, out, granularity=granularity, progress=progress, **extra)
print(json.dumps({"phases": phases, "phase_io": phase_io, "seconds": time.perf_counter() - t0, "io": io(),
                  "bytes_read": report["bytes_read"], "bytes_written": report["output"]["bytes_written"]}))
"""


def cold7b(args: argparse.Namespace) -> None:
    size = args.size or "7b"
    need = 4 * 13.5e9 + 5e9 if size == "7b" else 0
    free = shutil.disk_usage(args.data.parent if not args.data.exists() else args.data).free
    if free < need and not (args.data / size / ".complete").exists():
        raise SystemExit(f"{size} needs {need / GB:.0f} GB free (three inputs, one output, margin); {free / GB:.0f} GB free")
    p = gen(size, args.data)
    files = [f for r in generate.ROLES for f in model_files(p[r])]
    out = args.data / "cold7b-out"
    in_bytes, out_bytes = nbytes(files), nbytes(model_files(p["expert"]))  # before the trio is deleted
    rows: dict[str, Any] = {}
    try:
        shutil.rmtree(out, ignore_errors=True)
        how = drop_caches(files)
        r = run_child([sys.executable, "-c", MERGE_CHILD, str(p["base"]), str(p["safety"]), str(p["expert"]), str(out)])
        rows["merge"] = {**{k: v for k, v in r.items() if k != "stdout"}, **json.loads(r["stdout"])}
        print(json.dumps({"merge": rows["merge"]}), file=sys.stderr, flush=True)  # kept even if a floor run fails
        shutil.rmtree(out, ignore_errors=True)
        drop_caches(files)
        rows["read-floor"] = {k: v for k, v in run_child(["sh", "-c", "cat \"$@\" > /dev/null", "cat", *map(str, files)]).items() if k != "stdout"}
        out.mkdir()
        dd = [f"dd if={f} of={out / f.name} bs=16M conv=fsync status=none" for f in model_files(p["expert"])]
        drop_caches(files)
        # The source is read into the page cache first (untimed): the write floor is the write alone,
        # not a second cold read of 13.5 GB (the read floor has that already).
        subprocess.run(["cat", *map(str, model_files(p["expert"]))], stdout=subprocess.DEVNULL, check=True)
        rows["write-floor"] = {k: v for k, v in run_child(["sh", "-c", " && ".join(dd)]).items() if k != "stdout"}
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(args.data / size, ignore_errors=True)
    m = rows["merge"]
    floor = rows["read-floor"]["wall_s"] + rows["write-floor"]["wall_s"]
    ph = m["phases"]
    analyze_s = ph.get("write", m["seconds"]) - ph.get("analyze", 0.0)
    write_s = ph.get("sync", m["seconds"]) - ph.get("write", 0.0)
    sync_s = m["seconds"] - ph.get("sync", m["seconds"])
    text = "\n".join([
        f"{size} (Llama-2-7B shape for 7b), BF16, inputs {in_bytes / GB:.1f} GB, output {out_bytes / GB:.1f} GB; caches emptied before each run ({how})",
        "",
        "| run | wall (s) | CPU (s) | peak RSS (MiB) | read from disk (GB) | written (GB) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| layerswap-fast merge (defaults, --max-memory 1GiB) | {m['wall_s']:.1f} | {m['cpu_s']:.1f} | {m['peak_rss_bytes'] / MIB:.0f} | "
        f"{m['io']['read_bytes'] / GB:.1f} | {m['io']['write_bytes'] / GB:.1f} |",
        f"| floor: cat of the three inputs | {rows['read-floor']['wall_s']:.1f} | {rows['read-floor']['cpu_s']:.1f} | — | {rows['read-floor']['disk_read_bytes'] / GB:.1f} | 0 |",
        f"| floor: dd conv=fsync of one output (source in the page cache) | {rows['write-floor']['wall_s']:.1f} | {rows['write-floor']['cpu_s']:.1f} | — | — | {rows['write-floor']['disk_written_bytes'] / GB:.1f} |",
        "",
        f"merge / floor: **{m['wall_s'] / floor:.2f}** (target <= 1.3). Inside the merge: analyze pass {analyze_s:.1f} s, write pass {write_s:.1f} s, "
        f"final sync {sync_s:.1f} s; engine bytes read {m['bytes_read'] / GB:.1f} GB (from disk: {m['io']['read_bytes'] / GB:.1f} GB, /proc/self/io).",
    ])
    pio = m.get("phase_io", {})
    if "write" in pio:
        a_read = pio["write"]["read_bytes"] - pio.get("analyze", {"read_bytes": 0})["read_bytes"]
        w_read = pio.get("sync", m["io"])["read_bytes"] - pio["write"]["read_bytes"]
        w_written = pio.get("sync", m["io"])["write_bytes"] - pio["write"]["write_bytes"]
        text += (f"\nFrom disk by phase (/proc/self/io): analyze pass read {a_read / GB:.1f} GB ({a_read / GB / max(analyze_s, 1e-9):.2f} GB/s); "
                 f"write pass read {w_read / GB:.1f} GB and wrote {w_written / GB:.1f} GB in {write_s:.1f} s; "
                 f"floor rates: read {rows['read-floor']['disk_read_bytes'] / GB / rows['read-floor']['wall_s']:.2f} GB/s, "
                 f"write {out_bytes / GB / rows['write-floor']['wall_s']:.2f} GB/s. Load average at the end: {os.getloadavg()[0]:.1f}.")
    write_results("cold7b", text, {"rows": rows, "floor_s": floor, "load": os.getloadavg()}, args.results)


# --- copy-on-write file system -------------------------------------------------------------------------------


def xfs(args: argparse.Namespace) -> None:
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        raise SystemExit("needs root and xfsprogs (loop-mounts an XFS image)")
    exe = lsf_exe()
    p = gen("1b", args.data)
    files = [f for r in generate.ROLES for f in model_files(p[r])]
    image, mnt = args.data / "xfs.img", Path(tempfile.mkdtemp(prefix="lsf-xfs-"))
    with open(image, "wb") as f:
        f.truncate(int(nbytes(files) * 1.5) + (2 << 30))
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    rows: dict[str, list[dict[str, Any]]] = {"xfs": [], "ext4": []}
    try:
        for r in generate.ROLES:
            shutil.copytree(p[r], mnt / r)
        os.sync()
        on = {"xfs": {r: mnt / r for r in generate.ROLES}, "ext4": p}
        outs = {"xfs": mnt / "out", "ext4": args.data / "xfs-bench-out"}
        for rnd in range(args.repeat):
            for fs in (["xfs", "ext4"] if rnd % 2 == 0 else ["ext4", "xfs"]):
                src = on[fs]
                shutil.rmtree(outs[fs], ignore_errors=True)
                os.sync()
                subprocess.run(["cat", *[str(f) for r in generate.ROLES for f in model_files(src[r])]], stdout=subprocess.DEVNULL, check=True)
                res = run_child([sys.executable, "-c", MERGE_CHILD, str(src["base"]), str(src["safety"]), str(src["expert"]),
                                 str(outs[fs]), "module", args.outside])
                child = json.loads(res["stdout"])
                rep = json.loads((outs[fs] / "layerswap_report.json").read_text())
                # Where the wall goes, from the progress phases' first calls: import and open, the
                # analyze pass, the write pass (clones, blends), the final sync, and the rest
                # (side files, report, page, card) after the engine returned.
                # A phase shorter than one progress tick (0.1 s) may never be reported: it then
                # starts where the next one does.
                ph, total = child["phases"], child["seconds"]
                t_sync = ph.get("sync", total)
                t_write = ph.get("write", t_sync)
                t_analyze = ph.get("analyze", t_write)
                split = {"open_s": t_analyze, "analyze_s": t_write - t_analyze, "write_s": t_sync - t_write,
                         "sync_and_finish_s": total - t_sync, "in_process_s": total}
                rows[fs].append({**{k: v for k, v in res.items() if k != "stdout"}, **split, "bytes_written": rep["output"]["bytes_written"],
                                 "bytes_cloned": rep["output"].get("bytes_cloned", 0)})
                print(f"round {rnd + 1} {fs}: {res['wall_s']:.2f} s", file=sys.stderr, flush=True)
                shutil.rmtree(outs[fs], ignore_errors=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        image.unlink(missing_ok=True)
        mnt.rmdir()
    keys = ("wall_s", "cpu_s", "bytes_written", "bytes_cloned", "open_s", "analyze_s", "write_s", "sync_and_finish_s")
    med = {fs: {k: statistics.median(r[k] for r in v) for k in keys} for fs, v in rows.items()}
    text = "\n".join([
        f"1b trio, `merge -g module --outside {args.outside}` (API, in a child process), warm cache, median of {args.repeat} alternating rounds; inputs and output on the same file system",
        "",
        "| file system | wall (s) | CPU (s) | bytes written (GB) | bytes cloned (GB) | start + open (s) | analyze pass (s) | write pass (s) | sync + side files + report (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {fs} | {v['wall_s']:.2f} | {v['cpu_s']:.2f} | {v['bytes_written'] / GB:.2f} | {v['bytes_cloned'] / GB:.2f} | "
          f"{v['open_s']:.2f} | {v['analyze_s']:.2f} | {v['write_s']:.2f} | {v['sync_and_finish_s']:.2f} |" for fs, v in med.items()],
        "",
        f"ext4 / XFS wall: **{med['ext4']['wall_s'] / med['xfs']['wall_s']:.2f} x** (target >= 3). The analyze pass is the same work on both "
        f"file systems; XFS without it would take {med['xfs']['wall_s'] - med['xfs']['analyze_s']:.2f} s, ext4 without it "
        f"{med['ext4']['wall_s'] - med['ext4']['analyze_s']:.2f} s ({(med['ext4']['wall_s'] - med['ext4']['analyze_s']) / max(med['xfs']['wall_s'] - med['xfs']['analyze_s'], 1e-9):.2f} x).",
    ])
    write_results("xfs", text, {"rounds": rows, "median": med}, args.results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sparse70b", "cold7b", "xfs"])
    ap.add_argument("--data", type=Path, default=generate.ROOT)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--outside", default="blend", choices=["blend", "expert", "safety"],
                    help="xfs: the outside tensors' policy (default blend: the 0.53 GB embedding is blended, so written)")
    ap.add_argument("--keep", action="store_true", help="cold7b: keep the 40 GB trio afterwards")
    ap.add_argument("--size", help="cold7b: another trio size instead of 7b (a smoke run of the script: tiny)")
    args = ap.parse_args()
    {"sparse70b": sparse70b, "cold7b": cold7b, "xfs": xfs}[args.what](args)


if __name__ == "__main__":
    main()

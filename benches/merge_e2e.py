#!/usr/bin/env python3
"""End-to-end benchmark: layerswap-fast against the whole-model way and the I/O floor.

Every contender runs as a child process; wall time is measured around it and CPU time and peak RSS come
from the OS (``os.wait4`` rusage of that child and the children it waited for). Runs alternate (the
order rotates every round) and repeat; the table shows medians. Before every run the page cache is put
in the same state for every contender: ``warm`` reads the three inputs once first, ``cold`` drops them
from the cache (``posix_fadvise(DONTNEED)`` on each input file, which touches no other file). Every
contender's output is synced to disk before it ends (layerswap-fast and ``dd conv=fsync`` do it
themselves; the whole-model script is followed by ``sync`` inside the timed child) and deleted after it.

Contenders (``--only`` picks some):
  lsf-layer      layerswap-fast merge -g layer   (default settings: all cores, --max-memory 1GiB)
  lsf-module     layerswap-fast merge -g module
  lsf-256MiB     layerswap-fast merge -g layer --max-memory 256MiB
  whole-model    benches/whole_model.py: three state dicts in memory with torch, method, save_file
  io-floor       cat of the three inputs > /dev/null, then dd of the expert's shards to the output
                 disk with conv=fsync (the bytes any merge must read and write, with plain tools)
  mergekit       mergekit-yaml, per-layer linear merge of S and M (only if mergekit is installed)
  stats-1t/2t    the analyze pass alone (api.analyze, timed inside the child) with 1 and 2 threads:
                 the compute-bound part, for the thread scaling ratio

    python benches/merge_e2e.py --sizes 1b 3b --repeat 3
    python benches/merge_e2e.py --smoke          # tiny trio, one round: checks that everything runs

Results go to benches/results/e2e-<time>.json and .md (the markdown table is also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import generate  # noqa: E402  (benches/generate.py)

MEASURED = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.(weight|bias)$")
ALL = ["lsf-layer", "lsf-module", "lsf-256MiB", "whole-model", "io-floor", "mergekit", "stats-1t", "stats-2t"]
MIB = 1 << 20


def model_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def nbytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def set_cache(files: list[Path], state: str) -> None:
    if state == "warm":
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    else:
        os.sync()
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_child(cmd: list[str], env: Optional[dict] = None) -> dict[str, Any]:
    """Runs cmd; returns wall, cpu, peak RSS, block I/O, and its stdout."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
        # Reap with wait4 to get the child's own rusage (Popen has not reaped it yet).
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        stdout, stderr = fo.read(), fe.read()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{stderr.decode()[-3000:]}")
    return {
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "peak_rss_bytes": ru.ru_maxrss * 1024,
        "disk_read_bytes": ru.ru_inblock * 512,
        "disk_written_bytes": ru.ru_oublock * 512,
        "stdout": stdout.decode(errors="replace"),
    }


def lsf_exe() -> str:
    exe = shutil.which("layerswap-fast")
    if not exe:
        raise SystemExit("layerswap-fast is not installed: pip install -e .")
    return exe


STATS_CHILD = r"""
import sys, time, json, layerswap_fast as lsf
b, s, m, threads = sys.argv[1:5]
t = time.perf_counter()
lsf.analyze(b, s, m, threads=int(threads))
print(json.dumps({"seconds": time.perf_counter() - t}))
"""

MERGEKIT_YAML = """merge_method: linear
slices:
  - sources:
      - model: {safety}
        layer_range: [0, {n}]
        parameters: {{weight: 0.5}}
      - model: {expert}
        layer_range: [0, {n}]
        parameters: {{weight: 0.5}}
dtype: bfloat16
"""


def contender(name: str, paths: dict[str, Path], out: Path, tmp: Path) -> Optional[tuple[list[str], int, int]]:
    """(command, logical bytes read, logical bytes written) for one contender, or None if unavailable."""
    inputs = {r: model_files(p) for r, p in paths.items()}
    in_bytes = sum(nbytes(v) for v in inputs.values())
    model_bytes = nbytes(inputs["expert"])
    b, s, m = (str(paths[r]) for r in ("base", "safety", "expert"))
    lsf = [lsf_exe(), "merge", "-q", "-b", b, "-s", s, "-m", m, "-o", str(out)]
    if name == "lsf-layer":
        return lsf + ["-g", "layer"], in_bytes, model_bytes
    if name == "lsf-module":
        return lsf + ["-g", "module"], in_bytes, model_bytes
    if name == "lsf-256MiB":
        return lsf + ["-g", "layer", "--max-memory", "256MiB"], in_bytes, model_bytes
    if name == "whole-model":
        script = f"import runpy, sys, os; sys.argv = {[str(HERE / 'whole_model.py'), b, s, m, str(out)]!r}; runpy.run_path(sys.argv[0], run_name='__main__'); os.sync()"
        return [sys.executable, "-c", script], in_bytes, model_bytes
    if name == "io-floor":
        files = " ".join(f"'{f}'" for v in inputs.values() for f in v)
        dd = " && ".join(
            f"dd if='{f}' of='{out}/{f.name}' bs=16M conv=fsync status=none" for f in inputs["expert"]
        )
        return ["sh", "-c", f"cat {files} > /dev/null && mkdir -p '{out}' && {dd}"], in_bytes + model_bytes, model_bytes
    if name == "mergekit":
        exe = shutil.which("mergekit-yaml")
        if not exe:
            return None
        cfg = json.loads((paths["expert"] / "config.json").read_text())
        yml = tmp / "mergekit.yml"
        yml.write_text(MERGEKIT_YAML.format(safety=s, expert=m, n=cfg["num_hidden_layers"]))
        return [exe, str(yml), str(out), "--copy-tokenizer"], in_bytes - nbytes(inputs["base"]), model_bytes
    if name in ("stats-1t", "stats-2t"):
        measured = 3 * sum(
            t["size"] for t in _measured(paths["expert"])
        )
        return [sys.executable, "-c", STATS_CHILD, b, s, m, name[-2]], measured, 0
    raise SystemExit(f"unknown contender {name}")


def _measured(folder: Path) -> list[dict]:
    """Measured tensors (Llama naming), from the safetensors headers (no engine import: the parent
    process stays small, since a child's peak RSS as the OS reports it starts from the parent's)."""
    out = []
    for f in model_files(folder):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__" and MEASURED.match(name):
                lo, hi = t["data_offsets"]
                out.append({"name": name, "size": hi - lo})
    return out


def machine() -> dict[str, Any]:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001 - informational only
            return "n/a"

    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    def pkg(name: str) -> str:
        try:
            return pkg_version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "cores": os.cpu_count(),
        "ram_bytes": mem,
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "layerswap_fast": pkg("layerswap-fast"),
        "git": version(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"]),
        "rustc": version(["rustc", "--version"]),
        "torch": pkg("torch"),
        "safetensors": pkg("safetensors"),
        "mergekit": version(["mergekit-yaml", "--version"]) if shutil.which("mergekit-yaml") else "not installed",
    }


def fits_in_ram(paths: dict[str, Path]) -> bool:
    """The whole-model way holds three models plus the output: skip it where that cannot fit."""
    need = 4 * nbytes(model_files(paths["expert"]))
    with open("/proc/meminfo") as f:
        avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    return need < 0.85 * avail


def bench_size(size: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    d = generate.trio_dir(args.data, size, "bf16")
    if not (d / generate.DONE).exists():  # generate in a child: numpy stays out of this process
        subprocess.run([sys.executable, str(HERE / "generate.py"), size, "--root", str(args.data)], check=True)
    paths = generate.ensure(size, root=args.data)
    inputs = [f for r in ("base", "safety", "expert") for f in model_files(paths[r])]
    names = [n for n in args.only if n != "mergekit" or shutil.which("mergekit-yaml")]
    skipped = {}
    if "whole-model" in names and not fits_in_ram(paths):
        names.remove("whole-model")
        skipped["whole-model"] = "three models plus the output do not fit in this machine's RAM"
    runs: dict[str, list[dict]] = {n: [] for n in names}
    plans = {}
    for rnd in range(args.repeat):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for name in order:
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            spec = contender(name, paths, out, work)
            if spec is None:
                continue
            cmd, rd, wr = spec
            set_cache(inputs, args.cache)
            r = run_child(cmd)
            if name.startswith("stats-"):
                r["timed_s"] = json.loads(r["stdout"].strip().splitlines()[-1])["seconds"]
            if name.startswith("lsf-"):
                rep = json.loads((out / "layerswap_report.json").read_text())
                rd, wr = rep["bytes_read"], rep["output"]["bytes_written"]
                r["engine_peak_rss_bytes"] = rep["peak_rss_bytes"]
                plans[name] = rep["counts"]
            r.pop("stdout")
            r["bytes_read"], r["bytes_written"] = rd, wr
            runs[name].append(r)
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {size} round {rnd + 1}/{args.repeat} {name:<12} wall {r['wall_s']:7.2f} s  cpu {r['cpu_s']:7.2f} s  "
                  f"rss {r['peak_rss_bytes'] / MIB:8.1f} MiB", file=sys.stderr, flush=True)
    med = {}
    for name, rs in runs.items():
        if not rs:
            continue
        m = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        m["runs"] = len(rs)
        t = m.get("timed_s", m["wall_s"])
        m["throughput_bytes_per_s"] = (m["bytes_read"] + m["bytes_written"]) / t
        med[name] = m
    return {"size": size, "input_bytes": nbytes(inputs), "model_bytes": nbytes(model_files(paths["expert"])),
            "cache": args.cache, "median": med, "runs": runs, "counts": plans, "skipped": skipped}


def ratios(res: dict[str, Any]) -> dict[str, float]:
    m = res["median"]
    out = {}
    if "lsf-layer" in m and "io-floor" in m:
        out["lsf_layer_wall_over_io_floor"] = m["lsf-layer"]["wall_s"] / m["io-floor"]["wall_s"]
    if "lsf-module" in m and "io-floor" in m:
        out["lsf_module_wall_over_io_floor"] = m["lsf-module"]["wall_s"] / m["io-floor"]["wall_s"]
    if "lsf-layer" in m and "whole-model" in m:
        out["whole_model_wall_over_lsf_layer"] = m["whole-model"]["wall_s"] / m["lsf-layer"]["wall_s"]
        out["whole_model_rss_over_lsf_layer"] = m["whole-model"]["peak_rss_bytes"] / m["lsf-layer"]["peak_rss_bytes"]
    if "stats-1t" in m and "stats-2t" in m:
        out["stats_1t_over_2t"] = m["stats-1t"]["timed_s"] / m["stats-2t"]["timed_s"]
    return out


def markdown(report: dict[str, Any]) -> str:
    mc = report["machine"]
    lines = [
        f"# merge_e2e — {report['started']}",
        "",
        f"Machine: {mc['cores']} cores ({mc['cpu']}), {mc['ram_bytes'] / 2**30:.0f} GiB RAM, Linux {mc['kernel']}. "
        f"layerswap-fast {mc['layerswap_fast']} ({mc['git']}), {mc['rustc']}, Python {mc['python']}, torch {mc['torch']}, "
        f"mergekit {mc['mergekit']}.",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    for res in report["results"]:
        lines += [
            f"## {res['size']} — inputs {res['input_bytes'] / 1e9:.2f} GB, output {res['model_bytes'] / 1e9:.2f} GB, page cache {res['cache']}",
            "",
            "| contender | runs | wall s (median) | CPU s | peak RSS MiB | read GB | written GB | GB/s (read+written) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in res["median"].items():
            wall = m.get("timed_s", m["wall_s"])
            label = name + (" (pass only)" if "timed_s" in m else "")
            lines.append(
                f"| {label} | {m['runs']} | {wall:.2f} | {m['cpu_s']:.2f} | {m['peak_rss_bytes'] / MIB:.0f} | "
                f"{m['bytes_read'] / 1e9:.2f} | {m['bytes_written'] / 1e9:.2f} | {m['throughput_bytes_per_s'] / 1e9:.2f} |"
            )
        for name, why in res["skipped"].items():
            lines.append(f"| {name} | skipped: {why} | | | | | | |")
        lines.append("")
        if res["ratios"]:
            lines.append("Ratios (medians of this run): " + ", ".join(f"{k} = {v:.2f}" for k, v in res["ratios"].items()))
            lines.append("")
    if "rss_3b_over_1b" in report:
        lines.append(f"Peak RSS ratio 3b / 1b (lsf-layer): {report['rss_3b_over_1b']:.3f}")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1b"], help="synth sizes (tiny, small, 0.5b, 1b, 3b)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (median over them); default 3")
    ap.add_argument("--only", nargs="+", default=ALL, choices=ALL, help="contenders to run")
    ap.add_argument("--cache", choices=["warm", "cold"], default="warm")
    ap.add_argument("--data", type=Path, default=generate.ROOT, help="where trios live / are generated")
    ap.add_argument("--work", type=Path, default=None, help="output scratch folder (default: beside --data)")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--smoke", action="store_true", help="tiny trio, one round, results in a temp folder")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeat = ["tiny"], 1
        args.data = Path(tempfile.mkdtemp(prefix="lsf-smoke-"))
        args.results = args.data / "results"
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    work = args.work or args.data / "_work"
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started": started, "launcher_peak_rss_bytes": 0, "command": " ".join(["python", "benches/merge_e2e.py", *(argv or sys.argv[1:])]),
                              "machine": machine(), "results": []}
    try:
        for size in args.sizes:
            res = bench_size(size, args, work)
            res["ratios"] = ratios(res)
            report["results"].append(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import resource

    # Every child's reported peak RSS is at least this (Linux carries the parent's over fork + exec).
    report["launcher_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    by = {r["size"]: r["median"].get("lsf-layer") for r in report["results"]}
    if by.get("1b") and by.get("3b"):
        report["rss_3b_over_1b"] = by["3b"]["peak_rss_bytes"] / by["1b"]["peak_rss_bytes"]
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"e2e-{started.replace(':', '')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    stem.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"written: {stem}.json, {stem}.md", file=sys.stderr)
    if args.smoke:
        shutil.rmtree(args.data, ignore_errors=True)


if __name__ == "__main__":
    main()

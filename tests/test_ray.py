"""The Ray executor on a real two-node Ray cluster on this machine's loopback address: the statistics
pass split into one task per model, the write passes as tasks, outputs byte-identical to a local bulk
run, tasks on both nodes, and no Ray process listening on anything but 127.0.0.1.

Ray picks the machine's outward address on Linux unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is in the
environment of every process, the driver included, before Ray is imported; it is set below, before
the import, and inherited by every node and worker the cluster starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="ray not installed (pip install ray)")
cluster_utils = pytest.importorskip("ray.cluster_utils")

import layerswap_fast as lsf  # noqa: E402
from layerswap_fast import bulk, synth  # noqa: E402
from conftest import model_digest  # noqa: E402

if ray._private.ray_constants.ENABLE_RAY_CLUSTER:  # imported by an earlier module without the variable
    pytest.skip("ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set; run this file on its own",
                allow_module_level=True)

N_EXPERTS = 8


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two Ray nodes (one CPU each, so tasks must spread) on 127.0.0.1, each in a temporary folder
    of its own; stopped at the end of the module."""
    temps = [tempfile.mkdtemp(prefix="lsf-ray-") for _ in range(2)]  # short: socket paths fit in 107 bytes
    c = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False, "temp_dir": temps[0]},
    )
    try:
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1", temp_dir=temps[1])
        c.wait_for_nodes()
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base/safety pair and eight language experts of that base, strong in different layers."""
    root = tmp_path_factory.mktemp("ray-models")
    cfg = synth.LlamaConfig(n_layers=4)
    first = synth.make_trio(root / "t0", cfg, shard_bytes={"expert": 60_000})
    out = {"base": first["base"], "safety": first["safety"], "x0": first["expert"]}
    for k in range(1, N_EXPERTS):
        planting = synth.Planting(safety_layers=[2, 3], expert_layers=[k % 4, (k + 1) % 4])
        out[f"x{k}"] = synth.make_trio(root / f"t{k}", cfg, planting=planting, roles=("expert",))["expert"]
    return out


def descendants(pid: int) -> set[int]:
    """pid and every process below it (Ray's nodes and workers are children of the process that
    started the cluster)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(children.get(p, []))
    return out


def listening(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, process) of every TCP socket the given processes listen on, from `ss -ltnp`."""
    text = subprocess.run(["ss", "-ltnpH"], check=True, capture_output=True, text=True).stdout
    out = []
    for line in text.splitlines():
        fields = line.split()
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            out.append((fields[3], fields[-1]))
    return out


def is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "::ffff:127.0.0.1", "::1") or host.startswith("127.")


def specs(experts: dict[str, Path]) -> list[bulk.ExpertSpec]:
    opts = [lsf.MergeOptions(), lsf.MergeOptions(granularity="module"), lsf.MergeOptions(alpha=0.3), lsf.MergeOptions(tau=0.02)]
    return [bulk.ExpertSpec(f"x{k}", experts[f"x{k}"], opts[k % len(opts)]) for k in range(N_EXPERTS)]


def same_outputs(a: Path, b: Path, names: list[str]) -> None:
    for n in names:
        da, db = model_digest(a / n), model_digest(b / n)
        ra = json.loads((a / n / "layerswap_report.json").read_text())
        rb = json.loads((b / n / "layerswap_report.json").read_text())
        assert da == db, n
        assert ra["units"] == rb["units"], n


def test_statistics_and_writes_spread_over_two_nodes_on_loopback(cluster, experts, tmp_path):
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        summary = bulk.bulk_merge(experts["base"], experts["safety"], specs(experts), tmp_path / "ray", executor="ray")
        sockets = listening(descendants(os.getpid()))
    finally:
        ray.shutdown()
    assert {e["status"] for e in summary["experts"].values()} == {"ok"}
    # One statistics task for S, one per expert, one write task per expert; both nodes did some.
    assert set(summary["ray_nodes"]) == {"statistics:safety"} | {f"{p}:x{k}" for p in ("statistics", "write") for k in range(N_EXPERTS)}
    assert set(summary["ray_nodes"].values()) == nodes
    stats_nodes = {v for k, v in summary["ray_nodes"].items() if k.startswith("statistics:")}
    assert stats_nodes == nodes
    # Every listening socket of the cluster's processes is on loopback (and there are some: the
    # check looked at the right processes).
    assert any("gcs_server" in p for _, p in sockets) and any("raylet" in p for _, p in sockets), sockets
    assert [s for s in sockets if not is_loopback(s[0])] == []
    local = bulk.bulk_merge(experts["base"], experts["safety"], specs(experts), tmp_path / "local")
    assert "ray_nodes" not in local
    same_outputs(tmp_path / "ray", tmp_path / "local", [f"x{k}" for k in range(N_EXPERTS)])


def test_separate_driver_process_with_ray_address(cluster, experts, tmp_path):
    """The CLI as a driver of an existing cluster (RAY_ADDRESS=127.0.0.1:PORT), saved statistics
    standing in for the safety expert, and a broken expert reported while the others finish."""
    assert not ray.is_initialized()
    stats = tmp_path / "stats.json"
    cli = [sys.executable, "-m", "layerswap_fast"]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    r = subprocess.run(cli + ["analyze", "-b", str(experts["base"]), "-s", str(experts["safety"]), "-m", str(experts["x0"]),
                              "--save-stats", str(stats)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(experts["x1"], bad)
    shard = bad / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    args = ["merge", "-q", "-b", str(experts["base"]), "-s", str(experts["safety"]), "-m", f"x2={experts['x2']}",
            "-m", f"bad={bad}", "-m", f"x3={experts['x3']}", "--stats", str(stats)]
    r = subprocess.run(cli + args + ["-o", str(tmp_path / "ray"), "--executor", "ray"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and (tmp_path / "ray" / bulk.SUMMARY).exists(), r.stdout + r.stderr
    summary = json.loads((tmp_path / "ray" / bulk.SUMMARY).read_text())
    assert {n: e["status"] for n, e in summary["experts"].items()} == {"x2": "ok", "bad": "failed", "x3": "ok"}
    assert "model.safetensors" in summary["experts"]["bad"]["error"]
    assert "statistics:safety" not in summary["ray_nodes"]  # S was not read: its sums came from the file
    r = subprocess.run(cli + args + ["-o", str(tmp_path / "local")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    same_outputs(tmp_path / "ray", tmp_path / "local", ["x2", "x3"])


def test_an_expert_rewritten_between_its_statistics_and_its_write_task_is_refused(cluster, experts, tmp_path, monkeypatch):
    """The write task opens the models again on whatever node runs it: it checks that they are the
    files its plan's sums were computed on (the stamps the statistics tasks carried back), so an
    expert rewritten in between fails, named, while the others are written."""
    changed = tmp_path / "changed"
    shutil.copytree(experts["x1"], changed)
    run_ray = bulk._run_ray

    def rewrite_then_write(*args: Any, **kwargs: Any) -> None:
        from test_session import rewrite_in_place

        rewrite_in_place(changed)  # after the statistics tasks, before the write tasks
        run_ray(*args, **kwargs)

    monkeypatch.setattr(bulk, "_run_ray", rewrite_then_write)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        specs = [bulk.ExpertSpec("x0", experts["x0"]), bulk.ExpertSpec("changed", changed)]
        summary = bulk.bulk_merge(experts["base"], experts["safety"], specs, tmp_path / "ray", executor="ray")
    finally:
        ray.shutdown()
    assert summary["experts"]["x0"]["status"] == "ok"
    bad = summary["experts"]["changed"]
    assert bad["status"] == "failed" and bad["kind"] == "InvalidModelError", bad
    assert "file was changed or replaced since its statistics were computed" in bad["error"] and str(changed) in bad["error"]
    assert not (tmp_path / "ray" / "changed").exists()

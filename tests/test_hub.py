"""Hub ids (``org/name[@REVISION]``) resolved through a real Hugging Face cache layout: blobs, snapshot
symlinks into them, refs. huggingface_hub itself reads the layout; no test touches the network
(``HF_HUB_OFFLINE=1``, or an endpoint on a closed local port)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

import layerswap_fast as lsf  # noqa: E402
from layerswap_fast import hub, synth  # noqa: E402
from layerswap_fast.errors import InvalidModelError  # noqa: E402

#: Nothing listens here: a lookup that tries the network fails at once instead of leaving the machine.
NO_ENDPOINT = "http://127.0.0.1:9"
ORG = "acme"


def add_revision(cache: Path, repo: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """Stores ``folder``'s files as one commit of ``repo`` in a hub cache, the way huggingface_hub
    lays it out (content-addressed blobs, relative snapshot symlinks, refs naming the commit).
    Returns the commit hash."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    files = sorted(p for p in folder.iterdir() if p.is_file())
    tree = hashlib.sha1()
    for f in files:
        tree.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    commit = tree.hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for f in files:
        data = f.read_bytes()
        # LFS files are stored under their sha256, small git files under their git blob sha1.
        blob = hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        target = repo_dir / "blobs" / blob
        if not target.exists():
            shutil.copyfile(f, target)
        if not (snapshot / f.name).is_symlink():
            os.symlink(os.path.relpath(target, snapshot), snapshot / f.name)
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A cache holding base, safety and two revisions of a language expert (main and tag v1), plus the
    same models as plain folders."""
    root = tmp_path_factory.mktemp("hub")
    cfg = synth.LlamaConfig()
    paths = synth.make_trio(root / "models", cfg, shard_bytes={"base": None, "safety": 40_000, "expert": None})
    other = synth.make_trio(root / "models-v1", cfg, roles=("expert",),
                            planting=synth.Planting(safety_layers=range(2, 4), expert_layers=range(0, 4)))["expert"]
    cache = root / "cache"
    commits = {
        "base": add_revision(cache, f"{ORG}/base", paths["base"]),
        "safety": add_revision(cache, f"{ORG}/safety", paths["safety"]),
        "v1": add_revision(cache, f"{ORG}/ko", other, refs=("v1",)),
        "expert": add_revision(cache, f"{ORG}/ko", paths["expert"]),
    }
    return {"cache": cache, "paths": paths, "v1": other, "commits": commits}


def cli(args: list[str], cache: Path, cwd: Path | None = None, offline: bool = True, pre: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf-home"), HF_ENDPOINT=NO_ENDPOINT, HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    code = f"{pre}\nimport sys\nfrom layerswap_fast.cli import main\nsys.argv = ['layerswap-fast'] + {args!r}\nmain()"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.endswith((".safetensors", ".json")) and p.name != "layerswap_report.json"}


def trio_args(base: str, safety: str, expert: str) -> list[str]:
    return ["-b", base, "-s", safety, "-m", expert]


def test_cache_layout_is_one_huggingface_hub_accepts(hub_cache):
    info = huggingface_hub.scan_cache_dir(hub_cache["cache"])
    assert info.warnings == []
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {f"{ORG}/base", f"{ORG}/safety", f"{ORG}/ko"}
    ko = repos[f"{ORG}/ko"]
    assert {r.commit_hash for r in ko.revisions} == {hub_cache["commits"]["expert"], hub_cache["commits"]["v1"]}
    assert {ref for r in ko.revisions for ref in r.refs} == {"main", "v1"}
    # Snapshot files are symlinks into blobs, and safetensors blobs are named by their sha256.
    snap = hub_cache["cache"] / f"models--{ORG}--ko" / "snapshots" / hub_cache["commits"]["expert"]
    link = snap / "model.safetensors"
    assert link.is_symlink() and link.resolve().parent.name == "blobs"
    assert link.resolve().name == hashlib.sha256(link.read_bytes()).hexdigest()


def test_merge_by_id_equals_merge_by_path_byte_for_byte(hub_cache, tmp_path):
    p = hub_cache["paths"]
    by_path = cli(["merge", *trio_args(str(p["base"]), str(p["safety"]), str(p["expert"])), "-o", str(tmp_path / "by-path"), "-g", "module"],
                  hub_cache["cache"])
    assert by_path.returncode == 0, by_path.stderr
    by_id = cli(["merge", *trio_args(f"{ORG}/base", f"{ORG}/safety@main", f"{ORG}/ko"), "-o", str(tmp_path / "by-id"), "-g", "module"],
                hub_cache["cache"])
    assert by_id.returncode == 0, by_id.stderr
    assert shards(tmp_path / "by-id") == shards(tmp_path / "by-path")
    assert set(shards(tmp_path / "by-id")) >= {"model.safetensors", "config.json", "tokenizer.json"}
    report = json.loads((tmp_path / "by-id" / "layerswap_report.json").read_text())
    c = hub_cache["commits"]
    assert report["hub"] == {
        "base": {"id": f"{ORG}/base", "revision": "main", "commit": c["base"]},
        "safety": {"id": f"{ORG}/safety", "revision": "main", "commit": c["safety"]},
        "expert": {"id": f"{ORG}/ko", "revision": "main", "commit": c["expert"]},
    }
    assert report["inputs"]["expert"].endswith(f"snapshots/{c['expert']}")
    assert "hub" not in json.loads((tmp_path / "by-path" / "layerswap_report.json").read_text())


def test_revision_selects_that_snapshot(hub_cache):
    p = hub_cache["paths"]
    want_v1 = cli(["analyze", *trio_args(str(p["base"]), str(p["safety"]), str(hub_cache["v1"])), "--json"], hub_cache["cache"])
    want_main = cli(["analyze", *trio_args(str(p["base"]), str(p["safety"]), str(p["expert"])), "--json"], hub_cache["cache"])
    assert want_v1.returncode == 0 and want_main.returncode == 0
    assert json.loads(want_v1.stdout)["units"] != json.loads(want_main.stdout)["units"]  # the revisions differ
    for rev in ("v1", hub_cache["commits"]["v1"]):
        got = cli(["analyze", *trio_args(f"{ORG}/base", f"{ORG}/safety", f"{ORG}/ko@{rev}"), "--json"], hub_cache["cache"])
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["units"] == json.loads(want_v1.stdout)["units"], rev
    got = cli(["analyze", *trio_args(f"{ORG}/base", f"{ORG}/safety", f"{ORG}/ko"), "--json"], hub_cache["cache"])
    assert json.loads(got.stdout)["units"] == json.loads(want_main.stdout)["units"]


@pytest.mark.parametrize("offline", [True, False])
def test_missing_id_is_exit_2_naming_id_revision_and_cache(hub_cache, tmp_path, offline):
    r = cli(["merge", *trio_args(f"{ORG}/base", f"{ORG}/safety", f"{ORG}/nope@v2"), "-o", str(tmp_path / "o")], hub_cache["cache"],
            offline=offline)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"'{ORG}/nope'" in line and "revision v2" in line and str(hub_cache["cache"] / f"models--{ORG}--nope") in line
    assert ("HF_HUB_OFFLINE" in line) if offline else ("could not be downloaded" in line)
    assert not (tmp_path / "o").exists()
    # A revision the cache does not have is missing too, though the repo is there.
    r = cli(["analyze", *trio_args(f"{ORG}/base", f"{ORG}/safety", f"{ORG}/ko@v9")], hub_cache["cache"], offline=offline)
    assert r.returncode == 2 and "revision v9" in r.stderr


def test_incomplete_snapshot_is_missing(hub_cache, tmp_path):
    """A snapshot whose index names a shard that was never downloaded (dangling symlink) is not used."""
    cache = tmp_path / "cache"
    shutil.copytree(hub_cache["cache"], cache, symlinks=True)
    snap = cache / f"models--{ORG}--safety" / "snapshots" / hub_cache["commits"]["safety"]
    shard = sorted(snap.glob("model-*.safetensors"))[1]
    shard.resolve().unlink()
    for offline in (True, False):
        r = cli(["analyze", *trio_args(f"{ORG}/base", f"{ORG}/safety", f"{ORG}/ko")], cache, offline=offline)
        assert r.returncode == 2, r.stderr
        assert f"'{ORG}/safety' (revision main)" in r.stderr


def test_network_not_needed_when_cached(hub_cache, tmp_path):
    """With the network allowed (but unreachable), a complete cached snapshot is used without a lookup."""
    r = cli(["analyze", *trio_args(f"{ORG}/base", f"{ORG}/safety", f"{ORG}/ko")], hub_cache["cache"], offline=False)
    assert r.returncode == 0, r.stderr


def test_local_folder_named_like_an_id_wins(hub_cache, tmp_path):
    p = hub_cache["paths"]
    shutil.copytree(hub_cache["v1"], tmp_path / ORG / "ko")  # ./acme/ko is the v1 expert; the cache's main differs
    r = cli(["merge", *trio_args(f"{ORG}/base", f"{ORG}/safety", f"{ORG}/ko"), "-o", "out"], hub_cache["cache"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = cli(["merge", *trio_args(str(p["base"]), str(p["safety"]), str(hub_cache["v1"])), "-o", str(tmp_path / "want")],
               hub_cache["cache"])
    assert want.returncode == 0, want.stderr
    assert shards(tmp_path / "out") == shards(tmp_path / "want")
    report = json.loads((tmp_path / "out" / "layerswap_report.json").read_text())
    assert report["inputs"]["expert"] == f"{ORG}/ko" and set(report["hub"]) == {"base", "safety"}


def test_hf_home_is_honoured(hub_cache, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "hub").symlink_to(hub_cache["cache"], target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_ENDPOINT=NO_ENDPOINT)
    r = subprocess.run([sys.executable, "-m", "layerswap_fast", "analyze", *trio_args(f"{ORG}/base", f"{ORG}/safety", f"{ORG}/ko")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    env["HF_HOME"] = str(tmp_path / "empty-home")
    r = subprocess.run([sys.executable, "-m", "layerswap_fast", "inspect", f"{ORG}/ko"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and str(tmp_path / "empty-home" / "hub" / f"models--{ORG}--ko") in r.stderr


def test_without_the_hub_extra_an_id_is_exit_2(hub_cache, tmp_path):
    r = cli(["analyze", *trio_args(f"{ORG}/base", f"{ORG}/safety", f"{ORG}/ko@v1")], hub_cache["cache"],
            pre="import sys; sys.modules['huggingface_hub'] = None  # as if not installed")
    assert r.returncode == 2, r.stderr
    assert f"'{ORG}/base'" in r.stderr and "revision main" in r.stderr and "layerswap-fast[hub]" in r.stderr
    assert str(hub_cache["cache"]) in r.stderr
    # Local paths need no extra.
    p = hub_cache["paths"]
    r = cli(["analyze", *trio_args(str(p["base"]), str(p["safety"]), str(p["expert"]))], hub_cache["cache"],
            pre="import sys; sys.modules['huggingface_hub'] = None")
    assert r.returncode == 0, r.stderr


def test_bulk_names_and_plan_file_take_ids(hub_cache, tmp_path):
    c = hub_cache["commits"]
    r = cli(["merge", "-b", f"{ORG}/base", "-s", f"{ORG}/safety", "-m", f"ko={ORG}/ko", "-m", f"old={ORG}/ko@v1", "-m", f"bad={ORG}/gone",
             "-o", str(tmp_path / "bulk")], hub_cache["cache"])
    assert r.returncode == 1, r.stderr  # one failed expert, the others finished
    assert f"'{ORG}/gone'" in r.stderr
    for name, commit in (("ko", c["expert"]), ("old", c["v1"])):
        report = json.loads((tmp_path / "bulk" / name / "layerswap_report.json").read_text())
        assert report["hub"]["expert"] == {"id": f"{ORG}/ko", "revision": "main" if name == "ko" else "v1", "commit": commit}
    manifest = json.loads((tmp_path / "bulk" / "layerswap_bulk.json").read_text())
    assert manifest["experts"]["old"]["expert"] == f"{ORG}/ko@v1"
    p = hub_cache["paths"]
    single = cli(["merge", *trio_args(str(p["base"]), str(p["safety"]), str(hub_cache["v1"])), "-o", str(tmp_path / "single")], hub_cache["cache"])
    assert single.returncode == 0
    assert shards(tmp_path / "bulk" / "old") == shards(tmp_path / "single")
    plan = tmp_path / "plan.toml"
    plan.write_text(f'base = "{ORG}/base"\nsafety = "{ORG}/safety"\nout = "planned"\n[experts.old]\npath = "{ORG}/ko@v1"\n')
    r = cli(["merge", "--plan", str(plan)], hub_cache["cache"])
    assert r.returncode == 0, r.stderr
    assert shards(tmp_path / "planned" / "old") == shards(tmp_path / "single")


def test_python_api_takes_ids(hub_cache, tmp_path, monkeypatch):
    """lsf.merge/analyze/inspect/verify resolve ids too (verify runs on this merge via the verify_all plugin)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache["cache"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    report = lsf.merge(f"{ORG}/base", f"{ORG}/safety", f"{ORG}/ko@v1", tmp_path / "o")
    assert report["hub"]["expert"]["commit"] == hub_cache["commits"]["v1"]
    assert lsf.inspect(f"{ORG}/ko")["n_layers"] == 4
    with pytest.raises(InvalidModelError, match="revision nope"):
        lsf.analyze(f"{ORG}/base", f"{ORG}/safety", f"{ORG}/ko@nope")


def test_download_patterns_take_only_what_a_merge_reads():
    """What a download would fetch from a typical repo listing (huggingface_hub's own filter)."""
    from huggingface_hub.utils import filter_repo_objects

    listing = [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "consolidated.00.pth", "original/consolidated.00.pth",
        "original/model.safetensors", "onnx/model.onnx", "config.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "README.md", ".gitattributes", "LICENSE",
    ]
    got = set(filter_repo_objects(listing, allow_patterns=list(hub.ALLOW_PATTERNS), ignore_patterns=list(hub.IGNORE_PATTERNS)))
    assert got == {
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json", "config.json",
        "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "README.md",
    }


@pytest.mark.parametrize("value,parsed", [
    ("meta-llama/Llama-3.2-1B", ("meta-llama/Llama-3.2-1B", "main")),
    ("beomi/Llama-3-Open-Ko-8B@v1.0", ("beomi/Llama-3-Open-Ko-8B", "v1.0")),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("./org/name", None), ("/abs/path", None), ("a/b/c", None), ("name", None), ("dir/model.safetensors", None), ("org/name@", None),
])
def test_parse_id(value, parsed):
    assert hub.parse_id(value) == parsed

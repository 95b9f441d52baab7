"""Writes the hostile-input corpus in this folder: small broken checkpoints, each paired with the one line
of error the CLI must print for it. The files are committed (the test suite and the fuzzers read them
every run); this script is how they were made and is checked to reproduce them byte for byte.

    python tests/hostile/make_corpus.py            # rewrite the corpus
    python tests/hostile/make_corpus.py --check    # exit 1 if the committed files differ

Layout of the corpus:
    good/{base,safety,expert}/   a valid 2-layer Llama trio (bf16, config + tokenizer files)
    header/<case>.safetensors    one defect in the safetensors header or data section
    index/<case>/                a sharded expert folder with one defect in its index or shards
    models/<case>/               a single-file model that is valid alone but does not fit the trio
    cases.json                   per case: which input it replaces, extra CLI options, and the text the
                                 one-line error must contain (file and tensor names)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from layerswap_fast import synth

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # tests/, when run as a script: the tests' safetensors reader
from models import read_header  # noqa: E402

CONFIG = synth.LlamaConfig(n_layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=16)
Q = "model.layers.0.self_attn.q_proj.weight"  # a measured tensor
UP = "model.layers.1.mlp.up_proj.weight"  # another measured tensor
Entry = dict[str, Any]


def read_st(path: Path) -> tuple[dict[str, Entry], bytes]:
    """Header entries (``__metadata__`` included, in file order) and the data section."""
    header, start = read_header(path)
    return header, path.read_bytes()[start:]


def header_text(entries: dict[str, Entry]) -> bytes:
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def st_bytes(text: bytes, data: bytes, prefix: Optional[int] = None) -> bytes:
    return struct.pack("<Q", len(text) if prefix is None else prefix) + text + data


def tensors(entries: dict[str, Entry], data: bytes) -> list[tuple[str, str, list[int], bytes]]:
    """(name, dtype, shape, bytes) in file order, metadata left out."""
    out = []
    for name, e in entries.items():
        if name != "__metadata__":
            a, b = e["data_offsets"]
            out.append((name, e["dtype"], e["shape"], data[a:b]))
    return out


def pack(items: list[tuple[str, str, list[int], bytes]]) -> bytes:
    """A valid file of these tensors, contiguous in the given order."""
    entries: dict[str, Entry] = {"__metadata__": {"format": "pt"}}
    data = b""
    for name, dtype, shape, blob in items:
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    return st_bytes(header_text(entries), data)


def bf16(values: np.ndarray) -> bytes:
    return synth.encode(values.astype(np.float32), "bf16")


def poke(items: list[tuple[str, str, list[int], bytes]], name: str, value: float) -> list[tuple[str, str, list[int], bytes]]:
    """A copy with element 1 of tensor `name` (bf16) set to `value`."""
    out = []
    for n, dtype, shape, blob in items:
        if n == name:
            blob = blob[:2] + bf16(np.array([value])) + blob[4:]
        out.append((n, dtype, shape, blob))
    return out


# --- header cases: mutate the good expert file -----------------------------------------------------------


def header_cases(good: Path) -> dict[str, tuple[bytes, list[str]]]:
    """name -> (file bytes, fragments the error must contain besides the file name)."""
    entries, data = read_st(good)
    text = header_text(entries)
    items = tensors(entries, data)

    def edit(f: Callable[[dict[str, Entry]], None]) -> bytes:
        e = json.loads(json.dumps(entries))
        f(e)
        return st_bytes(header_text(e), data)

    def set_q(**kw: Any) -> Callable[[dict[str, Entry]], None]:
        return lambda e: e[Q].update(kw)

    q_a, q_b = entries[Q]["data_offsets"]
    # The tensor stored right after Q (so that overlaps and gaps are about the pair Q / next).
    after_q = min((v["data_offsets"][0], k) for k, v in entries.items() if k != "__metadata__" and v["data_offsets"][0] >= q_b)[1]
    last = max((v["data_offsets"][1], k) for k, v in entries.items() if k != "__metadata__")[1]
    deep = b'{"a":' + b"[" * 5_000 + b"]" * 5_000 + b"}"
    dup_text = text.rstrip()[:-1] + b',"' + Q.encode() + b'":' + json.dumps(entries[Q]).encode() + b"}"

    def shift_last(e: dict[str, Entry]) -> None:
        a, b = e[last]["data_offsets"]
        e[last]["data_offsets"] = [a + 64, b + 64]

    return {
        "empty": (b"", ["0 bytes", "at least 8"]),
        "too_short": (b"\x10\x00\x00\x00\x00", ["5 bytes", "at least 8"]),
        "prefix_beyond_file": (st_bytes(text, data, prefix=len(text) + len(data) + 100), ["larger than the file"]),
        "prefix_absurd": (st_bytes(text, data, prefix=2**63 + 5), ["exceeds the 100000000-byte limit"]),
        "prefix_zero": (st_bytes(b"", text + data), ["not valid JSON"]),
        "not_utf8": (st_bytes(text.replace(b"model.norm", b"model.n\xffrm", 1), data), ["not valid UTF-8"]),
        "not_json": (st_bytes(text[:-9] + b" " * 9, data), ["not valid JSON"]),
        "json_array": (st_bytes(b"[1, 2]  ", data), ["not valid JSON"]),
        "deep_nesting": (st_bytes(deep + b" " * (-len(deep) % 8), b""), ["not valid JSON"]),
        "unknown_dtype": (edit(set_q(dtype="Q7")), [Q, "unknown dtype 'Q7'", "supported: BF16, F16, F32, F64"]),
        "unsupported_dtype": (edit(set_q(dtype="F4")), [Q, "unsupported dtype 'F4'"]),
        "integer_measured_tensor": (edit(set_q(dtype="I16")), [Q, "I16", "only float tensors"]),
        "dtype_not_string": (edit(set_q(dtype=16)), [Q, "'dtype'"]),
        "shape_size_mismatch": (edit(set_q(shape=[8, 9])), [Q, "needs 144 bytes but data_offsets span 128"]),
        "shape_negative": (edit(set_q(shape=[-8, -8])), [Q, "non-negative integers"]),
        "shape_overflow": (edit(set_q(shape=[2**32, 2**32, 2**32])), [Q, "too large"]),
        "offsets_not_pair": (edit(set_q(data_offsets=[q_a])), [Q, "data_offsets must be [start, end]"]),
        "offsets_end_before_start": (edit(set_q(data_offsets=[q_b, q_a])), [Q, "end before start"]),
        "offsets_out_of_bounds": (edit(shift_last), [last, "leaves a gap"]),
        "offsets_beyond_data": (st_bytes(text, data[:-64]), [last, "truncated file?"]),
        "overlap": (edit(lambda e: e[after_q].update(data_offsets=[e[after_q]["data_offsets"][0] - 2, e[after_q]["data_offsets"][1] - 2])), [after_q, "overlaps the previous tensor"]),
        "gap": (edit(lambda e: e[after_q].update(data_offsets=[e[after_q]["data_offsets"][0] + 2, e[after_q]["data_offsets"][1] + 2])), [after_q, "leaves a gap"]),
        "duplicate_name": (st_bytes(dup_text + b" " * (-len(dup_text) % 8), data), [Q, "appears twice"]),
        "truncated_data": (st_bytes(text, data)[:-10], [last, "truncated file?"]),
        "trailing_bytes": (st_bytes(text, data + b"\x00" * 16), ["data section has", "but the tensors cover"]),
        "metadata_not_object": (edit(lambda e: e.update(__metadata__=["pt"])), ["__metadata__ must be a JSON object"]),
        "metadata_value_not_string": (edit(lambda e: e.update(__metadata__={"format": 1})), ["__metadata__ value for 'format' must be a string"]),
        "entry_not_object": (edit(lambda e: e.update({Q: 5})), [Q, "entry must be a JSON object"]),
        "huge_layer_index": (pack([(n.replace("model.layers.1.", "model.layers.1000000000000."), d, s, b) for n, d, s, b in items]),
                             ["unknown model layout", "model.embed_tokens.weight"]),
    }


# --- index cases: a sharded copy of the good expert with one defect ----------------------------------------


def write_sharded(dst: Path, items: list[tuple[str, str, list[int], bytes]], split: int) -> dict[str, str]:
    """Two shards (tensors [:split] and [split:]) and their correct weight map."""
    dst.mkdir(parents=True)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for fname, part in zip(names, (items[:split], items[split:])):
        (dst / fname).write_bytes(pack(part))
        weight_map.update({n: fname for n, *_ in part})
    return weight_map


def write_index(dst: Path, weight_map: Any, raw: Optional[bytes] = None) -> None:
    text = raw if raw is not None else json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=1).encode()
    (dst / "model.safetensors.index.json").write_bytes(text)


def index_cases(root: Path, good: Path) -> dict[str, list[str]]:
    entries, data = read_st(good)
    items = tensors(entries, data)
    split = len(items) // 2
    s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    first, second = items[0][0], items[split][0]
    expect: dict[str, list[str]] = {}

    def case(name: str, fragments: list[str]) -> tuple[Path, dict[str, str]]:
        d = root / name
        expect[name] = fragments
        return d, write_sharded(d, items, split)

    d, wm = case("shard_missing", [s2, "does not exist"])
    write_index(d, wm)
    (d / s2).unlink()
    d, wm = case("shard_listed_but_empty", [s2, "0 bytes"])
    write_index(d, wm)
    (d / s2).write_bytes(b"")
    d, wm = case("shard_is_a_folder", [s2, "does not exist"])
    write_index(d, wm)
    (d / s2).unlink()
    (d / s2).mkdir()
    # git keeps no empty folders: without a file inside, a clean clone would lack this "shard".
    (d / s2 / ".keep").write_bytes(b"")
    d, wm = case("tensor_listed_twice", [first, "listed twice"])
    body = json.dumps({"weight_map": wm}, indent=1)
    write_index(d, None, body.replace("{\n", '{\n  "%s": "%s",\n' % (first, s1), 2).replace('{\n  "weight_map"', '{\n "weight_map"').encode())
    d, wm = case("tensor_not_listed", [second, "not in the index weight_map"])
    write_index(d, {k: v for k, v in wm.items() if k != second})
    d, wm = case("tensor_listed_but_absent", ["model.layers.0.mlp.ghost_proj.weight", "that shard has no such tensor"])
    write_index(d, {**wm, "model.layers.0.mlp.ghost_proj.weight": s1})
    d, wm = case("tensor_in_wrong_shard", [first, "index says tensor"])
    write_index(d, {**wm, first: s2})
    d, wm = case("tensor_in_two_shards", [first, "more than one shard"])
    (d / s2).write_bytes(pack(items[split:] + items[:1]))
    write_index(d, wm)
    d, wm = case("index_not_json", ["index is not valid JSON"])
    write_index(d, None, b'{"weight_map": {"a": ')
    d, wm = case("index_without_weight_map", ["no 'weight_map'"])
    write_index(d, None, b'{"metadata": {}}')
    d, wm = case("index_weight_map_empty", ["weight_map is empty"])
    write_index(d, {})
    d, wm = case("index_path_traversal", ["../expert/model.safetensors", "not a file in this folder"])
    write_index(d, {**wm, first: "../expert/model.safetensors"})
    d, wm = case("index_value_not_string", [first, "is not a string"])
    write_index(d, {**wm, first: 1})
    # Which files are the model: a model.safetensors beside an index naming other shards...
    d, wm = case("single_and_index_disagree", ["model.safetensors and model.safetensors.index.json disagree"])
    write_index(d, wm)
    (d / "model.safetensors").write_bytes(pack(items))
    # ... and, without an index, a set of shards with one missing.
    d, wm = case("shards_without_index_incomplete", ["only 1 of the 2 shards"])
    (d / s2).unlink()
    return expect


# --- cross-model and non-finite cases ---------------------------------------------------------------------


def model_cases(root: Path, good: dict[str, Path]) -> list[dict[str, Any]]:
    """Single-file models that replace one role of the good trio."""
    items = {r: tensors(*read_st(good[r] / "model.safetensors")) for r in synth.ROLES}
    cases: list[dict[str, Any]] = []

    def case(name: str, role: str, content: bytes, expect: list[str], args: tuple[str, ...] = (), exit: int = 2) -> None:
        d = root / name
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(content)
        cases.append({"name": name, "path": f"models/{name}", "role": role, "args": list(args), "exit": exit, "expect": expect})

    without = lambda r, n: [t for t in items[r] if t[0] != n]  # noqa: E731
    case("safety_missing_tensor", "safety", pack(without("safety", UP)), [UP, "missing from the safety expert"])
    case("base_missing_measured", "base", pack(without("base", Q)), [Q, "missing from the base model"])
    case("expert_missing_measured", "expert", pack(without("expert", UP)), [UP, "missing from the language expert"])
    reshaped = [(n, d, [s[1], s[0]] if n == "model.layers.0.self_attn.k_proj.weight" else s, b) for n, d, s, b in items["safety"]]
    case("shape_mismatch", "safety", pack(reshaped), ["model.layers.0.self_attn.k_proj.weight", "[4, 8]", "[8, 4]"])
    # The same values widened exactly to F32 (a bf16 is the top half of an f32).
    f32 = [(n, "F32", s, (np.frombuffer(b, "<u2").astype("<u4") << 16).tobytes()) if n == Q else (n, d, s, b) for n, d, s, b in items["base"]]
    case("dtype_mismatch", "base", pack(f32), [Q, "F32", "BF16"])
    three = items["safety"] + [(n.replace("model.layers.1.", "model.layers.2."), d, s, b) for n, d, s, b in items["safety"] if n.startswith("model.layers.1.")]
    case("layer_count_safety", "safety", pack(three), ["different numbers of decoder layers", "3 in the safety expert"])
    one = [t for t in items["base"] if not t[0].startswith("model.layers.1.")]
    case("layer_count_base", "base", pack(one), ["different numbers of decoder layers", "1 in the base"])
    # Non-finite values: measured tensors are caught by the analyze pass, the others by the write pass.
    case("nan_measured_expert", "expert", pack(poke(items["expert"], Q, float("nan"))), [Q, "NaN or Inf"])
    case("inf_measured_base", "base", pack(poke(items["base"], UP, float("inf"))), [UP, "NaN or Inf"])
    case("nan_embedding_expert", "expert", pack(poke(items["expert"], "model.embed_tokens.weight", float("nan"))), ["model.embed_tokens.weight", "NaN or Inf"])
    case("inf_final_norm_safety", "safety", pack(poke(items["safety"], "model.norm.weight", float("-inf"))), ["model.norm.weight", "NaN or Inf"])
    case("nan_lm_head_safety", "safety", pack(poke(items["safety"], "lm_head.weight", float("nan"))), ["lm_head.weight", "NaN or Inf"])
    case("nan_layer_norm_expert", "expert", pack(poke(items["expert"], "model.layers.0.input_layernorm.weight", float("nan"))),
         ["model.layers.0.input_layernorm.weight", "NaN or Inf"], ("--granularity", "module"))
    # Side files are read too: a config.json that is JSON but not an object.
    shutil.copytree(good["expert"], root / "config_not_object")
    (root / "config_not_object" / "config.json").write_text("[1, 2]\n")
    cases.append({"name": "config_not_object", "path": "models/config_not_object", "role": "expert", "args": [], "exit": 2,
                  "expect": ["config.json", "must be a JSON object"]})
    # Side files that exist but are not readable regular files (git keeps links and folders; a FIFO
    # or a device cannot be committed, tests/test_bad_input.py makes those on the fly).
    shutil.copytree(good["expert"], root / "config_dangling_link")
    (root / "config_dangling_link" / "config.json").unlink()
    (root / "config_dangling_link" / "config.json").symlink_to("config-that-was-deleted.json")
    cases.append({"name": "config_dangling_link", "path": "models/config_dangling_link", "role": "expert", "args": [], "exit": 2,
                  "expect": ["config.json", "dangling symbolic link"]})
    shutil.copytree(good["expert"], root / "tokenizer_is_a_folder")
    (root / "tokenizer_is_a_folder" / "tokenizer_config.json").unlink()
    (root / "tokenizer_is_a_folder" / "tokenizer_config.json").mkdir()
    (root / "tokenizer_is_a_folder" / "tokenizer_config.json" / ".keep").write_bytes(b"")
    cases.append({"name": "tokenizer_is_a_folder", "path": "models/tokenizer_is_a_folder", "role": "expert", "args": [], "exit": 2,
                  "expect": ["tokenizer_config.json", "is a folder"]})
    # Narrowing that overflows: finite bf16 values of 1e6 have no float16 (largest 65504).
    case("overflow_to_f16", "expert", pack(poke(items["expert"], "model.norm.weight", 1e6)),
         ["model.norm.weight", "overflow to Inf", "F16"], ("--out-dtype", "f16"))
    case("overflow_measured_to_f16", "expert", pack(poke(items["expert"], UP, -1e6)), [UP, "overflow to Inf", "F16"],
         ("--out-dtype", "f16"))
    # Inputs that merge (exit 0) but must not be taken for more than they are: shards without an
    # index beside other .safetensors files (Mistral's consolidated file, a PEFT adapter).
    d = root / "stray_safetensors"
    d.mkdir()
    split = len(items["expert"]) // 2
    for fname, part in (("model-00001-of-00002.safetensors", items["expert"][:split]), ("model-00002-of-00002.safetensors", items["expert"][split:])):
        (d / fname).write_bytes(pack(part))
    (d / "consolidated.safetensors").write_bytes(pack([("output.weight", "BF16", [2], bf16(np.array([1.0, 2.0])))]))
    (d / "adapter_model.safetensors").write_bytes(pack([("base_model.model.lora_A.weight", "BF16", [2], bf16(np.array([3.0, 4.0])))]))
    for side in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(good["expert"] / side, d / side)
    cases.append({"name": "stray_safetensors", "path": "models/stray_safetensors", "role": "expert", "args": [], "exit": 0,
                  "expect": ["consolidated.safetensors", "adapter_model.safetensors", "ignored"]})
    return cases


def build(out: Path) -> None:
    """Writes the whole corpus into `out` (which must not exist)."""
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        made = synth.make_trio(Path(tmp), CONFIG, dtype="bf16")
        for role, p in made.items():
            shutil.copytree(p, out / "good" / role)
    good = {r: out / "good" / r for r in synth.ROLES}
    cases: list[dict[str, Any]] = []
    (out / "header").mkdir()
    for name, (content, expect) in header_cases(good["expert"] / "model.safetensors").items():
        (out / "header" / f"{name}.safetensors").write_bytes(content)
        cases.append({"name": f"header_{name}", "path": f"header/{name}.safetensors", "role": "expert", "args": [], "exit": 2, "expect": expect})
    for name, expect in index_cases(out / "index", good["expert"] / "model.safetensors").items():
        cases.append({"name": f"index_{name}", "path": f"index/{name}", "role": "expert", "args": [], "exit": 2, "expect": expect})
    cases += model_cases(out / "models", good)
    (out / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if "__pycache__" not in p.parts and p.name != Path(__file__).name}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "corpus"
        build(fresh)
        if "--check" in sys.argv:
            mine = {k: v for k, v in digest(HERE).items() if not k.endswith(".py")}
            if mine != digest(fresh):
                print("tests/hostile differs from what make_corpus.py writes; run it again", file=sys.stderr)
                return 1
            return 0
        for child in ("good", "header", "index", "models", "cases.json"):
            target = HERE / child
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(str(fresh / child), str(target))
    return 0


if __name__ == "__main__":
    sys.exit(main())

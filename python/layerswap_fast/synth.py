"""Synthetic Hugging Face model trios (base, safety expert, language expert) with planted structure,
for ``layerswap-fast demo``, the tests and the benchmarks. No hub, no torch: numpy and the safetensors
format written by hand.

The planted structure: in the layers listed as ``safety_layers`` the safety expert's task vector is
large, in ``expert_layers`` the language expert's is, elsewhere both are small. So the method must
send the former to the safety expert and keep the latter from the language expert.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

ROLES = ("base", "safety", "expert")
_BLOCK = 1 << 22  # elements generated at a time

#: Llama-shaped configurations by name (real Llama / Qwen shapes for the larger ones).
SIZES: dict[str, dict] = {
    "tiny": dict(n_layers=4, hidden=64, intermediate=160, heads=4, kv_heads=2, vocab=320),
    "small": dict(n_layers=8, hidden=256, intermediate=704, heads=8, kv_heads=4, vocab=2048),
    "0.5b": dict(n_layers=24, hidden=896, intermediate=4864, heads=14, kv_heads=2, vocab=151936, tie_embeddings=True),
    "1b": dict(n_layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256, tie_embeddings=True),
    "3b": dict(n_layers=28, hidden=3072, intermediate=8192, heads=24, kv_heads=8, vocab=128256, tie_embeddings=True),
    # Llama-2-7B and Llama-3-70B shapes (benchmarks: 7b is 13.5 GB per model in bf16; 70b, 141 GB, is
    # only ever laid out as sparse files by benches/generate.py --sparse).
    "7b": dict(n_layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "70b": dict(n_layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256),
}


@dataclass
class LlamaConfig:
    """Shape of a Llama-style decoder (Qwen2 biases and Qwen3 q/k norms optional)."""

    n_layers: int = 4
    hidden: int = 64
    intermediate: int = 160
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 320
    tie_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    architecture: str = "LlamaForCausalLM"

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in a Hugging Face-like order."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            out.append((p + "input_layernorm.weight", (self.hidden,)))
            for proj, rows in (("q_proj", self.hidden), ("k_proj", kv), ("v_proj", kv)):
                out.append((p + f"self_attn.{proj}.weight", (rows, self.hidden)))
                if self.attention_bias:
                    out.append((p + f"self_attn.{proj}.bias", (rows,)))
            out.append((p + "self_attn.o_proj.weight", (self.hidden, self.hidden)))
            if self.qk_norm:
                out.append((p + "self_attn.q_norm.weight", (head_dim,)))
                out.append((p + "self_attn.k_norm.weight", (head_dim,)))
            out.append((p + "post_attention_layernorm.weight", (self.hidden,)))
            out.append((p + "mlp.gate_proj.weight", (self.intermediate, self.hidden)))
            out.append((p + "mlp.up_proj.weight", (self.intermediate, self.hidden)))
            out.append((p + "mlp.down_proj.weight", (self.hidden, self.intermediate)))
        out.append(("model.norm.weight", (self.hidden,)))
        if not self.tie_embeddings:
            out.append(("lm_head.weight", (self.vocab, self.hidden)))
        return out

    def config_json(self, dtype: str) -> dict:
        return {
            "architectures": [self.architecture],
            "model_type": {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}.get(self.architecture, "llama"),
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64"}[dtype],
        }

    def param_count(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.tensors())


# --- safetensors writing -----------------------------------------------------------------------------

_ST_DTYPE = {"bf16": "BF16", "f16": "F16", "f32": "F32", "f64": "F64"}
_SIZE = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8}


def encode(values: np.ndarray, dtype: str) -> bytes:
    """float32/float64 values to little-endian bytes of ``dtype`` (bf16: round to nearest even)."""
    if dtype == "bf16":
        u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        return rounded.astype("<u2").tobytes()
    return np.ascontiguousarray(values, dtype={"f16": "<f2", "f32": "<f4", "f64": "<f8"}[dtype]).tobytes()


def header_bytes(specs: Sequence[tuple[str, tuple[int, ...]]], dtype: str) -> bytes:
    """The header prefix (length + JSON padded to 8 bytes) for tensors stored contiguously in order."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in specs:
        n = int(np.prod(shape, dtype=np.int64)) * _SIZE[dtype]
        entries[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def split_shards(specs: Sequence[tuple[str, tuple[int, ...]]], dtype: str, shard_bytes: Optional[int]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split into shards of at most ``shard_bytes`` (one shard if None)."""
    if not shard_bytes:
        return [list(specs)]
    shards: list[list] = [[]]
    size = 0
    for name, shape in specs:
        n = int(np.prod(shape)) * _SIZE[dtype]
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


# --- planted structure ------------------------------------------------------------------------------


@dataclass
class Planting:
    """Relative task-vector scales per role and layer: ``scale[role](name)`` times the base's std."""

    safety_layers: Sequence[int] = ()
    expert_layers: Sequence[int] = ()
    strong: float = 0.30
    weak: float = 0.03
    outside: float = 0.02
    seed: int = 0
    # Layers where safety is strong in attention only (module granularity structure).
    safety_attention_layers: Sequence[int] = field(default_factory=tuple)

    def scale(self, role: str, name: str) -> float:
        if role == "base":
            return 0.0
        if not name.startswith("model.layers."):
            return self.outside
        layer = int(name.split(".")[2])
        strong = self.safety_layers if role == "safety" else self.expert_layers
        if layer in strong:
            return self.strong
        if role == "safety" and layer in self.safety_attention_layers and ".self_attn." in name:
            return self.strong
        return self.weak


def _rng(seed: int, role: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, ROLES.index(role), index])


def _values(name: str, shape: tuple[int, ...], index: int, planting: Planting) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Blocks of (base, safety, expert) float32 values for one tensor."""
    n = int(np.prod(shape))
    is_norm = len(shape) == 1 and "bias" not in name
    gens = {r: _rng(planting.seed, r, index) for r in ROLES}
    std = 0.02
    for lo in range(0, n, _BLOCK):
        k = min(_BLOCK, n - lo)
        base = gens["base"].standard_normal(k, dtype=np.float32) * np.float32(std)
        if is_norm:
            base += np.float32(1.0)
        out = [base]
        for role in ("safety", "expert"):
            s = planting.scale(role, name)
            delta = gens[role].standard_normal(k, dtype=np.float32) * np.float32(std * s)
            out.append(base + delta)
        yield out[0], out[1], out[2]


def make_trio(
    root: Path | str,
    config: Optional[LlamaConfig] = None,
    *,
    dtype: str = "bf16",
    planting: Optional[Planting] = None,
    shard_bytes: Optional[dict[str, Optional[int]]] = None,
    single_file: bool = False,
    roles: Sequence[str] = ROLES,
) -> dict[str, Path]:
    """Writes ``root/base``, ``root/safety`` and ``root/expert`` as Hugging Face folders.

    Args:
        config: the decoder shape (default: a 4-layer toy).
        dtype: bf16, f16, f32 or f64.
        planting: where each expert's task vector is strong (default: safety in the top half,
            language expert in the bottom half).
        shard_bytes: per role, maximum shard size (None: one ``model.safetensors``); roles may differ.
        single_file: also write nothing but the .safetensors file (no config, no tokenizer).
        roles: which of base, safety, expert to write (e.g. only "expert" for another language
            expert of a base and safety written before: same seed and safety planting give the same
            base and safety).

    Returns:
        ``{"base": path, "safety": path, "expert": path}``.
    """
    config = config or LlamaConfig()
    if planting is None:
        half = config.n_layers // 2
        planting = Planting(safety_layers=range(half, config.n_layers), expert_layers=range(0, half))
    root = Path(root)
    specs = config.tensors()
    paths = {r: root / r for r in ROLES}
    files = {}
    layouts = {}
    for role in roles:
        paths[role].mkdir(parents=True, exist_ok=True)
        shards = split_shards(specs, dtype, (shard_bytes or {}).get(role))
        layouts[role] = shards
        names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        handles = []
        for fname, shard in zip(names, shards):
            fh = open(paths[role] / fname, "wb")
            fh.write(header_bytes(shard, dtype))
            handles.append(fh)
        where = {name: handles[i] for i, shard in enumerate(shards) for name, _ in shard}
        files[role] = (handles, where, names)
        if len(shards) > 1:
            weight_map = {name: names[i] for i, shard in enumerate(shards) for name, _ in shard}
            total = sum(int(np.prod(s)) * _SIZE[dtype] for _, s in specs)
            (paths[role] / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
    try:
        # Tensors must be written in each shard's own order; the per-role shard split keeps spec order.
        for index, (name, shape) in enumerate(specs):
            for b, s, m in _values(name, shape, index, planting):
                for role, v in zip(ROLES, (b, s, m)):
                    if role in files:
                        files[role][1][name].write(encode(v, dtype))
    finally:
        for role in files:
            for fh in files[role][0]:
                fh.close()
    if not single_file:
        for role in roles:
            (paths[role] / "config.json").write_text(json.dumps(config.config_json(dtype), indent=2))
            (paths[role] / "generation_config.json").write_text(json.dumps({"do_sample": False, "role": role}))
            (paths[role] / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "layerswap_demo_role": role}))
            vocab = {f"<t{i}>": i for i in range(min(config.vocab, 64))}
            (paths[role] / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []}, "layerswap_demo_role": role}))
    return {r: paths[r] for r in roles}

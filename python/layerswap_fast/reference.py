"""A plain torch implementation of the method (README, "How it works", §1–§6), written to check the engine, not to be fast.

It is a second, independent implementation: it never imports ``layerswap_fast._core`` and shares no
code with the engine. It finds units from tensor names with its own patterns (Llama naming, the method
§1), loads every tensor whole with safetensors' torch API, and writes the formulas out again (§2–§5).

Two numerics, as in the engine:

- ``exact``: norms in float64 from the exact values; blends in float32 (float64 when the model or
  the output is F64), rounded once to the output dtype.
- ``official``: the authors' scripts (``layer_swap.py`` / ``module_swap.py``), operation for
  operation: every checkpoint loaded in bf16, ``X - B`` in bf16, ``torch.norm`` of a bf16 tensor (a
  bf16 scalar), the division in float64 on Python floats, blends ``alpha * S + (1 - alpha) * M`` on
  bf16 tensors. Whatever torch does for those operations on this machine is, by definition, what the
  authors' code does here.

torch is optional (``pip install 'layerswap-fast[check]'``); it is imported on first use.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch

PathLike = Union[str, Path]
#: A layout for the reference: None (Llama naming), a layout file or dict, or a family's :class:`Patterns`.
LayoutArg = Union[None, PathLike, dict[str, Any], "Patterns"]

INSTALL_HINT = "pip install 'layerswap-fast[check]'"

#: the method §1 for Llama naming: a decoder layer's tensors, and the measured ones inside it.
LAYER_PATTERN = r"^model\.layers\.(\d+)\."
ATTENTION_PATTERN = r"^self_attn\."
MLP_PATTERN = r"^mlp\."
TARGET_PATTERN = r"^(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.(weight|bias)$"
#: Tensors outside the layers with a vocabulary axis (for ``vocab_from="expert"``).
VOCAB_PATTERN = r"^(model\.embed_tokens|lm_head)\.weight$"

#: Below this base norm the relative change is not divided (the method §2).
BASE_NORM_EPS = 1e-8
#: Added to the sum of scores before normalising (the method §4).
SUM_EPS = 1e-8

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _torch() -> Any:
    """Imports torch, or explains how to get it."""
    try:
        import torch
        from safetensors import safe_open  # noqa: F401  (checked here so the hint covers both)
    except ImportError as e:
        raise ImportError(f"the reference implementation needs torch and safetensors ({e}); install them with: {INSTALL_HINT}") from None
    return torch


# --- reading models -------------------------------------------------------------------------------


def shard_files(model: PathLike) -> list[Path]:
    """The safetensors files of a model: a single file, a folder's ``model.safetensors``, the shards
    its index names (each once, in name order), or without either the files named like Hugging Face
    shards (other ``.safetensors`` files in the folder, an adapter or a consolidated file, are not the
    model)."""
    p = Path(model)
    if p.is_file():
        return [p]
    index = p / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [p / f for f in sorted(set(weight_map.values()))]
    if (p / SINGLE_FILE).is_file():
        return [p / SINGLE_FILE]
    # Without an index: the Hugging Face shard names only (model-00001-of-00003.safetensors).
    shards = sorted(f for f in p.glob("model-*-of-*.safetensors") if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f.name))
    if shards:
        return shards
    raise FileNotFoundError(f"{p}: no {SINGLE_FILE}, {INDEX_FILE} or model-NNNNN-of-NNNNN.safetensors here")


class Checkpoint:
    """One model opened with ``safetensors.safe_open(framework="pt")``: tensors are read whole, on
    demand, so that the reference holds a few tensors at a time rather than three models."""

    def __init__(self, model: PathLike) -> None:
        from safetensors import safe_open

        _torch()
        self.path = Path(model)
        self._where: dict[str, Any] = {}
        self._handles = []
        for f in shard_files(model):
            h = safe_open(str(f), framework="pt")
            self._handles.append(h)
            for name in h.keys():
                self._where[name] = h

    def names(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> "torch.Tensor":
        """The whole tensor, in its stored dtype."""
        return self._where[name].get_tensor(name)

    def declared_dtype(self, name: str) -> "torch.dtype":
        """The stored dtype of ``name`` (read from the header)."""
        return torch_dtype(self._where[name].get_slice(name).get_dtype())

    stored_dtype = declared_dtype

    def updated(self, name: str) -> bool:
        """False: a full model's tensors are stored bytes (see :class:`AdapterCheckpoint`)."""
        return False

    def diff(self, name: str, b64: "torch.Tensor") -> "torch.Tensor":
        """X − B in float64."""
        return self.get(name).to(_torch().float64) - b64


# --- PEFT LoRA adapters (read here from PEFT's files, independently of the engine) -------------------------
#
# PEFT's format: ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
# ``alpha_pattern``, ``fan_in_fan_out``, ``modules_to_save``, ``bias``) and ``adapter_model.safetensors``
# whose names are the model's module names under ``base_model.model.``: ``<module>.lora_A.weight`` (r x in),
# ``<module>.lora_B.weight`` (out x r), for embeddings ``<module>.lora_embedding_A`` (r x vocab) and
# ``lora_embedding_B`` (dim x r), and any other tensor saved whole (``modules_to_save``, trained biases,
# an embedding saved as ``<module>.base_layer.weight``). PEFT's update of a linear layer is
# ``scale * (B @ A)``, transposed for embeddings and ``fan_in_fan_out`` (Conv1D) layers, with
# ``scale = alpha / r`` or ``alpha / sqrt(r)`` (rsLoRA); ``rank_pattern`` / ``alpha_pattern`` keys match a
# module name as ``re.match(rf"(.*\.)?({key})$", name)``, the first key in file order winning.

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def is_adapter(path: PathLike) -> bool:
    """True when ``path`` is a PEFT adapter folder (it has ``adapter_config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key (in file order) whose regex matches the module name
    as a whole dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraUpdate:
    """One base tensor updated by an adapter: ``scale * P @ Q`` with P (rows x r) and Q (r x cols) in the
    base tensor's orientation (P = lora_B, Q = lora_A; transposed: P = lora_Aᵀ, Q = lora_Bᵀ)."""

    a: str  # names in the adapter file
    b: str
    rank: int
    alpha: float
    scale: float
    transposed: bool


def lora_delta(p: "torch.Tensor", q: "torch.Tensor", scale: float) -> "torch.Tensor":
    """``scale * (P @ Q)`` in float64 with a fixed order of operations: for every element, the rank
    products ``P[i,k] * Q[k,j]`` (exact when the factors are stored in 32 bits or less) are summed in
    k order starting from 0, and the sum is then multiplied by ``scale``. (A BLAS matmul sums in
    another order, which moves the float64 value by an ulp or so and can move its final rounding.)"""
    torch = _torch()
    p, q = p.to(torch.float64), q.to(torch.float64)
    acc = torch.zeros((p.shape[0], q.shape[1]), dtype=torch.float64)
    for k in range(p.shape[1]):
        acc += p[:, k : k + 1] * q[k : k + 1, :]
    return scale * acc


class AdapterCheckpoint:
    """A PEFT LoRA adapter over the base model, presented like a :class:`Checkpoint` of the model it
    stands for (B + ΔW): the base model's tensors, plus tensors only the adapter saves. ``get`` returns
    B + ΔW in float64 for an updated tensor (B + ``lora_delta``, in that order), the saved tensor for
    one saved whole, else the base tensor."""

    def __init__(self, adapter: PathLike, base: Checkpoint) -> None:
        from safetensors import safe_open

        self.path = Path(adapter)
        self.base = base
        cfg = json.loads((self.path / ADAPTER_CONFIG).read_text())
        if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("lora_bias"):
            raise ValueError(f"{self.path / ADAPTER_CONFIG}: the reference reads plain LoRA adapters only "
                             f"(peft_type {cfg.get('peft_type')!r}, use_dora {cfg.get('use_dora')!r})")
        self.config = cfg
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha") if cfg.get("lora_alpha") is not None else 8)
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        self._file = safe_open(str(self.path / ADAPTER_WEIGHTS), framework="pt")
        factors: dict[str, dict[str, str]] = {}
        self.saved: dict[str, str] = {}  # base tensor name -> name in the file
        for key in self._file.keys():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", name)
            if m:
                factors.setdefault(m.group(1), {})[m.group(2)] = key
            else:
                # PEFT keeps a wrapped layer's own weights under base_layer, and (older versions) a
                # modules_to_save copy under modules_to_save.<adapter name>.
                name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name.replace(".base_layer.", "."))
                self.saved[name] = key
        self.updates: dict[str, LoraUpdate] = {}
        for module, f in factors.items():
            embedding = "lora_embedding_A" in f
            a, b = (f["lora_embedding_A"], f["lora_embedding_B"]) if embedding else (f["lora_A.weight"], f["lora_B.weight"])
            rank = int(_pattern_value(rank_pattern, module, r))
            mod_alpha = float(_pattern_value(alpha_pattern, module, alpha))
            scale = mod_alpha / math.sqrt(rank) if cfg.get("use_rslora") else mod_alpha / rank
            self.updates[f"{module}.weight"] = LoraUpdate(a, b, rank, mod_alpha, scale, embedding or bool(cfg.get("fan_in_fan_out")))
        self._names = sorted(set(base.names()) | set(self.saved))

    def names(self) -> list[str]:
        """Tensor names of B + ΔW, sorted."""
        return self._names

    def raw(self, key: str) -> "torch.Tensor":
        """A tensor of the adapter file by its saved name (a factor, say), as stored."""
        return self._file.get_tensor(key)

    def raw_info(self, key: str) -> tuple[str, list[int]]:
        """(safetensors dtype name, shape) of a tensor of the adapter file, from its header."""
        sl = self._file.get_slice(key)
        return sl.get_dtype(), list(sl.get_shape())

    def __contains__(self, name: str) -> bool:
        return name in self.base or name in self.saved

    def _stored(self, name: str) -> "torch.Tensor":
        return self._file.get_tensor(self.saved[name]) if name in self.saved else self.base.get(name)

    def declared_dtype(self, name: str) -> "torch.dtype":
        """The dtype the model B + ΔW has for ``name``: the base model's (a merge writes that), or the
        saved tensor's for a tensor only the adapter has."""
        if name in self.base:
            return self.base.declared_dtype(name)
        return torch_dtype(self._file.get_slice(self.saved[name]).get_dtype())

    def stored_dtype(self, name: str) -> "torch.dtype":
        """The dtype of the stored tensor ``name`` comes from: saved whole by the adapter, else B's."""
        if name in self.saved:
            return torch_dtype(self._file.get_slice(self.saved[name]).get_dtype())
        return self.base.declared_dtype(name)

    def updated(self, name: str) -> bool:
        """True when ``name`` is B + ΔW (not stored bytes)."""
        return name in self.updates

    def delta(self, name: str) -> "torch.Tensor":
        """ΔW of an updated tensor, float64, in the base tensor's shape."""
        u = self.updates[name]
        a, b = self._file.get_tensor(u.a), self._file.get_tensor(u.b)
        p, q = (a.T, b.T) if u.transposed else (b, a)
        return lora_delta(p, q, u.scale)

    def get(self, name: str) -> "torch.Tensor":
        """The tensor of B + ΔW: float64 when updated, else as stored."""
        if name not in self.updates:
            return self._stored(name)
        torch = _torch()
        return self.delta(name) + self._stored(name).to(torch.float64)

    def diff(self, name: str, b64: "torch.Tensor") -> "torch.Tensor":
        """X − B in float64 for the statistics: ΔW itself for an updated tensor (plus the saved tensor's
        own difference if the adapter saved it whole too), saved − B, or zeros."""
        torch = _torch()
        d = self._stored(name).to(torch.float64) - b64 if name in self.saved else torch.zeros_like(b64)
        return d + self.delta(name) if name in self.updates else d


def open_model(model: PathLike, base: Optional[Checkpoint]) -> Union[Checkpoint, AdapterCheckpoint]:
    """A model, or an adapter folder read over ``base``."""
    if is_adapter(model):
        if base is None:
            raise ValueError(f"{model}: a LoRA adapter needs its base model")
        return AdapterCheckpoint(model, base)
    return Checkpoint(model)


# --- units (the method §1, §3, §5) -------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """Where a tensor sits: ``layer`` is None outside the decoder layers (``vocab`` marks the
    embeddings and lm_head there); ``part`` is ``attention``, ``mlp``, ``norm`` (the layer's own
    tensors) or ``unassigned``; ``target`` if it is measured."""

    layer: Optional[int]
    part: Optional[str]
    target: bool
    vocab: bool = False


@dataclass(frozen=True)
class Patterns:
    """Name patterns that say where tensors belong. The defaults are the method's Llama naming, written
    here independently of the engine; another family's patterns can be given as data, in the engine's
    layout format (``layer``, ``attention``, ``mlp``, ``targets``, optional ``norms``, ``exclude``,
    ``vocab``). ``layer`` is matched at the start of the name; the others are searched, the way the
    engine's regexes are (they carry their own ``^`` anchors)."""

    layer: str = LAYER_PATTERN
    attention: str = ATTENTION_PATTERN
    mlp: str = MLP_PATTERN
    targets: str = TARGET_PATTERN
    norms: Optional[str] = None
    exclude: Optional[str] = None
    vocab: Optional[str] = VOCAB_PATTERN

    @classmethod
    def from_layout(cls, layout: LayoutArg) -> "Patterns":
        """Patterns from a layout definition: a dict, a JSON or TOML file, or None for the defaults."""
        if layout is None:
            return cls()
        if isinstance(layout, Patterns):
            return layout
        if isinstance(layout, dict):
            d = layout
        else:
            p = Path(layout)
            if p.suffix.lower() == ".toml":
                from layerswap_fast.options import toml  # pure Python, no engine

                d = toml().loads(p.read_text())
            else:
                d = json.loads(p.read_text())
        return cls(d["layer"], d["attention"], d["mlp"], d["targets"], d.get("norms"), d.get("exclude"), d.get("vocab"))

    def place(self, name: str) -> Place:
        """Classifies one tensor name."""
        m = re.match(self.layer, name)
        if not m or (self.exclude and re.search(self.exclude, name)):
            return Place(None, None, False, bool(self.vocab and re.search(self.vocab, name)))
        rest = name[m.end() :]
        if re.search(self.attention, rest):
            part = "attention"
        elif re.search(self.mlp, rest):
            part = "mlp"
        elif self.norms is None or re.search(self.norms, rest):
            part = "norm"
        else:
            part = "unassigned"
        target = part in ("attention", "mlp") and re.search(self.targets, rest) is not None
        return Place(int(m.group(1)), part, target)


# --- families, written from the Hugging Face modeling code (never from the engine's layout files) ------------
#
# Each family is described the way its modeling code builds a decoder (or encoder) layer: where the
# layers live, the name of the attention and MLP submodules, the linear layers inside them (the measured
# tensors, weight and bias), the layer's own norms, and the vocabulary tensors outside the layers.


@dataclass(frozen=True)
class Family:
    """One model family as its modeling code names things."""

    layer_prefixes: tuple[str, ...]  # e.g. "model.layers." (the layer index follows, then ".")
    attention: tuple[str, ...]  # attention submodule paths inside a layer
    attention_linears: tuple[str, ...]  # measured linears, relative to the layer
    mlp: tuple[str, ...]
    mlp_linears: tuple[str, ...]  # may use "{e}" for an expert index
    norms: tuple[str, ...]  # the layer's own norm modules
    vocab: tuple[str, ...]  # full tensor names (may use "{p}" for an optional prefix) with a vocabulary axis

    def patterns(self) -> "Patterns":
        esc = lambda xs: "|".join(re.escape(x).replace(r"\{e\}", r"\d+") for x in xs)  # noqa: E731
        layer = "^(?:" + esc(self.layer_prefixes) + r")(\d+)\."
        targets = r"^(?:" + esc(self.attention_linears + self.mlp_linears) + r")\.(?:weight|bias)$"
        vocab = "^(?:" + esc(self.vocab) + ")$"
        return Patterns(layer, f"^(?:{esc(self.attention)})\\.", f"^(?:{esc(self.mlp)})\\.", targets,
                        f"^(?:{esc(self.norms)})\\.", None, vocab)


def _prefixed(names: tuple[str, ...], prefixes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p + n for p in prefixes for n in names)


_QKVO = tuple(f"self_attn.{x}_proj" for x in "qkvo")
_GATE_UP_DOWN = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
_MM = ("model.", "language_model.model.", "model.language_model.", "model.text_model.")
_GEMMA = ("model.", "language_model.model.", "model.language_model.")

#: modeling_llama / mistral / qwen2 / qwen3 / cohere / granite: LlamaDecoderLayer and its relatives.
FAMILIES: dict[str, Family] = {
    "llama": Family(("model.layers.",), ("self_attn",), _QKVO, ("mlp",), _GATE_UP_DOWN, _LLAMA_NORMS,
                    ("model.embed_tokens.weight", "lm_head.weight")),
    # modeling_gemma / gemma2 / gemma3: sandwich norms around the MLP; Gemma 3 nests the text model.
    "gemma": Family(tuple(p + "layers." for p in _GEMMA), ("self_attn",), _QKVO, ("mlp",), _GATE_UP_DOWN,
                    _LLAMA_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
                    _prefixed(("embed_tokens.weight",), _GEMMA) + ("lm_head.weight", "language_model.lm_head.weight")),
    # modeling_mixtral / phimoe: MixtralSparseMoeBlock with its router "gate" and experts.N.w1/w2/w3.
    "mixtral": Family(("model.layers.",), ("self_attn",), _QKVO, ("block_sparse_moe",),
                      ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w2",
                       "block_sparse_moe.experts.{e}.w3"), _LLAMA_NORMS, ("model.embed_tokens.weight", "lm_head.weight")),
    # modeling_qwen2_moe / qwen3_moe / olmoe: router mlp.gate, experts.N.*, shared expert and its gate.
    "qwen_moe": Family(("model.layers.",), ("self_attn",), _QKVO, ("mlp",),
                       _GATE_UP_DOWN + ("mlp.gate", "mlp.shared_expert_gate")
                       + tuple(f"mlp.experts.{{e}}.{x}_proj" for x in ("gate", "up", "down"))
                       + tuple(f"mlp.shared_expert.{x}_proj" for x in ("gate", "up", "down")),
                       _LLAMA_NORMS, ("model.embed_tokens.weight", "lm_head.weight")),
    # modeling_phi: PhiDecoderLayer, parallel attention/MLP under one input_layernorm; lm_head has a bias.
    "phi": Family(("model.layers.",), ("self_attn",), ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
                  ("mlp",), ("mlp.fc1", "mlp.fc2"), ("input_layernorm",), ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias")),
    # modeling_phi3: fused qkv_proj and gate_up_proj.
    "phi3": Family(("model.layers.",), ("self_attn",), ("self_attn.qkv_proj", "self_attn.o_proj"), ("mlp",),
                   ("mlp.gate_up_proj", "mlp.down_proj"), _LLAMA_NORMS, ("model.embed_tokens.weight", "lm_head.weight")),
    # modeling_gpt2: GPT2Block with Conv1D c_attn/c_proj and c_fc/c_proj, ln_1/ln_2.
    "gpt2": Family(("transformer.h.", "h."), ("attn",), ("attn.c_attn", "attn.c_proj"), ("mlp",), ("mlp.c_fc", "mlp.c_proj"),
                   ("ln_1", "ln_2"), ("transformer.wte.weight", "wte.weight", "lm_head.weight")),
    # modeling_gpt_neox: GPTNeoXLayer.
    "gpt_neox": Family(("gpt_neox.layers.",), ("attention",), ("attention.query_key_value", "attention.dense"), ("mlp",),
                       ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), _LLAMA_NORMS, ("gpt_neox.embed_in.weight", "embed_out.weight")),
    # modeling_falcon / bloom: self_attention.query_key_value|dense, mlp.dense_h_to_4h|dense_4h_to_h.
    "falcon": Family(("transformer.h.", "h."), ("self_attention",), ("self_attention.query_key_value", "self_attention.dense"),
                     ("mlp",), ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), _LLAMA_NORMS + ("ln_attn", "ln_mlp"),
                     ("transformer.word_embeddings.weight", "word_embeddings.weight", "lm_head.weight")),
    # modeling_bert / roberta / xlm_roberta: BertLayer = attention (self + output.dense), intermediate, output.
    "bert": Family(("encoder.layer.", "bert.encoder.layer.", "roberta.encoder.layer."), ("attention.self", "attention.output.dense"),
                   ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
                   ("intermediate.dense", "output.dense"), ("intermediate.dense", "output.dense"),
                   ("attention.output.LayerNorm", "output.LayerNorm"),
                   ("embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight", "roberta.embeddings.word_embeddings.weight",
                    "cls.predictions.bias", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
                    "lm_head.bias", "lm_head.decoder.weight", "lm_head.decoder.bias")),
    # modeling_distilbert: TransformerBlock with attention.{q,k,v,out}_lin and ffn.lin1/lin2.
    "distilbert": Family(("transformer.layer.", "distilbert.transformer.layer."), ("attention",),
                         tuple(f"attention.{x}_lin" for x in ("q", "k", "v", "out")), ("ffn",), ("ffn.lin1", "ffn.lin2"),
                         ("sa_layer_norm", "output_layer_norm"),
                         ("embeddings.word_embeddings.weight", "distilbert.embeddings.word_embeddings.weight", "vocab_projector.weight",
                          "vocab_projector.bias")),
    # modeling_llava / llava_next / mistral3 / qwen2_vl / idefics3: a Llama-like text decoder inside.
    "multimodal": Family(tuple(p + "layers." for p in _MM), ("self_attn",), _QKVO, ("mlp",), _GATE_UP_DOWN, _LLAMA_NORMS,
                         _prefixed(("embed_tokens.weight",), _MM) + ("lm_head.weight", "language_model.lm_head.weight")),
}


def family_patterns(name: str) -> "Patterns":
    """The patterns of a family of :data:`FAMILIES` (the layout name a merge report states).

    Raises:
        KeyError: the reference has no table for this family.
    """
    if name not in FAMILIES:
        raise KeyError(f"the reference knows no family {name!r} (it knows {', '.join(sorted(FAMILIES))}); pass the layout file")
    return FAMILIES[name].patterns()


def unit_keys(n_layers: int, granularity: str) -> list[tuple[int, Optional[str]]]:
    """Units in report order: ``(layer, None)`` per layer, or ``(layer, "attention")`` then
    ``(layer, "mlp")`` per layer."""
    if granularity == "layer":
        return [(i, None) for i in range(n_layers)]
    return [(i, part) for i in range(n_layers) for part in ("attention", "mlp")]


# --- the plan (the method §2–§4) -----------------------------------------------------------------------


@dataclass
class RefUnit:
    """One unit's scores and decision, as the reference computes them. ``alpha`` is the unit's own
    blend weight when it was given one (None: the plan's α); ``source`` says who decided it."""

    layer: int
    part: Optional[str]
    score_safety: float
    score_expert: float
    p_safety: float
    p_expert: float
    d: float
    decision: str
    alpha: Optional[float] = None
    source: str = "measured"


@dataclass
class RefTensorNorms:
    """The three norms of one measured tensor: ‖B‖, ‖S − B‖, ‖M − B‖, and r_S, r_M."""

    name: str
    base: float
    safety: float
    expert: float
    r_safety: float
    r_expert: float


@dataclass
class RefPlan:
    """The reference's plan: units in report order plus the per-tensor norms behind them."""

    granularity: str
    numerics: str
    tau: float
    alpha: float
    n_layers: int
    units: list[RefUnit]
    norms: list[RefTensorNorms] = field(default_factory=list)

    def unit(self, layer: int, part: Optional[str]) -> RefUnit:
        """One unit."""
        for u in self.units:
            if u.layer == layer and u.part == part:
                return u
        raise KeyError((layer, part))

    def decision_of(self, layer: int, part: Optional[str]) -> str:
        """The decision of one unit."""
        return self.unit(layer, part).decision

    def with_decisions(self, decided: dict[tuple[int, Optional[str]], tuple[str, Optional[float], str]]) -> "RefPlan":
        """A copy whose units ``(layer, part)`` in ``decided`` take the given ``(decision, alpha,
        source)`` instead of the measured rule's (overrides, bands, a decisions file)."""
        units = []
        for u in self.units:
            if (u.layer, u.part) in decided:
                decision, alpha, source = decided[(u.layer, u.part)]
                u = RefUnit(u.layer, u.part, u.score_safety, u.score_expert, u.p_safety, u.p_expert, u.d, decision,
                            alpha if decision == "blend" else None, source)
            units.append(u)
        return RefPlan(self.granularity, self.numerics, self.tau, self.alpha, self.n_layers, units, self.norms)

    def alpha_of(self, layer: Optional[int], part: Optional[str]) -> float:
        """The safety expert's weight for a blend of the unit (its own α, else the plan's); the plan's
        α outside the units."""
        if layer is None:
            return self.alpha
        if self.granularity == "layer":
            u = self.unit(layer, None)  # the layer's norms go with it, α included
        elif part in ("attention", "mlp"):
            u = self.unit(layer, part)
        else:
            return self.alpha  # a layer's own norms in module granularity follow the norms policy
        return self.alpha if u.alpha is None else u.alpha


def _norm(t: "torch.Tensor", numerics: str) -> float:
    """‖t‖_F as the numerics see it. exact: float64 from exact values. official: ``torch.norm`` of
    the bf16 tensor, a bf16 scalar, turned into a Python float by ``.item()`` as the authors do."""
    torch = _torch()
    if numerics == "official":
        return torch.norm(t).item()
    return torch.linalg.vector_norm(t.to(torch.float64)).item()


def _as_numerics(t: "torch.Tensor", numerics: str) -> "torch.Tensor":
    """The tensor as the numerics load it: bf16 in official mode (``torch_dtype=torch.bfloat16``)."""
    torch = _torch()
    return t.to(torch.bfloat16) if numerics == "official" else t


def decide(a_s: list[float], a_m: list[float], tau: float) -> list[tuple[float, float, float, str]]:
    """the method §4: p_X = A_X / (Σ A_X + 1e-8), d = p_S − p_M, thresholded at ±τ (|d| ≤ τ blends)."""
    sum_s = sum(a_s) + SUM_EPS
    sum_m = sum(a_m) + SUM_EPS
    out = []
    for s, m in zip(a_s, a_m):
        ps, pm = s / sum_s, m / sum_m
        d = ps - pm
        out.append((ps, pm, d, "safety" if d > tau else "expert" if d < -tau else "blend"))
    return out


def compute_plan(
    base: PathLike,
    safety: PathLike,
    expert: PathLike,
    *,
    granularity: str = "layer",
    tau: float = 0.001,
    alpha: float = 0.5,
    numerics: str = "exact",
    layout: LayoutArg = None,
) -> RefPlan:
    """Scores and decisions of every unit (the method §1–§4), tensor by tensor.

    Args:
        base, safety, expert: model folders or ``.safetensors`` files of B, S and M; S and M may be
            PEFT LoRA adapter folders over B (exact numerics only), whose X − B is ΔW from the factors.
        granularity: ``layer`` or ``module``.
        tau, alpha: the threshold and the blend weight (alpha is only recorded here).
        numerics: ``exact`` or ``official``.
        layout: a layout definition (dict or JSON/TOML file) whose patterns replace the Llama naming.

    Returns:
        The :class:`RefPlan`.
    """
    if granularity not in ("layer", "module") or numerics not in ("exact", "official"):
        raise ValueError(f"granularity must be layer|module and numerics exact|official; got {granularity!r}, {numerics!r}")
    patterns = Patterns.from_layout(layout)
    B = Checkpoint(base)
    S, M = open_model(safety, B), open_model(expert, B)
    lora = any(isinstance(x, AdapterCheckpoint) for x in (S, M))
    if lora and numerics == "official":
        raise ValueError("a LoRA adapter expert has no official numerics (the authors' scripts take full models); use exact")
    # (name, layer, part) of every measured tensor: a measured tensor always sits in a layer.
    measured = [(n, p.layer, p.part) for n in M.names() if (p := patterns.place(n)).target and p.layer is not None]
    if not measured:
        raise ValueError(f"{expert}: no measured tensors (attention / MLP projections of model.layers.N)")
    n_layers = max(layer for _, layer, _ in measured) + 1
    keys = unit_keys(n_layers, granularity)
    acc: dict[tuple[int, Optional[str]], list[float]] = {k: [0.0, 0.0] for k in keys}
    norms = []
    # Layer by layer, then in name order: only the last bits of the sums depend on this order.
    for name, layer, part in sorted(measured, key=lambda m_: (m_[1], m_[0])):
        if lora:
            # X − B from the adapter's factors (ΔW written out in float64), or from a full model's values.
            b = B.get(name).to(_torch().float64)
            nb, ns, nm = (_norm(t, numerics) for t in (b, S.diff(name, b), M.diff(name, b)))
        else:
            b = _as_numerics(B.get(name), numerics)
            s = _as_numerics(S.get(name), numerics)
            m = _as_numerics(M.get(name), numerics)
            if numerics == "exact":
                b, s, m = (t.to(_torch().float64) for t in (b, s, m))
            nb = _norm(b, numerics)
            ns = _norm(s - b, numerics)
            nm = _norm(m - b, numerics)
        r_s, r_m = (ns / nb, nm / nb) if nb > BASE_NORM_EPS else (ns, nm)
        norms.append(RefTensorNorms(name, nb, ns, nm, r_s, r_m))
        key = (layer, None) if granularity == "layer" else (layer, part)
        if granularity == "layer":
            acc[key][0] += r_s
            acc[key][1] += r_m
        else:
            acc[key][0] += r_s * r_s
            acc[key][1] += r_m * r_m
    if granularity == "module":
        acc = {k: [math.sqrt(v[0]), math.sqrt(v[1])] for k, v in acc.items()}
    a_s = [acc[k][0] for k in keys]
    a_m = [acc[k][1] for k in keys]
    units = [
        RefUnit(layer, part, s, m, ps, pm, d, dec)
        for (layer, part), s, m, (ps, pm, d, dec) in zip(keys, a_s, a_m, decide(a_s, a_m, tau))
    ]
    return RefPlan(granularity, numerics, float(tau), float(alpha), n_layers, units, norms)


# --- the merged tensors (the method §5, §6) ---------------------------------------------------------------


def source_of(place: Place, plan: RefPlan, outside: str = "blend", norms: str = "expert", vocab_from: str = "outside") -> str:
    """Where an output tensor comes from: ``safety``, ``expert`` or ``blend`` (the method §5).
    ``vocab_from="expert"`` keeps the language expert's embeddings and lm_head; a layer tensor no
    pattern claims (``unassigned``) stays the language expert's."""
    if place.layer is None:
        return "expert" if place.vocab and vocab_from == "expert" else outside
    if place.part == "unassigned":
        return "expert"
    if plan.granularity == "layer":
        return plan.decision_of(place.layer, None)
    if place.part == "norm":
        return norms
    return plan.decision_of(place.layer, place.part)


_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64"}


def torch_dtype(name: str) -> "torch.dtype":
    """``bf16``/``f16``/``f32``/``f64`` (or safetensors' ``BF16``...) as a torch dtype."""
    return getattr(_torch(), _DTYPES[name.lower()])


def merged_tensor(source: str, s: "torch.Tensor", m: "torch.Tensor", alpha: float, numerics: str,
                  out_dtype: Optional["torch.dtype"] = None) -> "torch.Tensor":
    """One output tensor from the safety expert's ``s`` and the language expert's ``m``.

    exact: a copy keeps its bytes (or is converted once to ``out_dtype``); a blend is
    ``float32(alpha)·S + float32(1 − alpha)·M`` in float32 (float64 if an F64 tensor is involved),
    rounded once. official: both loaded in bf16, a blend is ``alpha * S + (1 - alpha) * M`` on bf16
    tensors exactly as the authors wrote it (each product and the sum rounded to bf16).
    """
    torch = _torch()
    if numerics == "official":
        s, m = s.to(torch.bfloat16), m.to(torch.bfloat16)
        out = s if source == "safety" else m if source == "expert" else alpha * s + (1 - alpha) * m
        return out.to(out_dtype or torch.bfloat16)
    dtype = out_dtype or m.dtype
    if source in ("safety", "expert"):
        src = s if source == "safety" else m
        return src if src.dtype == dtype else round_once(src, dtype)
    wide = torch.float64 if torch.float64 in (s.dtype, dtype) else torch.float32
    ws = torch.tensor(alpha, dtype=torch.float64).to(wide)
    wm = torch.tensor(1.0 - alpha, dtype=torch.float64).to(wide)
    return round_once(ws * s.to(wide) + wm * m.to(wide), dtype)


def round_once(t: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    """``t`` converted to ``dtype`` with one rounding to nearest even. torch turns float64 into
    bf16/f16 through float32, rounding twice; rounding to float32 *to odd* first (inexact results
    keep an odd last bit) makes the second rounding give the correctly rounded value."""
    torch = _torch()
    if t.dtype != torch.float64 or dtype not in (torch.bfloat16, torch.float16):
        return t.to(dtype)
    t32 = t.to(torch.float32)
    back = t32.to(torch.float64)
    bits = t32.view(torch.int32)
    even_inexact = (back != t) & ((bits & 1) == 0) & ~torch.isnan(t)
    step = torch.where(t.abs() > back.abs(), 1, -1).to(torch.int32)
    return torch.where(even_inexact, bits + step, bits).view(torch.float32).to(dtype)


def merged_tensors(
    safety: PathLike,
    expert: PathLike,
    plan: RefPlan,
    *,
    outside: str = "blend",
    norms: str = "expert",
    vocab_from: str = "outside",
    out_dtype: Optional[str] = None,
    layout: LayoutArg = None,
    base: Optional[PathLike] = None,
) -> Iterator[tuple[str, str, "torch.Tensor"]]:
    """Yields ``(name, source, tensor)`` for every tensor of the language expert, one at a time.

    Args:
        safety, expert: S and M (either may be a PEFT LoRA adapter folder over ``base``).
        plan: the :class:`RefPlan` from :func:`compute_plan`.
        outside: what tensors outside the decoder layers are made of (blend / expert / safety).
        norms: module granularity: what a layer's own norms are made of.
        vocab_from: ``outside`` (like other outside tensors) or ``expert``.
        out_dtype: output dtype name (None: M's dtype; bf16 in official numerics).
        layout: the same layout file given to :func:`compute_plan`.
        base: B, needed when S or M is an adapter.
    """
    patterns = Patterns.from_layout(layout)
    B = Checkpoint(base) if base is not None and (is_adapter(safety) or is_adapter(expert)) else None
    S, M = open_model(safety, B), open_model(expert, B)
    dtype = torch_dtype(out_dtype) if out_dtype else None
    for name in M.names():
        place = patterns.place(name)
        source = source_of(place, plan, outside, norms, vocab_from)
        alpha = plan.alpha_of(place.layer, place.part) if place.part != "unassigned" else plan.alpha
        if name not in S:
            # Only the host has it (e.g. an untied lm_head where S ties it): the host's is all there is.
            source = "expert"
        if B is None:
            m = M.get(name)
            if not m.is_floating_point():
                # Masks and position ids (BOOL, integers) are never measured or blended: the host's, unchanged.
                yield name, "expert", m
                continue
            yield name, source, merged_tensor(source, S.get(name) if name in S else m, m, alpha, plan.numerics, dtype)
            continue
        declared = M.declared_dtype(name)
        if not declared.is_floating_point:
            yield name, "expert", M.get(name)
            continue
        yield name, source, merged_lora_tensor(source, S, M, name, alpha, dtype or declared)


def merged_lora_tensor(source: str, S: Any, M: Any, name: str, alpha: float, dtype: "torch.dtype") -> "torch.Tensor":
    """One output tensor when S or M is a LoRA adapter (exact numerics). A term is B + ΔW (float64, see
    :func:`lora_delta`) for a tensor its adapter updates, else stored values. Stored values alone follow
    :func:`merged_tensor` (a copy keeps or converts the bytes; a blend of two tensors of one dtype is in
    float32, float64 with an F64). Otherwise (a B + ΔW term, or two stored dtypes that differ) every term
    is taken to float64, a blend is ``alpha·S + (1 − alpha)·M`` in float64, and the result is rounded
    once to ``dtype``."""
    torch = _torch()
    terms = [X for X, used in ((S, source in ("safety", "blend")), (M, source in ("expert", "blend"))) if used]
    values = [X.get(name) for X in terms]
    if not any(X.updated(name) for X in terms) and len({v.dtype for v in values}) == 1:
        s, m = (values[0], values[0]) if len(values) == 1 else values
        return merged_tensor(source, s, m, alpha, "exact", dtype)
    wide = [v.to(torch.float64) for v in values]
    out = wide[0] if len(wide) == 1 else alpha * wide[0] + (1.0 - alpha) * wide[1]
    return round_once(out, dtype)


def merge(
    base: PathLike,
    safety: PathLike,
    expert: PathLike,
    out_file: PathLike,
    *,
    granularity: str = "layer",
    tau: float = 0.001,
    alpha: float = 0.5,
    numerics: str = "exact",
    outside: str = "blend",
    norms: str = "expert",
    vocab_from: str = "outside",
    out_dtype: Optional[str] = None,
    layout: LayoutArg = None,
    decided: Optional[dict[tuple[int, Optional[str]], tuple[str, Optional[float], str]]] = None,
) -> RefPlan:
    """The whole method in torch: plan, then every merged tensor saved to one ``.safetensors`` file
    (``safetensors.torch.save_file``; holds the output in memory, meant for small models). ``decided``
    sets units' ``(decision, alpha, source)`` instead of the measured rule (see :meth:`RefPlan.with_decisions`)."""
    from safetensors.torch import save_file

    plan = compute_plan(base, safety, expert, granularity=granularity, tau=tau, alpha=alpha, numerics=numerics, layout=layout)
    if decided:
        plan = plan.with_decisions(decided)
    tensors = {n: t.contiguous() for n, _, t in merged_tensors(safety, expert, plan, outside=outside, norms=norms, vocab_from=vocab_from,
                                                               out_dtype=out_dtype, layout=layout, base=base)}
    save_file(tensors, str(out_file), metadata={"format": "pt"})
    return plan

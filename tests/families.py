"""Synthetic checkpoints of every supported model family, built without transformers or the hub.

Each family is a config.json (the family's own field names) and a function that lists the tensors the
family's modeling code creates for that config: name, shape, and what the tensor *is* — a measured
attention or MLP projection of layer i, another tensor of the attention or MLP submodule, one of the
layer's own norms, a vocabulary tensor, or something else outside the layers. That tag comes from
how the tensor was built here, never from the engine's layout files, so a numpy computation of
METHOD.md on these tags is an independent check of the engine's unit detection.

Shapes follow each family's modeling code (fused QKV, Conv1D orientation, multi-query attention,
head_dim independent of hidden_size, MoE experts ...). Dimensions are scaled down from a small real
config of the family (named in each builder) to keep the tests fast; Pythia-14m and BERT-tiny are
used at their real size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from layerswap_fast.synth import encode, header_bytes

# A tag: ("attention" | "mlp", layer, measured) | ("norm", layer) | ("outside",) | ("vocab",)
Tag = tuple
Spec = tuple[str, tuple[int, ...], Tag]
ROLES = ("base", "safety", "expert")


def attn(i: int, measured: bool = True) -> Tag:
    return ("attention", i, measured)


def mlp(i: int, measured: bool = True) -> Tag:
    return ("mlp", i, measured)


def norm(i: int) -> Tag:
    return ("norm", i)


OUT: Tag = ("outside",)
VOCAB: Tag = ("vocab",)


def linear(out: list, name: str, rows: int, cols: int, tag: Tag, bias: bool = False) -> None:
    """A torch Linear: weight [out_features, in_features] (+ bias [out_features], same tag)."""
    out.append((f"{name}.weight", (rows, cols), tag))
    if bias:
        out.append((f"{name}.bias", (rows,), tag))


def layernorm(out: list, name: str, size: int, tag: Tag, bias: bool = True) -> None:
    out.append((f"{name}.weight", (size,), tag))
    if bias:
        out.append((f"{name}.bias", (size,), tag))


# --- decoder families ------------------------------------------------------------------------------


def llama_attention(out: list, p: str, i: int, c: dict, qkv_bias: bool = False, qk_norm: bool = False) -> None:
    """A Llama-style layer's input norm, q/k/v/o projections (optional q/k norms) and post-attention
    norm, under the layer prefix ``p``: shared by the Llama, Gemma, Mixtral and Qwen-MoE builders."""
    h, n_h, n_kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // n_h
    layernorm(out, p + "input_layernorm", h, norm(i), bias=False)
    linear(out, p + "self_attn.q_proj", n_h * hd, h, attn(i), qkv_bias)
    linear(out, p + "self_attn.k_proj", n_kv * hd, h, attn(i), qkv_bias)
    linear(out, p + "self_attn.v_proj", n_kv * hd, h, attn(i), qkv_bias)
    linear(out, p + "self_attn.o_proj", h, n_h * hd, attn(i))
    if qk_norm:
        out.append((p + "self_attn.q_norm.weight", (hd,), attn(i, False)))
        out.append((p + "self_attn.k_norm.weight", (hd,), attn(i, False)))
    layernorm(out, p + "post_attention_layernorm", h, norm(i), bias=False)


def llama_like(c: dict, prefix: str = "model.", lm_head: str = "lm_head", qkv_bias: bool = False, qk_norm: bool = False,
               extra_norms: bool = False) -> list[Spec]:
    """Llama / Mistral / Qwen2 / Qwen3 / Gemma 1-3 text decoder under ``prefix``."""
    h, inter = c["hidden_size"], c["intermediate_size"]
    out: list[Spec] = [(f"{prefix}embed_tokens.weight", (c["vocab_size"], h), VOCAB)]
    for i in range(c["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        llama_attention(out, p, i, c, qkv_bias, qk_norm)
        if extra_norms:
            layernorm(out, p + "pre_feedforward_layernorm", h, norm(i), bias=False)
            layernorm(out, p + "post_feedforward_layernorm", h, norm(i), bias=False)
        linear(out, p + "mlp.gate_proj", inter, h, mlp(i))
        linear(out, p + "mlp.up_proj", inter, h, mlp(i))
        linear(out, p + "mlp.down_proj", h, inter, mlp(i))
    out.append((f"{prefix}norm.weight", (h,), OUT))
    if not c.get("tie_word_embeddings", False):
        out.append((f"{lm_head}.weight", (c["vocab_size"], h), VOCAB))
    return out


def cohere(c: dict) -> list[Spec]:
    """Cohere / Aya Expanse (CohereLabs/aya-expanse-8b names, scaled): parallel attention and MLP after
    one input_layernorm, optional per-head q_norm/k_norm [heads, head_dim], tied embeddings."""
    h, n_h, n_kv, inter = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    hd = h // n_h
    out: list[Spec] = [("model.embed_tokens.weight", (c["vocab_size"], h), VOCAB)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layernorm(out, p + "input_layernorm", h, norm(i), bias=False)
        for proj, rows in (("q_proj", n_h * hd), ("k_proj", n_kv * hd), ("v_proj", n_kv * hd)):
            linear(out, p + f"self_attn.{proj}", rows, h, attn(i))
        linear(out, p + "self_attn.o_proj", h, n_h * hd, attn(i))
        if c.get("use_qk_norm"):
            out.append((p + "self_attn.q_norm.weight", (n_h, hd), attn(i, False)))
            out.append((p + "self_attn.k_norm.weight", (n_kv, hd), attn(i, False)))
        for proj, rows, cols in (("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)):
            linear(out, p + f"mlp.{proj}", rows, cols, mlp(i))
    out.append(("model.norm.weight", (h,), OUT))
    return out


def phi3(c: dict) -> list[Spec]:
    """Phi-3 (microsoft/Phi-3-mini-4k-instruct shape, scaled): fused qkv_proj and gate_up_proj."""
    h, n_h, n_kv, inter = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    hd = h // n_h
    out: list[Spec] = [("model.embed_tokens.weight", (c["vocab_size"], h), VOCAB)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layernorm(out, p + "input_layernorm", h, norm(i), bias=False)
        linear(out, p + "self_attn.qkv_proj", (n_h + 2 * n_kv) * hd, h, attn(i))
        linear(out, p + "self_attn.o_proj", h, n_h * hd, attn(i))
        layernorm(out, p + "post_attention_layernorm", h, norm(i), bias=False)
        linear(out, p + "mlp.gate_up_proj", 2 * inter, h, mlp(i))
        linear(out, p + "mlp.down_proj", h, inter, mlp(i))
    out.append(("model.norm.weight", (h,), OUT))
    out.append(("lm_head.weight", (c["vocab_size"], h), VOCAB))
    return out


def phi2(c: dict) -> list[Spec]:
    """Phi-2 (microsoft/phi-2 shape, scaled): parallel attention and MLP, biases everywhere."""
    h, inter = c["hidden_size"], c["intermediate_size"]
    out: list[Spec] = [("model.embed_tokens.weight", (c["vocab_size"], h), VOCAB)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layernorm(out, p + "input_layernorm", h, norm(i))
        for proj in ("q_proj", "k_proj", "v_proj"):
            linear(out, p + f"self_attn.{proj}", h, h, attn(i), bias=True)
        linear(out, p + "self_attn.dense", h, h, attn(i), bias=True)
        linear(out, p + "mlp.fc1", inter, h, mlp(i), bias=True)
        linear(out, p + "mlp.fc2", h, inter, mlp(i), bias=True)
    layernorm(out, "model.final_layernorm", h, OUT)
    out.append(("lm_head.weight", (c["vocab_size"], h), VOCAB))
    out.append(("lm_head.bias", (c["vocab_size"],), VOCAB))
    return out


def mixtral(c: dict) -> list[Spec]:
    """Mixtral (mistralai/Mixtral-8x7B shape, scaled): router block_sparse_moe.gate + experts w1/w2/w3."""
    h, inter, n_e = (c[k] for k in ("hidden_size", "intermediate_size", "num_local_experts"))
    out: list[Spec] = [("model.embed_tokens.weight", (c["vocab_size"], h), VOCAB)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        llama_attention(out, p, i, c)
        linear(out, p + "block_sparse_moe.gate", n_e, h, mlp(i))  # the router: measured
        for e in range(n_e):
            q = p + f"block_sparse_moe.experts.{e}."
            linear(out, q + "w1", inter, h, mlp(i))
            linear(out, q + "w2", h, inter, mlp(i))
            linear(out, q + "w3", inter, h, mlp(i))
    out.append(("model.norm.weight", (h,), OUT))
    out.append(("lm_head.weight", (c["vocab_size"], h), VOCAB))
    return out


def qwen_moe(c: dict, shared: bool, qk_norm: bool, qkv_bias: bool) -> list[Spec]:
    """Qwen2-MoE (Qwen1.5-MoE-A2.7B shape, scaled; mlp_only_layers are dense) / Qwen3-MoE."""
    h, n_e = c["hidden_size"], c["num_experts"]
    moe_i, dense_i = c["moe_intermediate_size"], c["intermediate_size"]
    out: list[Spec] = [("model.embed_tokens.weight", (c["vocab_size"], h), VOCAB)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        llama_attention(out, p, i, c, qkv_bias, qk_norm)
        if i in c.get("mlp_only_layers", []):
            for proj, rows, cols in (("gate_proj", dense_i, h), ("up_proj", dense_i, h), ("down_proj", h, dense_i)):
                linear(out, p + f"mlp.{proj}", rows, cols, mlp(i))
            continue
        linear(out, p + "mlp.gate", n_e, h, mlp(i))  # the router: measured
        for e in range(n_e):
            for proj, rows, cols in (("gate_proj", moe_i, h), ("up_proj", moe_i, h), ("down_proj", h, moe_i)):
                linear(out, p + f"mlp.experts.{e}.{proj}", rows, cols, mlp(i))
        if shared:
            si = c["shared_expert_intermediate_size"]
            for proj, rows, cols in (("gate_proj", si, h), ("up_proj", si, h), ("down_proj", h, si)):
                linear(out, p + f"mlp.shared_expert.{proj}", rows, cols, mlp(i))
            linear(out, p + "mlp.shared_expert_gate", 1, h, mlp(i))
    out.append(("model.norm.weight", (h,), OUT))
    if not c.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (c["vocab_size"], h), VOCAB))
    return out


def gpt_neox(c: dict) -> list[Spec]:
    """GPT-NeoX / Pythia (EleutherAI/pythia-14m, real size)."""
    h, inter = c["hidden_size"], c["intermediate_size"]
    out: list[Spec] = [("gpt_neox.embed_in.weight", (c["vocab_size"], h), VOCAB)]
    for i in range(c["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        layernorm(out, p + "input_layernorm", h, norm(i))
        layernorm(out, p + "post_attention_layernorm", h, norm(i))
        linear(out, p + "attention.query_key_value", 3 * h, h, attn(i), bias=True)
        linear(out, p + "attention.dense", h, h, attn(i), bias=True)
        linear(out, p + "mlp.dense_h_to_4h", inter, h, mlp(i), bias=True)
        linear(out, p + "mlp.dense_4h_to_h", h, inter, mlp(i), bias=True)
    layernorm(out, "gpt_neox.final_layer_norm", h, OUT)
    out.append(("embed_out.weight", (c["vocab_size"], h), VOCAB))
    return out


def gpt2(c: dict, prefix: str) -> list[Spec]:
    """GPT-2 (openai-community/gpt2 shape, scaled). Conv1D stores weights as [in, out]."""
    h, n = c["n_embd"], c["n_embd"] * 4
    out: list[Spec] = [(f"{prefix}wte.weight", (c["vocab_size"], h), VOCAB), (f"{prefix}wpe.weight", (c["n_positions"], h), OUT)]
    for i in range(c["n_layer"]):
        p = f"{prefix}h.{i}."
        layernorm(out, p + "ln_1", h, norm(i))
        out += [(p + "attn.c_attn.weight", (h, 3 * h), attn(i)), (p + "attn.c_attn.bias", (3 * h,), attn(i))]
        out += [(p + "attn.c_proj.weight", (h, h), attn(i)), (p + "attn.c_proj.bias", (h,), attn(i))]
        layernorm(out, p + "ln_2", h, norm(i))
        out += [(p + "mlp.c_fc.weight", (h, n), mlp(i)), (p + "mlp.c_fc.bias", (n,), mlp(i))]
        out += [(p + "mlp.c_proj.weight", (n, h), mlp(i)), (p + "mlp.c_proj.bias", (h,), mlp(i))]
    layernorm(out, f"{prefix}ln_f", h, OUT)
    return out


def falcon(c: dict) -> list[Spec]:
    """Falcon: 7B style (multi-query, one input_layernorm) or 40B style (new decoder architecture,
    grouped KV heads, ln_attn + ln_mlp). Shapes scaled from tiiuae/falcon-7b and falcon-40b."""
    h, n_h = c["hidden_size"], c["num_attention_heads"]
    hd = h // n_h
    new = c.get("new_decoder_architecture", False)
    n_kv = c["num_kv_heads"] if new else 1
    qkv = (n_h + 2 * n_kv) * hd
    bias = c.get("bias", False)
    out: list[Spec] = [("transformer.word_embeddings.weight", (c["vocab_size"], h), VOCAB)]
    for i in range(c["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        if new:
            layernorm(out, p + "ln_attn", h, norm(i))
            layernorm(out, p + "ln_mlp", h, norm(i))
        else:
            layernorm(out, p + "input_layernorm", h, norm(i))
        linear(out, p + "self_attention.query_key_value", qkv, h, attn(i), bias)
        linear(out, p + "self_attention.dense", h, h, attn(i), bias)
        linear(out, p + "mlp.dense_h_to_4h", 4 * h, h, mlp(i), bias)
        linear(out, p + "mlp.dense_4h_to_h", h, 4 * h, mlp(i), bias)
    layernorm(out, "transformer.ln_f", h, OUT)
    out.append(("lm_head.weight", (c["vocab_size"], h), VOCAB))
    return out


def bert_like(c: dict, prefix: str, head: str) -> list[Spec]:
    """BERT / RoBERTa / XLM-R encoders. Both LayerNorms of a layer (attention.output.LayerNorm and
    output.LayerNorm) are the layer's own norms. ``head``: "mlm-bert", "mlm-roberta" or "pooler"."""
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    e = f"{prefix}embeddings."
    out: list[Spec] = [
        (e + "word_embeddings.weight", (v, h), VOCAB),
        (e + "position_embeddings.weight", (c["max_position_embeddings"], h), OUT),
        (e + "token_type_embeddings.weight", (c["type_vocab_size"], h), OUT),
    ]
    layernorm(out, e + "LayerNorm", h, OUT)
    for i in range(c["num_hidden_layers"]):
        p = f"{prefix}encoder.layer.{i}."
        for proj in ("query", "key", "value"):
            linear(out, p + f"attention.self.{proj}", h, h, attn(i), bias=True)
        linear(out, p + "attention.output.dense", h, h, attn(i), bias=True)
        layernorm(out, p + "attention.output.LayerNorm", h, norm(i))
        linear(out, p + "intermediate.dense", inter, h, mlp(i), bias=True)
        linear(out, p + "output.dense", h, inter, mlp(i), bias=True)
        layernorm(out, p + "output.LayerNorm", h, norm(i))
    if head == "mlm-bert":
        linear(out, "cls.predictions.transform.dense", h, h, OUT, bias=True)
        layernorm(out, "cls.predictions.transform.LayerNorm", h, OUT)
        out.append(("cls.predictions.bias", (v,), VOCAB))
    elif head == "mlm-roberta":
        linear(out, "lm_head.dense", h, h, OUT, bias=True)
        layernorm(out, "lm_head.layer_norm", h, OUT)
        out.append(("lm_head.bias", (v,), VOCAB))
    else:
        linear(out, f"{prefix}pooler.dense", h, h, OUT, bias=True)
    return out


def bloom(c: dict) -> list[Spec]:
    """BLOOM (bigscience/bloom-560m names: no prefix; shape scaled): fused QKV, biases, tied embeddings."""
    h = c["hidden_size"]
    out: list[Spec] = [("word_embeddings.weight", (c["vocab_size"], h), VOCAB)]
    layernorm(out, "word_embeddings_layernorm", h, OUT)
    for i in range(c["n_layer"]):
        p = f"h.{i}."
        layernorm(out, p + "input_layernorm", h, norm(i))
        linear(out, p + "self_attention.query_key_value", 3 * h, h, attn(i), bias=True)
        linear(out, p + "self_attention.dense", h, h, attn(i), bias=True)
        layernorm(out, p + "post_attention_layernorm", h, norm(i))
        linear(out, p + "mlp.dense_h_to_4h", 4 * h, h, mlp(i), bias=True)
        linear(out, p + "mlp.dense_4h_to_h", h, 4 * h, mlp(i), bias=True)
    layernorm(out, "ln_f", h, OUT)
    return out


def distilbert(c: dict) -> list[Spec]:
    """DistilBertForMaskedLM (distilbert-base-multilingual-cased names, scaled)."""
    h, inter, v = c["dim"], c["hidden_dim"], c["vocab_size"]
    out: list[Spec] = [("distilbert.embeddings.word_embeddings.weight", (v, h), VOCAB),
                       ("distilbert.embeddings.position_embeddings.weight", (c["max_position_embeddings"], h), OUT)]
    layernorm(out, "distilbert.embeddings.LayerNorm", h, OUT)
    for i in range(c["n_layers"]):
        p = f"distilbert.transformer.layer.{i}."
        for proj in ("q_lin", "k_lin", "v_lin", "out_lin"):
            linear(out, p + f"attention.{proj}", h, h, attn(i), bias=True)
        layernorm(out, p + "sa_layer_norm", h, norm(i))
        linear(out, p + "ffn.lin1", inter, h, mlp(i), bias=True)
        linear(out, p + "ffn.lin2", h, inter, mlp(i), bias=True)
        layernorm(out, p + "output_layer_norm", h, norm(i))
    linear(out, "vocab_transform", h, h, OUT, bias=True)
    layernorm(out, "vocab_layer_norm", h, OUT)
    out.append(("vocab_projector.bias", (v,), VOCAB))
    return out


# --- multimodal wrappers: the vision side is all outside ----------------------------------------------


def vision_encoder(prefix: str, layers: int, h: int, inter: int, patch: int = 4, positions: int = 17) -> list[Spec]:
    """A CLIP / SigLIP vision tower: its layers are named like a decoder's but are never units."""
    out: list[Spec] = [(prefix + "embeddings.patch_embedding.weight", (h, 3, patch, patch), OUT),
                       (prefix + "embeddings.position_embedding.weight", (positions, h), OUT)]
    for j in range(layers):
        p = f"{prefix}encoder.layers.{j}."
        layernorm(out, p + "layer_norm1", h, OUT)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(out, p + f"self_attn.{proj}", h, h, OUT, bias=True)
        layernorm(out, p + "layer_norm2", h, OUT)
        linear(out, p + "mlp.fc1", inter, h, OUT, bias=True)
        linear(out, p + "mlp.fc2", h, inter, OUT, bias=True)
    layernorm(out, prefix + "post_layernorm", h, OUT)
    return out


def gemma3_vl(c: dict) -> list[Spec]:
    """Gemma3ForConditionalGeneration (google/gemma-3-4b-it layout, scaled): text under language_model."""
    t = c["text_config"]
    out = llama_like(t, prefix="language_model.model.", qk_norm=True, extra_norms=True)
    out += vision_encoder("vision_tower.vision_model.", c["vision_config"]["num_hidden_layers"], 32, 64)
    out += [("multi_modal_projector.mm_input_projection_weight", (32, t["hidden_size"]), OUT),
            ("multi_modal_projector.mm_soft_emb_norm.weight", (32,), OUT)]
    return out


def llava(c: dict, new_format: bool) -> list[Spec]:
    """LlavaForConditionalGeneration (llava-hf/llava-1.5-7b-hf layout, scaled). ``new_format``: the
    names transformers >= 4.52 writes (model.language_model.*, model.vision_tower.*, lm_head)."""
    t = c["text_config"]
    if new_format:
        out = llama_like(t, prefix="model.language_model.", lm_head="lm_head")
        vis, proj = "model.vision_tower.vision_model.", "model.multi_modal_projector."
    else:
        out = llama_like(t, prefix="language_model.model.", lm_head="language_model.lm_head")
        vis, proj = "vision_tower.vision_model.", "multi_modal_projector."
    out += vision_encoder(vis, c["vision_config"]["num_hidden_layers"], 32, 64)
    out.append((vis + "embeddings.class_embedding", (32,), OUT))
    layernorm(out, vis + "pre_layrnorm", 32, OUT)  # sic: CLIP's spelling
    linear(out, proj + "linear_1", t["hidden_size"], 32, OUT, bias=True)
    linear(out, proj + "linear_2", t["hidden_size"], t["hidden_size"], OUT, bias=True)
    return out


def qwen2_vl(c: dict) -> list[Spec]:
    """Qwen2VLForConditionalGeneration as first released (Qwen/Qwen2-VL-2B-Instruct names, scaled):
    text at model.layers, vision blocks at visual.blocks.{i} (outside)."""
    out = llama_like(c, qkv_bias=True)
    for j in range(2):
        p = f"visual.blocks.{j}."
        layernorm(out, p + "norm1", 32, OUT)
        layernorm(out, p + "norm2", 32, OUT)
        linear(out, p + "attn.qkv", 96, 32, OUT, bias=True)
        linear(out, p + "attn.proj", 32, 32, OUT, bias=True)
        linear(out, p + "mlp.fc1", 64, 32, OUT, bias=True)
        linear(out, p + "mlp.fc2", 32, 64, OUT, bias=True)
    out.append(("visual.patch_embed.proj.weight", (32, 3, 2, 4, 4), OUT))
    layernorm(out, "visual.merger.ln_q", 32, OUT)
    return out


# --- the table of families -----------------------------------------------------------------------------


@dataclass
class Family:
    """One family: its config.json, its tensors, the layout the engine should pick, and the dtype."""

    id: str
    layout: str
    config: dict
    build: Callable[[dict], list[Spec]]
    dtype: str = "bf16"

    def specs(self) -> list[Spec]:
        return self.build(self.config)


def _cfg(arch: str, model_type: str, **kw: Any) -> dict:
    return {"architectures": [arch], "model_type": model_type, **kw}


_LLAMA = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)

FAMILIES: list[Family] = [
    # meta-llama/Llama-3.2-1B: GQA 32/8 heads, tied embeddings.
    Family("llama", "llama", _cfg("LlamaForCausalLM", "llama", **_LLAMA, tie_word_embeddings=True), llama_like),
    # mistralai/Mistral-Nemo: head_dim 128 != 5120 / 32.
    Family("mistral", "llama", _cfg("MistralForCausalLM", "mistral", **{**_LLAMA, "hidden_size": 96, "head_dim": 16}), llama_like),
    # Qwen/Qwen2.5-0.5B: q/k/v biases, tied embeddings.
    Family("qwen2", "llama", _cfg("Qwen2ForCausalLM", "qwen2", **_LLAMA, tie_word_embeddings=True),
           lambda c: llama_like(c, qkv_bias=True)),
    # Qwen/Qwen3-0.6B: q_norm/k_norm, head_dim 128 != 1024 / 16, tied.
    Family("qwen3", "llama", _cfg("Qwen3ForCausalLM", "qwen3", **{**_LLAMA, "head_dim": 32}, tie_word_embeddings=True),
           lambda c: llama_like(c, qk_norm=True)),
    Family("aya-cohere", "llama", _cfg("CohereForCausalLM", "cohere", **_LLAMA, use_qk_norm=True, tie_word_embeddings=True), cohere),
    # google/gemma-2b: multi-query (1 KV head), head_dim 256 independent of hidden, tied.
    Family("gemma", "gemma", _cfg("GemmaForCausalLM", "gemma", **{**_LLAMA, "num_key_value_heads": 1, "head_dim": 32},
                                  tie_word_embeddings=True), llama_like),
    # google/gemma-2-2b: pre/post feed-forward norms.
    Family("gemma2", "gemma", _cfg("Gemma2ForCausalLM", "gemma2", **{**_LLAMA, "head_dim": 32}, tie_word_embeddings=True),
           lambda c: llama_like(c, extra_norms=True)),
    # google/gemma-3-1b-it: 4 heads / 1 KV head, head_dim 256, q_norm/k_norm and four norms per layer.
    Family("gemma3", "gemma", _cfg("Gemma3ForCausalLM", "gemma3_text", **{**_LLAMA, "num_key_value_heads": 1, "head_dim": 32},
                                   tie_word_embeddings=True), lambda c: llama_like(c, qk_norm=True, extra_norms=True)),
    Family("gemma3-vl", "gemma", _cfg("Gemma3ForConditionalGeneration", "gemma3",
                                      text_config={**_LLAMA, "head_dim": 32, "tie_word_embeddings": True},
                                      vision_config={"num_hidden_layers": 3}), gemma3_vl),
    Family("llava", "multimodal", _cfg("LlavaForConditionalGeneration", "llava", text_config=_LLAMA,
                                       vision_config={"num_hidden_layers": 3}), lambda c: llava(c, new_format=False)),
    Family("llava-new-names", "multimodal", _cfg("LlavaForConditionalGeneration", "llava", text_config=_LLAMA,
                                                 vision_config={"num_hidden_layers": 5}), lambda c: llava(c, new_format=True)),
    Family("qwen2-vl", "multimodal", _cfg("Qwen2VLForConditionalGeneration", "qwen2_vl", **_LLAMA, tie_word_embeddings=True), qwen2_vl),
    # microsoft/Phi-3-mini-4k-instruct: fused qkv and gate_up, untied.
    Family("phi3", "phi3", _cfg("Phi3ForCausalLM", "phi3", **{**_LLAMA, "num_key_value_heads": 4}), phi3),
    Family("phi2", "phi", _cfg("PhiForCausalLM", "phi", hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                               num_attention_heads=4, vocab_size=256), phi2),
    Family("mixtral", "mixtral", _cfg("MixtralForCausalLM", "mixtral", **{**_LLAMA, "intermediate_size": 96}, num_local_experts=4,
                                      num_experts_per_tok=2), mixtral),
    Family("qwen2-moe", "qwen_moe", _cfg("Qwen2MoeForCausalLM", "qwen2_moe", **{**_LLAMA, "intermediate_size": 160}, num_experts=4,
                                         moe_intermediate_size=48, shared_expert_intermediate_size=96, mlp_only_layers=[0]),
           lambda c: qwen_moe(c, shared=True, qk_norm=False, qkv_bias=True)),
    Family("qwen3-moe", "qwen_moe", _cfg("Qwen3MoeForCausalLM", "qwen3_moe", **{**_LLAMA, "head_dim": 32}, num_experts=4,
                                         moe_intermediate_size=48),
           lambda c: qwen_moe(c, shared=False, qk_norm=True, qkv_bias=False)),
    # EleutherAI/pythia-14m at its real size.
    Family("pythia", "gpt_neox", _cfg("GPTNeoXForCausalLM", "gpt_neox", hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                                      num_attention_heads=4, vocab_size=50304), gpt_neox),
    Family("gpt2", "gpt2", _cfg("GPT2LMHeadModel", "gpt2", n_embd=64, n_layer=4, n_head=4, n_positions=128, vocab_size=256),
           lambda c: gpt2(c, "transformer."), dtype="f32"),
    # The names openai-community/gpt2's own model.safetensors uses (no transformer. prefix).
    Family("gpt2-bare", "gpt2", _cfg("GPT2LMHeadModel", "gpt2", n_embd=64, n_layer=3, n_head=4, n_positions=64, vocab_size=256),
           lambda c: gpt2(c, ""), dtype="f32"),
    Family("falcon-7b", "falcon", _cfg("FalconForCausalLM", "falcon", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                       vocab_size=256, multi_query=True, parallel_attn=True, bias=False), falcon),
    Family("falcon-40b", "falcon", _cfg("FalconForCausalLM", "falcon", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                        num_kv_heads=2, vocab_size=256, new_decoder_architecture=True, bias=False), falcon),
    Family("bloom", "falcon", _cfg("BloomForCausalLM", "bloom", hidden_size=64, n_layer=4, n_head=4, vocab_size=256), bloom),
    # prajjwal1/bert-tiny at its real size.
    Family("bert", "bert", _cfg("BertForMaskedLM", "bert", hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                num_attention_heads=2, vocab_size=30522, max_position_embeddings=512, type_vocab_size=2),
           lambda c: bert_like(c, "bert.", "mlm-bert"), dtype="f32"),
    # FacebookAI/xlm-roberta-base names, scaled.
    Family("xlm-roberta", "bert", _cfg("XLMRobertaForMaskedLM", "xlm-roberta", hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                                       num_attention_heads=4, vocab_size=512, max_position_embeddings=66, type_vocab_size=1),
           lambda c: bert_like(c, "roberta.", "mlm-roberta")),
    # A sentence-embedding XLM-R (e.g. intfloat/multilingual-e5-small) saved without a prefix.
    Family("xlm-roberta-bare", "bert", _cfg("XLMRobertaModel", "xlm-roberta", hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                            num_attention_heads=4, vocab_size=512, max_position_embeddings=66, type_vocab_size=1),
           lambda c: bert_like(c, "", "pooler")),
    Family("distilbert-multilingual", "distilbert", _cfg("DistilBertForMaskedLM", "distilbert", dim=64, hidden_dim=256, n_layers=3,
                                                         n_heads=4, vocab_size=512, max_position_embeddings=64), distilbert),
]

BY_ID = {f.id: f for f in FAMILIES}


# --- writing a trio ---------------------------------------------------------------------------------------


def planted_scale(role: str, tag: Tag, n_layers: int) -> float:
    """Task-vector size relative to the base's spread: the safety expert moves the top half of the
    layers (and layer 0's attention), the language expert the bottom half; small moves elsewhere."""
    if role == "base":
        return 0.0
    if tag[0] not in ("attention", "mlp", "norm"):
        return 0.02
    layer = tag[1]
    top = layer >= n_layers // 2
    if role == "safety" and (top or (layer == 0 and tag[0] == "attention")):
        return 0.3
    if role == "expert" and not top:
        return 0.3
    return 0.03


def write_model(folder: Path, specs: list[tuple[str, tuple[int, ...]]], values: dict[str, np.ndarray], dtype: str, config: Optional[dict]) -> Path:
    """One HF folder: model.safetensors (+ config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(header_bytes(specs, dtype))
        for name, _ in specs:
            fh.write(encode(values[name], dtype))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def make_trio_from_specs(root: Union[str, Path], specs: list[Spec], config: Optional[dict], *, dtype: str = "bf16", seed: int = 0,
                         scale: Callable[[str, Tag], float] | None = None,
                         edit: Optional[Callable[[str, list[tuple[str, tuple[int, ...]]], dict[str, np.ndarray]], None]] = None) -> dict[str, Path]:
    """Writes ``root/{base,safety,expert}`` for any family's tensor list.

    Args:
        specs: (name, shape, tag) for every tensor.
        config: config.json of all three (None: no config.json).
        scale: ``scale(role, tag)``: task-vector size relative to the base's spread (default:
            :func:`planted_scale`).
        edit: ``edit(role, specs, values)`` may change a role's tensor list and values in place before
            writing (to build hostile variants: missing or extra tensors, other shapes).
    """
    root = Path(root)
    n_layers = 1 + max((t[1] for _, _, t in specs if t[0] in ("attention", "mlp", "norm")), default=0)
    scale = scale or (lambda role, tag: planted_scale(role, tag, n_layers))
    values: dict[str, dict[str, np.ndarray]] = {r: {} for r in ROLES}
    for index, (name, shape, tag) in enumerate(specs):
        rng = np.random.default_rng([seed, index])
        n = int(np.prod(shape))
        base = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
        if name.endswith(("norm.weight", "LayerNorm.weight", "layer_norm.weight", "ln_f.weight", "norm1.weight", "norm2.weight",
                          "ln_1.weight", "ln_2.weight", "ln_attn.weight", "ln_mlp.weight", "ln_q.weight",
                          "word_embeddings_layernorm.weight")):
            base += np.float32(1.0)
        values["base"][name] = base
        for role in ("safety", "expert"):
            delta = np.random.default_rng([seed, index, ROLES.index(role)]).standard_normal(n, dtype=np.float32)
            values[role][name] = base + delta * np.float32(0.02 * scale(role, tag))
    paths = {}
    for role in ROLES:
        role_specs = [(n, s) for n, s, _ in specs]
        if edit is not None:
            edit(role, role_specs, values[role])
        paths[role] = write_model(root / role, role_specs, values[role], dtype, config)
    return paths


# --- the independent numpy computation -----------------------------------------------------------------


def unit_of(tag: Tag, granularity: str) -> Any:
    """The unit a tensor's decision comes from (keys like the engine's plan), or 'outside' / 'norm'."""
    if tag[0] in ("outside", "vocab"):
        return "outside"
    if granularity == "layer":
        return tag[1]
    if tag[0] == "norm":
        return "norm"
    return (tag[1], tag[0])


def numpy_plan(paths: dict[str, Path], specs: list[Spec], granularity: str, tau: float = 0.001) -> dict[Any, dict[str, Any]]:
    """METHOD.md §1–§4 in numpy, with units taken from the specs' tags: unit -> {A_s, A_m, d, decision}."""
    from models import decode, method_decisions, read_model

    B, S, M = (read_model(paths[r]) for r in ROLES)
    measured = (
        (unit_of(tag, granularity), decode(B[name][0], B[name][2]), decode(S[name][0], S[name][2]), decode(M[name][0], M[name][2]))
        for name, _, tag in specs
        if tag[0] in ("attention", "mlp") and tag[2]
    )
    return method_decisions(measured, granularity, tau)


def tensor_source(tag: Tag, plan: dict[Any, dict[str, Any]], granularity: str, outside: str = "blend", norms: str = "expert") -> str:
    unit = unit_of(tag, granularity)
    if unit == "outside":
        return outside
    if unit == "norm":
        return norms
    return plan[unit]["decision"]


def numpy_expected(paths: dict[str, Path], specs: list[Spec], granularity: str, vocab_from: str = "outside",
                   alpha: float = 0.5) -> dict[str, Any]:
    """``units`` and ``source`` for ``models.check_output`` from :func:`numpy_plan`: every unit's
    measured decision and scores, every tensor's source (the vocabulary tensors from the language
    expert with ``vocab_from="expert"``) at ``alpha``."""
    from models import numpy_units

    ref = numpy_plan(paths, specs, granularity)
    tags = {name: tag for name, _, tag in specs}

    def source(name: str) -> tuple[str, float]:
        tag = tags[name]
        return ("expert" if tag == VOCAB and vocab_from == "expert" else tensor_source(tag, ref, granularity)), alpha

    return {"units": numpy_units(ref), "source": source}

"""Phi-3 (mini/medium, 4k and 128k): Llama's layers; HF already stores fused qkv_proj/gate_up_proj.

RoPE may be partial (`partial_rotary_factor`) and scaled with LongRoPE (`rope_scaling.type` "su" or
"longrope": short/long factors and an attention factor on cos/sin). A `sliding_window` in the HF
config is applied to every layer, as transformers does (MLC ignores it).

MLC's on-disk names differ from HF's: `transformer.embd`, `transformer.h.{i}.ln`,
`transformer.h.{i}.mixer.{qkv_proj,out_proj}`, `transformer.norm` (mlp and post_attention_layernorm
keep HF's names).
"""

from __future__ import annotations

import math

import torch
from gguf import MODEL_TENSOR as T

from edgellm.models.config import ArchConfig, llama_like
from edgellm.models.gguf_hooks import (
    GGUFMeta,
    K,
    expand,
    export_names,
    llama_like_config,
    llama_like_metadata,
    tname,
)
from edgellm.models.llama import Model, hf_rename
from edgellm.models.schema import HFConfig
from edgellm.validation import Int

__all__ = ["DISK_NAMES", "GGUF_ARCH", "HF_FUSED", "Model", "gguf_config", "gguf_export_names", "gguf_join",
           "gguf_metadata", "gguf_tensor_names", "hf_rename", "parse_config"]

HF_FUSED: dict[str, list[str]] = {}  # nothing to fuse
DISK_NAMES = [
    ("model.embed_tokens.", "transformer.embd."),
    ("model.layers.", "transformer.h."),
    (".input_layernorm.", ".ln."),
    (".self_attn.qkv_proj.", ".mixer.qkv_proj."),
    (".self_attn.o_proj.", ".mixer.out_proj."),
    ("model.norm.", "transformer.norm."),
]


class Config(HFConfig):
    """Phi-3's own config.json facts: LongRoPE's original context."""

    original_max_position_embeddings: Int(1, 1 << 24) | None = None


def parse_config(hf: dict) -> ArchConfig:
    window = hf.get("sliding_window")
    cfg = llama_like(hf, int(window) if window else None)
    rope = cfg.rope
    if rope["rope_type"] == "longrope":
        # transformers prefers Phi-3's top-level original_max_position_embeddings over the dict's.
        orig = int(hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                   or cfg.max_position_embeddings)
        rope["original_max_position_embeddings"] = orig
        if rope.get("attention_factor") is None:
            # Fixed by the config (not by the runtime's context size), as transformers computes it.
            factor = float(rope.get("factor") or cfg.max_position_embeddings / orig)
            scale = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1.0 else 1.0
            rope["attention_factor"] = scale
    return cfg


# -- GGUF: llama.cpp's "phi3" keeps HF's fused attn_qkv and [gate; up] as ffn_up ----------------------

GGUF_ARCH = "phi3"
GGUF_TABLE = [
    (tname(T.TOKEN_EMBD), "model.embed_tokens"),
    (tname(T.OUTPUT_NORM), "model.norm"),
    (tname(T.OUTPUT), "lm_head"),
    (tname(T.ATTN_NORM), "model.layers.{bid}.input_layernorm"),
    (tname(T.ATTN_QKV), "model.layers.{bid}.self_attn.qkv_proj"),
    (tname(T.ATTN_OUT), "model.layers.{bid}.self_attn.o_proj"),
    (tname(T.FFN_NORM), "model.layers.{bid}.post_attention_layernorm"),
    (tname(T.FFN_UP), "model.layers.{bid}.mlp.gate_up_proj"),
    (tname(T.FFN_DOWN), "model.layers.{bid}.mlp.down_proj"),
]
# Some converters split q/k/v; they are joined back into qkv_proj (in this order) when read.
_SPLIT_QKV = [(tname(t), "model.layers.{bid}.self_attn.qkv_proj") for t in (T.ATTN_Q, T.ATTN_K, T.ATTN_V)]
GGUF_OUTPUT_REQUIRED = True  # llama.cpp's phi3 needs output.weight: a tied model writes a copy


def gguf_config(meta: GGUFMeta) -> dict:
    """HF config; longrope comes from the rope_factors_long/short tensors, as llama.cpp reads it."""
    cfg = llama_like_config(meta, "phi3", "Phi3ForCausalLM")
    window = meta.get(K.Attention.SLIDING_WINDOW)
    if window:
        cfg["sliding_window"] = int(window)
    long, short = tname(T.ROPE_FACTORS_LONG) + ".weight", tname(T.ROPE_FACTORS_SHORT) + ".weight"
    if meta.has(long) and meta.has(short):
        orig = int(meta.get(K.Rope.SCALING_ORIG_CTX_LEN) or cfg["max_position_embeddings"])
        cfg["rope_scaling"] = {"rope_type": "longrope", "long_factor": meta.tensor(long).tolist(),
                               "short_factor": meta.tensor(short).tolist()}
        cfg["original_max_position_embeddings"] = orig
        factor = meta.get(K.Rope.SCALING_ATTN_FACTOR)
        if factor is not None:
            cfg["rope_scaling"]["attention_factor"] = factor
    return cfg


def gguf_tensor_names(hf: dict) -> dict[str, str]:
    return expand(GGUF_TABLE + _SPLIT_QKV, hf["num_hidden_layers"])


def gguf_join(hf_name: str, parts: list[torch.Tensor], hf: dict) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def gguf_metadata(arch: ArchConfig, hf: dict) -> dict:
    meta = llama_like_metadata(arch)
    window = next((w for w in arch.windows if w), None)
    if window:
        meta[K.Attention.SLIDING_WINDOW] = int(window)
    return meta


def gguf_export_names(arch: ArchConfig) -> dict:
    return export_names(GGUF_TABLE, HF_FUSED, arch, {})

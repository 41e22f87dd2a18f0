"""Qwen3 (dense): Llama with per-head RMSNorm on q and k (before RoPE) and an explicit head_dim.

Biases on q/k/v and o_proj only with `attention_bias`. Disk names as qwen2 (`self_attn.c_attn`),
plus `self_attn.q_norm.weight` / `self_attn.k_norm.weight`.
"""

from __future__ import annotations

from gguf import MODEL_TENSOR as T

from edgellm.models.config import ArchConfig, llama_like
from edgellm.models.gguf_hooks import (
    LLAMA_TABLE,
    GGUFMeta,
    expand,
    export_names,
    llama_like_config,
    llama_like_metadata,
    llama_part_rows,
    tname,
)
from edgellm.models.llama import HF_FUSED, Model, hf_rename
from edgellm.models.qwen2 import DISK_NAMES, Config, qwen_windows

__all__ = ["DISK_NAMES", "GGUF_ARCH", "HF_FUSED", "Config", "Model", "gguf_config", "gguf_export_names",
           "gguf_metadata", "gguf_tensor_names", "hf_rename", "parse_config"]


def parse_config(hf: dict) -> ArchConfig:
    cfg = llama_like(hf)  # head_dim is taken from the config when present
    cfg.qk_norm = True
    cfg.windows = qwen_windows(hf, cfg.num_layers)
    return cfg


# -- GGUF: llama.cpp's "qwen3" (qwen2's layout plus attn_q_norm / attn_k_norm) ---------------------

GGUF_ARCH = "qwen3"
GGUF_TABLE = LLAMA_TABLE + [(tname(T.ATTN_Q_NORM), "model.layers.{bid}.self_attn.q_norm"),
                            (tname(T.ATTN_K_NORM), "model.layers.{bid}.self_attn.k_norm")]


def gguf_config(meta: GGUFMeta) -> dict:
    cfg = llama_like_config(meta, "qwen3", "Qwen3ForCausalLM")
    cfg["head_dim"] = int(meta.get("{arch}.attention.key_length", cfg["hidden_size"] // cfg["num_attention_heads"]))
    return cfg


def gguf_tensor_names(hf: dict) -> dict[str, str]:
    return expand(GGUF_TABLE, hf["num_hidden_layers"])


def gguf_metadata(arch: ArchConfig, hf: dict) -> dict:
    return llama_like_metadata(arch)


def gguf_export_names(arch: ArchConfig) -> dict:
    return export_names(GGUF_TABLE, HF_FUSED, arch, llama_part_rows(arch))

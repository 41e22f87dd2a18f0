"""Qwen3 (dense): Llama with per-head RMSNorm on q and k (before RoPE) and an explicit head_dim.

Biases on q/k/v and o_proj only with `attention_bias`. Disk names as qwen2 (`self_attn.c_attn`),
plus `self_attn.q_norm.weight` / `self_attn.k_norm.weight`.
"""

from __future__ import annotations

from edgellm.models.config import ArchConfig, llama_like
from edgellm.models.llama import HF_FUSED, Model, hf_rename
from edgellm.models.qwen2 import DISK_NAMES, Config, qwen_windows

__all__ = ["DISK_NAMES", "HF_FUSED", "Config", "Model", "hf_rename", "parse_config"]


def parse_config(hf: dict) -> ArchConfig:
    cfg = llama_like(hf)  # head_dim is taken from the config when present
    cfg.qk_norm = True
    cfg.windows = qwen_windows(hf, cfg.num_layers)
    return cfg

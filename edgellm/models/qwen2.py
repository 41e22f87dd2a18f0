"""Qwen2 / Qwen2.5: Llama with biases on q/k/v (none on o_proj); tied or untied embeddings.

On disk MLC calls the fused q/k/v projection `self_attn.c_attn` (weight and bias).
"""

from __future__ import annotations

from edgellm.models.config import ArchConfig, llama_like, windows_from_layer_types
from edgellm.models.gguf_hooks import (
    LLAMA_TABLE,
    GGUFMeta,
    expand,
    export_names,
    llama_like_config,
    llama_like_metadata,
    llama_part_rows,
)
from edgellm.models.llama import HF_FUSED, Model, hf_rename
from edgellm.models.schema import HFConfig
from edgellm.validation import Int

__all__ = ["DISK_NAMES", "GGUF_ARCH", "HF_FUSED", "Config", "Model", "gguf_config", "gguf_export_names",
           "gguf_metadata", "gguf_tensor_names", "hf_rename", "parse_config", "qwen_windows"]

DISK_NAMES = [("self_attn.qkv_proj", "self_attn.c_attn")]


class Config(HFConfig):
    """Qwen2's own config.json facts: where sliding windows start."""

    use_sliding_window: bool | None = None
    max_window_layers: Int(0, 4096) | None = None


def qwen_windows(hf: dict, layers: int) -> list[int | None]:
    """Sliding windows as transformers applies them: only with `use_sliding_window`, on the
    layers `layer_types` marks (or, in older configs, from `max_window_layers` on)."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if not window:
        return [None] * layers
    if hf.get("layer_types"):
        return windows_from_layer_types(hf, layers, int(window))
    first = int(hf.get("max_window_layers") or 0)
    return [int(window) if i >= first else None for i in range(layers)]


def parse_config(hf: dict) -> ArchConfig:
    cfg = llama_like(hf)
    cfg.attention_bias, cfg.o_bias = True, False
    cfg.windows = qwen_windows(hf, cfg.num_layers)
    return cfg


# -- GGUF: llama.cpp's "qwen2" (NEOX rope, so q/k rows keep HF's order) ---------------------------

GGUF_ARCH = "qwen2"


def gguf_config(meta: GGUFMeta) -> dict:
    cfg = llama_like_config(meta, "qwen2", "Qwen2ForCausalLM")
    cfg["attention_bias"] = True
    return cfg


def gguf_tensor_names(hf: dict) -> dict[str, str]:
    return expand(LLAMA_TABLE, hf["num_hidden_layers"])


def gguf_metadata(arch: ArchConfig, hf: dict) -> dict:
    return llama_like_metadata(arch)


def gguf_export_names(arch: ArchConfig) -> dict:
    return export_names(LLAMA_TABLE, HF_FUSED, arch, llama_part_rows(arch))

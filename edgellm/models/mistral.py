"""Mistral (7B v0.1/v0.2/v0.3, and fine-tunes): Llama with a sliding window on every layer.

HF `sliding_window` (MLC-style model_config: `sliding_window_size`); null or <= 0 = full attention.
Names and fusions are llama's; MLC's Mistral has no tied variant, but a tied HF config is honoured.
"""

from __future__ import annotations

from edgellm.models.config import ArchConfig, hf_chat_window, llama_like
from edgellm.models.gguf_hooks import K
from edgellm.models.llama import (
    DISK_NAMES,
    GGUF_ARCH,
    HF_FUSED,
    Model,
    gguf_config,
    gguf_export_names,
    gguf_tensor_names,
    gguf_to_hf,
    hf_rename,
)
from edgellm.models.llama import gguf_metadata as llama_gguf_metadata

__all__ = ["DISK_NAMES", "GGUF_ARCH", "HF_FUSED", "Model", "chat_window", "gguf_config", "gguf_export_names",
           "gguf_metadata", "gguf_tensor_names", "gguf_to_hf", "hf_rename", "override_window", "parse_config"]

chat_window = hf_chat_window  # MLC's Mistral config carries the window

DEFAULT_CONTEXT = 32768  # what Mistral-7B declares; used when an MLC config says -1 (unbounded)


def parse_config(hf: dict) -> ArchConfig:
    window = hf.get("sliding_window", hf.get("sliding_window_size"))
    window = int(window) if window is not None and int(window) > 0 else None
    cfg = llama_like(hf, window)
    if cfg.max_position_embeddings <= 0:  # MLC writes context_window_size -1 with a sliding window
        cfg.max_position_embeddings = DEFAULT_CONTEXT
    return cfg


def gguf_metadata(arch: ArchConfig, hf: dict) -> dict:
    """llama's keys plus the window (llama.cpp's converter writes Mistral as llama; edgellm's reader
    turns a llama file with a sliding window back into mistral)."""
    meta = llama_gguf_metadata(arch, hf)
    window = next((w for w in arch.windows if w), None)
    if window:
        meta[K.Attention.SLIDING_WINDOW] = int(window)
    return meta


def override_window(arch: ArchConfig, size: int) -> None:
    """As MLC: a chat config's sliding_window_size turns the window on for every layer of Mistral,
    even when config.json has none."""
    arch.windows = [size] * arch.num_layers

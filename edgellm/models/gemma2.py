"""Gemma 2: Llama's attention and MLP with four norms per layer ("sandwich"), tanh soft-capping
of attention scores and of the final logits, and embeddings scaled by sqrt(hidden_size).

Gemma's RMSNorm multiplies by (1 + w); like MLC we store w + 1 on disk (added in the source
dtype at conversion), so the runtime uses a plain RMSNorm. Queries are scaled by
query_pre_attn_scalar ** -0.5. Sliding-window layers come from `layer_types`, else every even
layer (0, 2, ...) slides. The lm_head is always the embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.models.base import RMSNorm
from edgellm.models.config import ArchConfig, llama_like, windows_from_layer_types
from edgellm.models.llama import MLP, Attention, hf_rename
from edgellm.models.llama import Model as LlamaModel
from edgellm.models.schema import HFConfig
from edgellm.validation import Num

__all__ = ["DISK_NAMES", "HF_FUSED", "Model", "hf_rename", "hf_transform", "parse_config"]

HF_FUSED = {
    "self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
}
DISK_NAMES: list[tuple[str, str]] = []


class Config(HFConfig):
    """Gemma 2's own config.json facts: soft-capping and the query scale."""

    attn_logit_softcapping: Num() | None = None
    final_logit_softcapping: Num() | None = None
    query_pre_attn_scalar: Num() | None = None


def parse_config(hf: dict) -> ArchConfig:
    cfg = llama_like(hf)
    cfg.hidden_act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    cfg.tie_word_embeddings = True
    cfg.attention_bias = cfg.o_bias = False
    window = int(hf["sliding_window"]) if hf.get("sliding_window") else None
    if hf.get("layer_types"):
        cfg.windows = windows_from_layer_types(hf, cfg.num_layers, window)
    else:
        cfg.windows = [window if i % 2 == 0 else None for i in range(cfg.num_layers)]
    cfg.attn_softcap = hf.get("attn_logit_softcapping") or None
    cfg.final_softcap = hf.get("final_logit_softcapping") or None
    cfg.query_scale = float(hf.get("query_pre_attn_scalar") or cfg.head_dim) ** -0.5
    return cfg


def hf_transform(name: str, tensor: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
    """(1 + w) norms -> plain norms: add 1 in the checkpoint's dtype, as MLC does."""
    return tensor + 1 if name.endswith("norm.weight") else tensor


class Block(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int, mode, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer, mode, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg, mode, dtype)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x, cos, sin, step, cache):
        h = self.self_attn(self.input_layernorm(x), cos, sin, step, cache)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Model(LlamaModel):
    block = Block
    native_decoder = None  # sandwich norms and soft-capping: no native decode step (yet)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        # transformers rounds the scale to the activation dtype before multiplying.
        return x * torch.tensor(self.cfg.hidden_size**0.5, dtype=x.dtype, device=x.device)

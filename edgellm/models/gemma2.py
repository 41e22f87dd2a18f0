"""Gemma 2: Llama's attention and MLP with four norms per layer ("sandwich"), tanh soft-capping
of attention scores and of the final logits, and embeddings scaled by sqrt(hidden_size).

Gemma's RMSNorm multiplies by (1 + w); like MLC we store w + 1 on disk (added in the source
dtype at conversion), so the runtime uses a plain RMSNorm. Queries are scaled by
query_pre_attn_scalar ** -0.5. Sliding-window layers come from `layer_types`, else every even
layer (0, 2, ...) slides. The lm_head is always the embedding.
"""

from __future__ import annotations

import torch
from gguf import MODEL_TENSOR as T
from torch import nn

from edgellm.errors import UserError
from edgellm.models.base import RMSNorm
from edgellm.models.config import ArchConfig, hf_chat_window, llama_like, windows_from_layer_types
from edgellm.models.gguf_hooks import (
    LLAMA_TABLE,
    GGUFMeta,
    K,
    expand,
    export_names,
    llama_like_config,
    llama_like_metadata,
    llama_part_rows,
    tname,
)
from edgellm.models.llama import MLP, Attention, hf_rename
from edgellm.models.llama import Model as LlamaModel
from edgellm.models.schema import HFConfig
from edgellm.validation import Num

__all__ = ["DISK_NAMES", "GGUF_ARCH", "HF_FUSED", "Model", "chat_window", "gguf_config", "gguf_export_names",
           "gguf_metadata", "gguf_tensor_names", "gguf_to_hf", "hf_rename", "hf_transform", "parse_config"]

chat_window = hf_chat_window  # MLC's Gemma 2 config carries the window

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


# -- GGUF: llama.cpp's "gemma2" -------------------------------------------------------------------
# Its norms hold 1 + w, as ours do on disk (its converter adds 1); HF's hold w. The query scale is
# not stated: llama.cpp uses head_dim ** -0.5, or (hidden / heads) ** -0.5 for the 46-layer 27B, and
# every even layer slides with `attention.sliding_window`.

GGUF_ARCH = "gemma2"
GGUF_TABLE = [(g, h) for g, h in LLAMA_TABLE if h not in ("lm_head", "model.layers.{bid}.post_attention_layernorm")] + [
    (tname(T.ATTN_POST_NORM), "model.layers.{bid}.post_attention_layernorm"),
    (tname(T.FFN_PRE_NORM), "model.layers.{bid}.pre_feedforward_layernorm"),
    (tname(T.FFN_POST_NORM), "model.layers.{bid}.post_feedforward_layernorm"),
]


def _gguf_query_scalar(hidden: int, heads: int, head_dim: int, layers: int) -> int:
    return hidden // heads if layers == 46 else head_dim  # llama.cpp's LLM_TYPE_27B rule


def gguf_config(meta: GGUFMeta) -> dict:
    cfg = llama_like_config(meta, "gemma2", "Gemma2ForCausalLM")
    hidden, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    head_dim = cfg.setdefault("head_dim", hidden // heads)
    cfg.update({
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "query_pre_attn_scalar": _gguf_query_scalar(hidden, heads, head_dim, layers),
        "attn_logit_softcapping": meta.get(K.LLM.ATTN_LOGIT_SOFTCAPPING, 50.0),
        "final_logit_softcapping": meta.get(K.LLM.FINAL_LOGIT_SOFTCAPPING, 30.0),
        "sliding_window": int(meta.get(K.Attention.SLIDING_WINDOW, 4096)),
    })
    return cfg


def gguf_tensor_names(hf: dict) -> dict[str, str]:
    return expand(GGUF_TABLE, hf["num_hidden_layers"])


def gguf_to_hf(gguf_name: str, tensor: torch.Tensor, hf: dict) -> torch.Tensor:
    return tensor - 1 if gguf_name.endswith("norm.weight") else tensor


def gguf_metadata(arch: ArchConfig, hf: dict) -> dict:
    expected = _gguf_query_scalar(arch.hidden_size, arch.num_heads, arch.head_dim, arch.num_layers) ** -0.5
    if abs(arch.scale - expected) > 1e-6 * expected:
        raise UserError(f"gemma2 query_pre_attn_scalar {round(arch.scale ** -2, 4)} cannot be stated in GGUF "
                        f"(llama.cpp uses {round(expected ** -2)} for this model's shape)")
    window = next((w for w in arch.windows if w), None)
    pattern = [window if i % 2 == 0 else None for i in range(arch.num_layers)]
    if window and arch.windows != pattern:
        raise UserError("gemma2 sliding windows other than every even layer cannot be stated in GGUF")
    meta = llama_like_metadata(arch)
    meta.update({K.Attention.SLIDING_WINDOW: int(window or arch.max_position_embeddings),
                 K.LLM.ATTN_LOGIT_SOFTCAPPING: float(arch.attn_softcap or 0.0),
                 K.LLM.FINAL_LOGIT_SOFTCAPPING: float(arch.final_softcap or 0.0)})
    return meta


def gguf_export_names(arch: ArchConfig) -> dict:
    return export_names(GGUF_TABLE, HF_FUSED, arch, llama_part_rows(arch))


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

    def layer_spec(self, blk: nn.Module):
        """Llama's layer with post norms; soft-capping, the query scale and the embedding scale are
        the model's (EModel.softcap, cfg.scale, `embed`)."""
        from edgellm.models.fused_decode import LayerSpec

        if type(blk) is not Block or type(blk.self_attn) is not Attention or type(blk.mlp) is not MLP:
            return None
        at = blk.self_attn
        return LayerSpec(blk.input_layernorm, blk.pre_feedforward_layernorm, at.qkv_proj, at.o_proj,
                         blk.mlp.gate_up_proj, blk.mlp.down_proj, blk.mlp.act, window=at.window,
                         post_attn_norm=blk.post_attention_layernorm, post_mlp_norm=blk.post_feedforward_layernorm)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        # transformers rounds the scale to the activation dtype before multiplying.
        return x * torch.tensor(self.cfg.hidden_size**0.5, dtype=x.dtype, device=x.device)

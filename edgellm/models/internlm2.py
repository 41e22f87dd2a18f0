"""InternLM2 / InternLM2.5: Llama's math under other names (trust_remote_code checkpoints).

HF names -> ours: tok_embeddings -> embed_tokens, attention.wqkv -> self_attn.qkv_proj,
attention.wo -> self_attn.o_proj, feed_forward.{w1,w3} -> mlp.gate_up_proj ([w1; w3]),
feed_forward.w2 -> mlp.down_proj, attention_norm / ffn_norm -> input / post_attention_layernorm,
output -> lm_head. HF's wqkv is grouped per KV head: for each group, its G = heads / kv_heads
query heads, then its key head, then its value head. Conversion regroups it into [all q; all k;
all v] (as MLC does for the weight), then writes MLC's names (`attention.wqkv`, ...).
With `bias: true` the wqkv bias is regrouped the same way (MLC copies it as is, which looks like a
bug on their side; no released InternLM2 has biases).
"""

from __future__ import annotations

import torch
from gguf import MODEL_TENSOR as T
from torch import nn

from edgellm.models.config import ArchConfig, llama_like
from edgellm.models.gguf_hooks import (
    GGUFMeta,
    expand,
    llama_like_config,
    llama_like_metadata,
    tname,
    unpermute_llama_qk,
)
from edgellm.models.llama import Model as LlamaModel
from edgellm.models.llama import gguf_export_names
from edgellm.models.schema import HFConfig
from edgellm.quantization.layers import make_linear
from edgellm.quantization.modes import QuantMode

__all__ = ["DISK_NAMES", "GGUF_ARCH", "HF_FUSED", "Model", "gguf_config", "gguf_export_names", "gguf_join",
           "gguf_metadata", "gguf_tensor_names", "gguf_to_hf", "hf_rename", "hf_transform", "parse_config"]

HF_FUSED = {"mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"]}
# Our names -> MLC's on disk (which are HF's, except the fused gate_up_proj).
DISK_NAMES = [
    ("model.embed_tokens.", "model.tok_embeddings."),
    (".self_attn.qkv_proj.", ".attention.wqkv."),
    (".self_attn.o_proj.", ".attention.wo."),
    (".mlp.gate_up_proj.", ".feed_forward.gate_up_proj."),
    (".mlp.down_proj.", ".feed_forward.w2."),
    (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
    ("lm_head.", "output."),
]
# HF's names -> ours before fusion: the disk renames backwards, plus the two halves of gate_up.
_HF_RENAMES = [(disk, ours) for ours, disk in DISK_NAMES] + [
    (".feed_forward.w1.", ".mlp.gate_proj."), (".feed_forward.w3.", ".mlp.up_proj.")]


class Config(HFConfig):
    """InternLM2's own config.json facts: one `bias` flag for the attention projections."""

    bias: bool | None = None


def parse_config(hf: dict) -> ArchConfig:
    cfg = llama_like(hf)
    cfg.attention_bias = cfg.o_bias = bool(hf.get("bias", False))
    cfg.mlp_bias = False
    return cfg


def hf_rename(name: str) -> str | None:
    if "rotary_emb.inv_freq" in name:
        return None
    for theirs, ours in _HF_RENAMES:
        name = name.replace(theirs, ours)
    return name


def hf_transform(name: str, tensor: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
    """Regroup wqkv rows [KVH, (G q heads, k, v), D] into [all q; all k; all v]."""
    if ".self_attn.qkv_proj." not in name:
        return tensor
    kvh, g = arch.num_kv_heads, arch.num_heads // arch.num_kv_heads
    grouped = tensor.reshape(kvh, g + 2, arch.head_dim, -1)
    q, k, v = grouped[:, :g], grouped[:, g], grouped[:, g + 1]
    return torch.cat([q.reshape(-1, grouped.shape[-1]), k.reshape(-1, grouped.shape[-1]),
                      v.reshape(-1, grouped.shape[-1])]).reshape(tensor.shape)


# -- GGUF: llama.cpp's "internlm2" splits wqkv into llama's attn_q/k/v (q/k rows permuted as llama's)
# and renames w1/w3/w2 to ffn_gate/up/down. Reading joins q, k, v back into HF's grouped wqkv; our
# tensors already have llama's names and layout, so export is llama's.

GGUF_ARCH = "internlm2"
gguf_to_hf = unpermute_llama_qk
GGUF_TABLE = [
    (tname(T.TOKEN_EMBD), "model.tok_embeddings"),
    (tname(T.OUTPUT_NORM), "model.norm"),
    (tname(T.OUTPUT), "output"),
    (tname(T.ATTN_NORM), "model.layers.{bid}.attention_norm"),
    (tname(T.ATTN_Q), "model.layers.{bid}.attention.wqkv"),
    (tname(T.ATTN_K), "model.layers.{bid}.attention.wqkv"),
    (tname(T.ATTN_V), "model.layers.{bid}.attention.wqkv"),
    (tname(T.ATTN_OUT), "model.layers.{bid}.attention.wo"),
    (tname(T.FFN_NORM), "model.layers.{bid}.ffn_norm"),
    (tname(T.FFN_GATE), "model.layers.{bid}.feed_forward.w1"),
    (tname(T.FFN_UP), "model.layers.{bid}.feed_forward.w3"),
    (tname(T.FFN_DOWN), "model.layers.{bid}.feed_forward.w2"),
]


def gguf_config(meta: GGUFMeta) -> dict:
    cfg = llama_like_config(meta, "internlm2", "InternLM2ForCausalLM")
    cfg["bias"] = cfg.pop("attention_bias")
    return cfg


def gguf_tensor_names(hf: dict) -> dict[str, str]:
    return expand(GGUF_TABLE, hf["num_hidden_layers"])


def gguf_join(hf_name: str, parts: list[torch.Tensor], hf: dict) -> torch.Tensor:
    """q [H*D, ...], k, v [KVH*D, ...] -> HF's wqkv, grouped per KV head: (its G q heads, k, v)."""
    q, k, v = parts
    kvh = hf["num_key_value_heads"]
    g = hf["num_attention_heads"] // kvh
    rest = q.shape[1:]
    groups = [q.reshape(kvh, g, -1, *rest), k.reshape(kvh, 1, -1, *rest), v.reshape(kvh, 1, -1, *rest)]
    return torch.cat(groups, dim=1).reshape(-1, *rest)


def gguf_metadata(arch: ArchConfig, hf: dict) -> dict:
    return llama_like_metadata(arch)


class Model(LlamaModel):
    @staticmethod
    def build_lm_head(cfg: ArchConfig, mode: QuantMode | None, dtype: torch.dtype) -> nn.Module:
        # MLC quantizes `output` like any linear, even in q4f16_2 (it is not on MLC's list of
        # final layers that mode keeps in float16).
        return make_linear(cfg.hidden_size, cfg.vocab_size, False, mode, dtype)

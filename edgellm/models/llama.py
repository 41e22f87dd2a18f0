"""Llama (Llama-2/3/3.1/3.2, SmolLM2, TinyLlama); its layers are reused by the other families.

Fused projections: qkv_proj = [q; k; v] rows, gate_up_proj = [gate; up] rows.
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.models.base import ACTIVATIONS, CausalLM, KVCacheLike, RMSNorm, Step, apply_rope
from edgellm.models.config import ArchConfig, llama_like
from edgellm.models.gguf_hooks import (
    LLAMA_TABLE,
    GGUFMeta,
    K,
    expand,
    export_names,
    llama_like_config,
    llama_like_metadata,
    llama_part_rows,
    unpermute_llama_qk,
)
from edgellm.quantization.layers import make_embedding, make_linear, make_lm_head
from edgellm.quantization.modes import QuantMode

# HF tensors fused into one of ours: ours -> HF parts, in row order.
HF_FUSED = {
    "self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
}
# Our names -> MLC-LLM's names on disk (substring renames); none for llama.
DISK_NAMES: list[tuple[str, str]] = []


def parse_config(hf: dict) -> ArchConfig:
    return llama_like(hf)


def hf_rename(name: str) -> str | None:
    """HF tensor name -> ours (before fusion); None drops it."""
    return None if "rotary_emb.inv_freq" in name else name


# -- GGUF (llama.cpp's "llama" architecture; Mistral files use it too) ---------------------------

GGUF_ARCH = "llama"
# llama.cpp's converter permutes q/k rows for its GPT-J style rope: undone on read, redone on export.
gguf_to_hf = unpermute_llama_qk


def gguf_config(meta: GGUFMeta) -> dict:
    """HF config.json from a llama GGUF; a sliding window (Mistral's) makes it a mistral model."""
    cfg = llama_like_config(meta, "llama", "LlamaForCausalLM")
    window = meta.get(K.Attention.SLIDING_WINDOW)
    if window:
        cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=int(window))
    return cfg


def gguf_tensor_names(hf: dict) -> dict[str, str]:
    """GGUF tensor base name -> HF base name."""
    return expand(LLAMA_TABLE, hf["num_hidden_layers"])


def gguf_metadata(arch: ArchConfig, hf: dict) -> dict:
    return llama_like_metadata(arch)


def gguf_export_names(arch: ArchConfig) -> dict:
    """Our tensor base name -> [(GGUF base name, rows of ours)]: q/k/v and gate/up split, q/k permuted."""
    return export_names(LLAMA_TABLE, HF_FUSED, arch, llama_part_rows(arch),
                        {"self_attn.q_proj": arch.num_heads, "self_attn.k_proj": arch.num_kv_heads})


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int, mode: QuantMode | None, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.layer, self.window = cfg, layer, cfg.windows[layer] if cfg.windows else None
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = make_linear(cfg.hidden_size, q_out + 2 * kv_out, cfg.attention_bias, mode, dtype)
        self.o_proj = make_linear(q_out, cfg.hidden_size, cfg.o_bias, mode, dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.split_sizes = [q_out, kv_out, kv_out]

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, (H + 2 KVH) D] -> q [T, H, D], k, v [T, KVH, D]."""
        t, c = qkv.shape[0], self.cfg
        q, k, v = qkv.split(self.split_sizes, dim=-1)
        return (q.view(t, c.num_heads, c.head_dim), k.view(t, c.num_kv_heads, c.head_dim),
                v.view(t, c.num_kv_heads, c.head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step,
                cache: KVCacheLike) -> torch.Tensor:
        q, k, v = self.split_qkv(self.qkv_proj(x))
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = cache.attend(self.layer, q, k, v, step, scale=self.cfg.scale, window=self.window,
                         softcap=self.cfg.attn_softcap)
        return self.o_proj(o.reshape(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig, mode: QuantMode | None, dtype: torch.dtype):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = make_linear(cfg.hidden_size, 2 * self.inter, cfg.mlp_bias, mode, dtype)
        self.down_proj = make_linear(self.inter, cfg.hidden_size, cfg.mlp_bias, mode, dtype)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        # in place: a 512-token prefill of a 1.5B model saves an 18 MB temporary per layer
        return self.down_proj(self.act(gate).mul_(up))


class Block(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int, mode: QuantMode | None, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer, mode, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg, mode, dtype)

    def forward(self, x, cos, sin, step, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Inner(nn.Module):
    """The `model.` prefix of HF names."""

    def __init__(self, cfg: ArchConfig, mode: QuantMode | None, dtype: torch.dtype, block=Block):
        super().__init__()
        self.embed_tokens = make_embedding(cfg.vocab_size, cfg.hidden_size, mode, dtype)
        self.layers = nn.ModuleList(block(cfg, i, mode, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Model(CausalLM):
    """Causal LM under HF's Llama names (mistral, qwen2/3, phi3, gemma2, internlm2 subclass it)."""

    PARTS = ("model.embed_tokens", "model.layers", "model.norm", "lm_head")

    block = Block

    def build(self, cfg: ArchConfig, mode: QuantMode | None, dtype: torch.dtype) -> None:
        self.model = Inner(cfg, mode, dtype, self.block)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.build_lm_head(cfg, mode, dtype)

    @staticmethod
    def build_lm_head(cfg: ArchConfig, mode: QuantMode | None, dtype: torch.dtype) -> nn.Module:
        """The untied output layer (a family may quantize it differently)."""
        return make_lm_head(cfg.hidden_size, cfg.vocab_size, mode, dtype)

    def fused_layers(self) -> list | None:
        specs = [self.layer_spec(blk) for blk in self.blocks]
        return None if any(s is None for s in specs) else specs

    def layer_spec(self, blk: nn.Module):
        """One block as a `fused_decode.LayerSpec`, or None when it is not this family's own block
        (a family with another block shape overrides this)."""
        from edgellm.models.fused_decode import LayerSpec

        if type(blk) is not Block or type(blk.self_attn) is not Attention or type(blk.mlp) is not MLP:
            return None
        at = blk.self_attn
        return LayerSpec(blk.input_layernorm, blk.post_attention_layernorm, at.qkv_proj, at.o_proj,
                         blk.mlp.gate_up_proj, blk.mlp.down_proj, blk.mlp.act, window=at.window,
                         q_norm=getattr(at, "q_norm", None), k_norm=getattr(at, "k_norm", None))

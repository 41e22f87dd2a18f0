"""GPT-NeoX (Pythia, RedPajama-INCITE): LayerNorm with bias, biases on every linear, GELU MLP,
partial rotary embeddings (`rotary_pct`), parallel or sequential residual.

Our names, HF's and MLC's on-disk names are the same (`gpt_neox.embed_in`, `embed_out`, ...),
except that HF interleaves query_key_value per head ([q_h; k_h; v_h] for each head h); conversion
relays it out to [all q; all k; all v] as MLC does. transformers >= 5 calls `embed_out` `lm_head`
in memory, so a state dict saved without its rename map has `lm_head.*`; both are accepted.
MLC keeps the two MLP biases in float32 on disk whatever the quantization; `FLOAT32_TENSORS` lists
them for the converter (the runtime casts them to the model dtype when loading).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import MODEL_TENSOR as T
from torch import nn

from edgellm.errors import UserError
from edgellm.models.base import ACTIVATIONS, CausalLM, KVCacheLike, Step, apply_rope
from edgellm.models.config import ArchConfig, require
from edgellm.models.gguf_hooks import GGUFMeta, K, expand, export_names, rope_metadata, special_token_ids, tname
from edgellm.models.rope import rope_parameters
from edgellm.models.schema import HFConfig
from edgellm.quantization.layers import make_embedding, make_linear, make_lm_head
from edgellm.quantization.modes import QuantMode
from edgellm.validation import Num

HF_FUSED: dict[str, list[str]] = {}  # query_key_value is fused already
DISK_NAMES: list[tuple[str, str]] = []
FLOAT32_TENSORS = ("mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.bias")  # MLC's ffn_out_dtype
_UNUSED = ("rotary_emb.inv_freq", "attention.masked_bias", "attention.bias")


class Config(HFConfig):
    """GPT-NeoX's own config.json facts."""

    rotary_pct: Num(0.0, 1.0) | None = None
    rotary_emb_base: Num() | None = None
    use_parallel_residual: bool | None = None


def parse_config(hf: dict) -> ArchConfig:
    hidden = int(require(hf, "hidden_size"))
    heads = int(require(hf, "num_attention_heads"))
    layers = int(require(hf, "num_hidden_layers"))
    head_dim = hidden // heads
    rope = rope_parameters(hf)
    pct = float(hf.get("rotary_pct") or rope.get("partial_rotary_factor") or 0.25)
    rotary_dim = int(head_dim * pct)
    return ArchConfig(
        hidden_size=hidden,
        intermediate_size=int(hf.get("intermediate_size") or 4 * hidden),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        vocab_size=int(require(hf, "vocab_size")),
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        rope=rope,
        max_position_embeddings=int(hf.get("max_position_embeddings") or hf.get("context_window_size")
                                    or 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", True)),
        o_bias=bool(hf.get("attention_bias", True)),
        mlp_bias=True,
        hidden_act=hf.get("hidden_act") or "gelu",
        windows=[None] * layers,
        rotary_dim=rotary_dim if rotary_dim != head_dim else 0,
        extra={"use_parallel_residual": bool(hf.get("use_parallel_residual", True))},
    )


def hf_rename(name: str) -> str | None:
    if name.endswith(_UNUSED):
        return None
    return "embed_out." + name[len("lm_head."):] if name.startswith("lm_head.") else name


def hf_transform(name: str, tensor: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
    """query_key_value rows [H, (q, k, v), D] -> [(q, k, v), H, D]."""
    if ".attention.query_key_value." not in name:
        return tensor
    per_head = tensor.reshape(arch.num_heads, 3, arch.head_dim, -1)
    return per_head.transpose(0, 1).reshape(tensor.shape)


# -- GGUF: llama.cpp's "gptneox" stores query_key_value as [all q; all k; all v] (its converter
# regroups HF's per-head layout, as we do), NEOX rope, no permutation.

GGUF_ARCH = "gptneox"
GGUF_OUTPUT_REQUIRED = True  # llama.cpp's gptneox needs output.weight: a tied model writes a copy
GGUF_TABLE = [
    (tname(T.TOKEN_EMBD), "gpt_neox.embed_in"),
    (tname(T.OUTPUT_NORM), "gpt_neox.final_layer_norm"),
    (tname(T.OUTPUT), "embed_out"),
    (tname(T.ATTN_NORM), "gpt_neox.layers.{bid}.input_layernorm"),
    (tname(T.ATTN_QKV), "gpt_neox.layers.{bid}.attention.query_key_value"),
    (tname(T.ATTN_OUT), "gpt_neox.layers.{bid}.attention.dense"),
    (tname(T.FFN_NORM), "gpt_neox.layers.{bid}.post_attention_layernorm"),
    (tname(T.FFN_UP), "gpt_neox.layers.{bid}.mlp.dense_h_to_4h"),
    (tname(T.FFN_DOWN), "gpt_neox.layers.{bid}.mlp.dense_4h_to_h"),
]


def gguf_config(meta: GGUFMeta) -> dict:
    hidden = int(meta.required(K.LLM.EMBEDDING_LENGTH))
    heads = int(meta.single(K.Attention.HEAD_COUNT))
    embd = meta.shapes.get(tname(T.TOKEN_EMBD) + ".weight")
    if embd is None:
        raise UserError(f"{meta.path}: no token_embd.weight tensor")
    rope_dim = int(meta.get(K.Rope.DIMENSION_COUNT, hidden // heads))
    theta = meta.get(K.Rope.FREQ_BASE, 10000.0)
    cfg = {
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"],
        "hidden_size": hidden, "num_attention_heads": heads,
        "num_hidden_layers": int(meta.required(K.LLM.BLOCK_COUNT)),
        "intermediate_size": int(meta.get(K.LLM.FEED_FORWARD_LENGTH, 4 * hidden)),
        "vocab_size": int(embd[0]),
        "layer_norm_eps": meta.get(K.Attention.LAYERNORM_EPS, 1e-5),
        "rotary_pct": rope_dim / (hidden // heads), "rotary_emb_base": theta, "rope_theta": theta,
        "use_parallel_residual": bool(meta.get(K.LLM.USE_PARALLEL_RESIDUAL, True)),
        "max_position_embeddings": int(meta.get(K.LLM.CONTEXT_LENGTH, 2048)),
        "tie_word_embeddings": not meta.has(tname(T.OUTPUT) + ".weight"),
        "attention_bias": meta.has("blk.0.attn_qkv.bias"),
        "hidden_act": "gelu", "torch_dtype": "float32",
    }
    cfg.update(special_token_ids(meta))
    return cfg


def gguf_tensor_names(hf: dict) -> dict[str, str]:
    return expand(GGUF_TABLE, hf["num_hidden_layers"])


def gguf_to_hf(gguf_name: str, tensor: torch.Tensor, hf: dict) -> torch.Tensor:
    """attn_qkv rows [(q, k, v), H, D] -> HF's [H, (q, k, v), D]."""
    if ".attn_qkv." not in gguf_name:
        return tensor
    heads = hf["num_attention_heads"]
    return tensor.reshape(3, heads, -1, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def gguf_metadata(arch: ArchConfig, hf: dict) -> dict:
    meta = {
        K.LLM.VOCAB_SIZE: arch.vocab_size,
        K.LLM.CONTEXT_LENGTH: arch.max_position_embeddings,
        K.LLM.EMBEDDING_LENGTH: arch.hidden_size,
        K.LLM.BLOCK_COUNT: arch.num_layers,
        K.LLM.FEED_FORWARD_LENGTH: arch.intermediate_size,
        K.LLM.USE_PARALLEL_RESIDUAL: bool(arch.extra["use_parallel_residual"]),
        K.Attention.HEAD_COUNT: arch.num_heads,
        K.Attention.HEAD_COUNT_KV: arch.num_kv_heads,
        K.Attention.LAYERNORM_EPS: float(arch.norm_eps),
        K.Rope.DIMENSION_COUNT: arch.rot_dim,
        K.Rope.FREQ_BASE: float(arch.rope["rope_theta"]),
    }
    meta.update(rope_metadata(arch))
    return meta


def gguf_export_names(arch: ArchConfig) -> dict:
    return export_names(GGUF_TABLE, HF_FUSED, arch, {})


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def layer_norm(cfg: ArchConfig, dtype: torch.dtype) -> LayerNorm:
    return LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype).requires_grad_(False)


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int, mode: QuantMode | None, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, qd = cfg.hidden_size, cfg.num_heads * cfg.head_dim  # qd < h on a tensor-parallel shard
        self.query_key_value = make_linear(h, 3 * qd, cfg.attention_bias, mode, dtype)
        self.dense = make_linear(qd, h, cfg.o_bias, mode, dtype)

    def forward(self, x, cos, sin, step: Step, cache: KVCacheLike) -> torch.Tensor:
        t, c = x.shape[0], self.cfg
        q, k, v = self.query_key_value(x).view(t, 3, c.num_heads, c.head_dim).unbind(1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = cache.attend(self.layer, q, k, v, step, scale=c.scale)
        return self.dense(o.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig, mode: QuantMode | None, dtype: torch.dtype):
        super().__init__()
        self.dense_h_to_4h = make_linear(cfg.hidden_size, cfg.intermediate_size, True, mode, dtype)
        self.dense_4h_to_h = make_linear(cfg.intermediate_size, cfg.hidden_size, True, mode, dtype)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int, mode: QuantMode | None, dtype: torch.dtype):
        super().__init__()
        self.parallel = cfg.extra["use_parallel_residual"]
        self.input_layernorm = layer_norm(cfg, dtype)
        self.attention = Attention(cfg, layer, mode, dtype)
        self.post_attention_layernorm = layer_norm(cfg, dtype)
        self.mlp = MLP(cfg, mode, dtype)

    def forward(self, x, cos, sin, step, cache):
        attn = self.attention(self.input_layernorm(x), cos, sin, step, cache)
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x)) + x


class Inner(nn.Module):
    """The `gpt_neox.` prefix of HF names."""

    def __init__(self, cfg: ArchConfig, mode: QuantMode | None, dtype: torch.dtype):
        super().__init__()
        self.embed_in = make_embedding(cfg.vocab_size, cfg.hidden_size, mode, dtype)
        self.layers = nn.ModuleList(Block(cfg, i, mode, dtype) for i in range(cfg.num_layers))
        self.final_layer_norm = layer_norm(cfg, dtype)


class Model(CausalLM):
    """Causal LM under HF's GPT-NeoX names (only the blocks differ from Llama's)."""

    PARTS = ("gpt_neox.embed_in", "gpt_neox.layers", "gpt_neox.final_layer_norm", "embed_out")

    def build(self, cfg: ArchConfig, mode: QuantMode | None, dtype: torch.dtype) -> None:
        self.gpt_neox = Inner(cfg, mode, dtype)
        if not cfg.tie_word_embeddings:
            self.embed_out = make_lm_head(cfg.hidden_size, cfg.vocab_size, mode, dtype)

    def fused_layers(self) -> list | None:
        """LayerNorm pre-norms, a plain gelu MLP, the residual parallel or not (per config)."""
        from edgellm.models.fused_decode import LayerSpec

        specs = []
        for blk in self.blocks:
            if type(blk) is not Block or type(blk.attention) is not Attention or type(blk.mlp) is not MLP:
                return None
            specs.append(LayerSpec(blk.input_layernorm, blk.post_attention_layernorm, blk.attention.query_key_value,
                                   blk.attention.dense, blk.mlp.dense_h_to_4h, blk.mlp.dense_4h_to_h, blk.mlp.act,
                                   gated=False, parallel=bool(blk.parallel)))
        return specs

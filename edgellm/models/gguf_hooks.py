"""What the families' GGUF hooks share: metadata access, llama.cpp's name tables, row layouts.

Each family module states its own GGUF knowledge (see registry.py): `GGUF_ARCH`, `gguf_config(meta)`
(GGUF metadata -> HF config.json), `gguf_tensor_names(hf)` (GGUF tensor -> HF tensor),
optionally `gguf_to_hf(gguf_name, tensor, hf)` / `gguf_join(hf_name, parts, hf)` for layouts
llama.cpp changed, and for export `gguf_metadata(arch, hf)` and `gguf_export_names(arch)`
(our tensor -> GGUF tensors and the rows of ours each one takes). This module only holds the
pieces several families use, keyed by llama.cpp's own constants from the `gguf` package.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR as T

from edgellm.errors import UserError
from edgellm.models.config import ArchConfig

K = gguf.Keys


def tname(kind: T) -> str:
    """llama.cpp's tensor name template for `kind` (e.g. "blk.{bid}.attn_q")."""
    return gguf.TENSOR_NAMES[kind]


def _float32_value(value: float) -> float:
    # GGUF stores these as float32: 1e-5 reads back as 9.99999974738e-06. The shortest
    # decimal that round-trips through float32 is the value the original config.json held.
    return float(str(np.float32(value)))


class GGUFMeta:
    """A GGUF file's metadata and tensor shapes, with `{arch}` in keys filled in."""

    def __init__(self, path: str, arch: str, fields: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 load: Callable[[str], np.ndarray]):
        self.path, self.arch, self.fields, self.shapes, self._load = path, arch, fields, shapes, load

    def get(self, key: str, default: Any = None) -> Any:
        value = self.fields.get(key.format(arch=self.arch))
        if value is None:
            return default
        return _float32_value(value) if isinstance(value, float) else value

    def required(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UserError(f"{self.path}: GGUF metadata lacks {key.format(arch=self.arch)}")
        return value

    def has(self, tensor: str) -> bool:
        return tensor in self.shapes

    def tensor(self, name: str) -> np.ndarray:
        """A small tensor (rope factors) dequantized to float64, flattened."""
        return self._load(name).astype(np.float64).reshape(-1)

    def single(self, key: str, default: Any = None) -> Any:
        """A value some files store once per layer; these families need one."""
        value = self.get(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise UserError(f"{self.path}: per-layer values of {key.format(arch=self.arch)} are not supported")
            value = value[0]
        return value


# -- reading -----------------------------------------------------------------------------------

def expand(table: list[tuple[str, str]], n_layers: int) -> dict[str, str]:
    """Name templates ({bid} = layer) -> one entry per layer."""
    out: dict[str, str] = {}
    for g, h in table:
        for bid in range(n_layers) if "{bid}" in g else [0]:
            out[g.format(bid=bid)] = h.format(bid=bid)
    return out


def llama_like_config(meta: GGUFMeta, model_type: str, architecture: str) -> dict[str, Any]:
    """HF config fields every llama-shaped architecture states the same way in GGUF."""
    hidden = int(meta.required(K.LLM.EMBEDDING_LENGTH))
    heads = int(meta.single(K.Attention.HEAD_COUNT))
    if heads <= 0:
        raise UserError(f"{meta.path}: attention.head_count is {heads}")
    kv_heads = int(meta.single(K.Attention.HEAD_COUNT_KV, heads))
    embd = meta.shapes.get(tname(T.TOKEN_EMBD) + ".weight")
    if embd is None:
        raise UserError(f"{meta.path}: no token_embd.weight tensor")
    head_dim = int(meta.get(K.Attention.KEY_LENGTH, hidden // heads))
    rope_dim = int(meta.get(K.Rope.DIMENSION_COUNT, head_dim))
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [architecture],
        "hidden_size": hidden,
        "intermediate_size": int(meta.single(K.LLM.FEED_FORWARD_LENGTH)),
        "num_hidden_layers": int(meta.required(K.LLM.BLOCK_COUNT)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": int(embd[0]),
        "hidden_act": "silu",
        "rms_norm_eps": meta.get(K.Attention.LAYERNORM_RMS_EPS, 1e-6),
        "rope_theta": meta.get(K.Rope.FREQ_BASE, 10000.0),
        "max_position_embeddings": int(meta.get(K.LLM.CONTEXT_LENGTH, 2048)),
        "tie_word_embeddings": not meta.has(tname(T.OUTPUT) + ".weight"),
        "attention_bias": meta.has("blk.0.attn_q.bias"),
        "torch_dtype": "float32",
    }
    if head_dim != hidden // heads:
        cfg["head_dim"] = head_dim
    if rope_dim != head_dim:
        cfg["partial_rotary_factor"] = rope_dim / head_dim
    scaling = rope_scaling(meta, rope_dim, cfg["rope_theta"])
    if scaling:
        cfg["rope_scaling"] = scaling
    cfg.update(special_token_ids(meta))
    return cfg


def special_token_ids(meta: GGUFMeta) -> dict[str, Any]:
    # Llama 3 style files name end-of-turn tokens besides eos; HF lists them all as eos ids.
    stops = [meta.get(k) for k in (K.Tokenizer.EOS_ID, K.Tokenizer.EOT_ID, K.Tokenizer.EOM_ID)]
    stops = list(dict.fromkeys(t for t in stops if t is not None))
    out = {}
    for key, value in (("bos_token_id", meta.get(K.Tokenizer.BOS_ID)),
                       ("eos_token_id", stops[0] if len(stops) == 1 else stops or None),
                       ("pad_token_id", meta.get(K.Tokenizer.PAD_ID))):
        if value is not None:
            out[key] = value
    return out


def rope_scaling(meta: GGUFMeta, rope_dim: int, theta: float) -> dict[str, Any] | None:
    """HF rope_scaling from the scaling keys or llama3's rope_freqs tensor."""
    orig_ctx = meta.get(K.Rope.SCALING_ORIG_CTX_LEN)
    freqs = tname(T.ROPE_FREQS) + ".weight"
    if meta.has(freqs):
        return _llama3_scaling(meta, meta.tensor(freqs), rope_dim, theta, int(orig_ctx or 8192))
    kind = meta.get(K.Rope.SCALING_TYPE)
    factor = meta.get(K.Rope.SCALING_FACTOR) or meta.get("{arch}.rope.scale_linear")
    if kind is None and factor and factor != 1.0:
        kind = "linear"  # older files state only a linear factor
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise UserError(f"{meta.path}: rope scaling type {kind!r} is not supported (supported: linear, yarn, "
                        "llama3 rope_freqs, phi3 longrope factors)")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": factor}
    if orig_ctx:
        scaling["original_max_position_embeddings"] = int(orig_ctx)
    for key, hf_key in ((K.Rope.SCALING_YARN_BETA_FAST, "beta_fast"), (K.Rope.SCALING_YARN_BETA_SLOW, "beta_slow")):
        if kind == "yarn" and meta.get(key) is not None:
            scaling[hf_key] = meta.get(key)
    return scaling


def _llama3_scaling(meta: GGUFMeta, factors: np.ndarray, dim: int, theta: float, orig_ctx: int) -> dict | None:
    # llama.cpp's converter turns HF's llama3 rope_scaling into per-dimension frequency
    # divisors: 1 for short wavelengths, `factor` for long ones, `1 / ((1 - s) / factor + s)`
    # in between, with s linear in 1/wavelength. Fitting that line recovers low/high_freq_factor;
    # every original context length gives the same frequencies, so the file's (or Llama 3's
    # 8192) is used. The fit is checked by recomputing the divisors.
    inv = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor = float(factors.max())
    if factors.shape != inv.shape:
        raise UserError(f"{meta.path}: rope_freqs.weight has {factors.size} values, expected {inv.size}")
    if np.allclose(factors, 1.0):
        return None
    inv_wavelen = inv / (2 * math.pi)
    mid = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    fitted = None
    ones, full = np.isclose(factors, 1.0, rtol=1e-4), np.isclose(factors, factor, rtol=1e-4)
    wavelen = 1 / inv_wavelen
    if mid.sum() == 0 and (ones | full).all() and full.any():
        # No divisor in the smooth band (few rotary dims): any band between the last wavelength
        # kept and the first one divided gives these frequencies; take its middle.
        short = wavelen[ones].max() if ones.any() else wavelen.min() / 2
        edge = np.sqrt(short * wavelen[full].min())
        low, high = orig_ctx / (edge * 1.05), orig_ctx / (edge / 1.05)
        if high > low:
            fitted = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": low,
                      "high_freq_factor": high, "original_max_position_embeddings": orig_ctx}
    elif mid.sum() >= 2:
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_wavelen[mid], smooth, 1)
        low = float(f"{-intercept * orig_ctx / slope:.6g}")
        high = float(f"{low + orig_ctx / slope:.6g}")
        fitted = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": low,
                  "high_freq_factor": high, "original_max_position_embeddings": orig_ctx}
    if fitted is not None:
        low, high = fitted["low_freq_factor"], fitted["high_freq_factor"]
        smooth_all = (orig_ctx / wavelen - low) / (high - low)
        expect = np.where(wavelen < orig_ctx / high, 1.0,
                          np.where(wavelen > orig_ctx / low, factor, 1 / ((1 - smooth_all) / factor + smooth_all)))
        if not np.allclose(expect, factors, rtol=1e-3):
            fitted = None
    if fitted is None:
        raise UserError(f"{meta.path}: rope_freqs.weight does not follow llama3 rope scaling; "
                        "this file's rotary embedding is not supported")
    return fitted


def rope_rows(rows: int, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: GGUF row r holds HF row `rope_rows(...)[r]`.

    Its converter (LlamaModel.permute) views each head's rows as [2, head_dim/2] and transposes
    them to [head_dim/2, 2], interleaving HF's two rotary halves for its GPT-J style rope.
    """
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGUF q/k rows (llama.cpp's interleaved order) -> HF's rotate-half order."""
    out = torch.empty_like(w)
    out[rope_rows(w.shape[0], n_head)] = w
    return out


def unpermute_llama_qk(gguf_name: str, tensor: torch.Tensor, hf: dict) -> torch.Tensor:
    """`gguf_to_hf` for architectures whose q/k rows llama.cpp permuted (llama, internlm2)."""
    kind = gguf_name.rsplit(".", 2)[-2]
    if kind == "attn_q":
        return unpermute_rope(tensor, hf["num_attention_heads"])
    if kind == "attn_k":
        return unpermute_rope(tensor, hf["num_key_value_heads"])
    return tensor


# -- export ------------------------------------------------------------------------------------

Rows = torch.Tensor | None  # row indices of our tensor a GGUF tensor takes; None = all, in order


def export_names(table: list[tuple[str, str]], fused: dict[str, list[str]], arch: ArchConfig,
                 part_rows: dict[str, int], permuted: dict[str, int] | None = None
                 ) -> dict[str, list[tuple[str, Rows]]]:
    """Our tensor base names -> [(GGUF base name, rows)], from a GGUF <-> HF name table.

    `fused` is the family's HF_FUSED (ours -> HF parts in row order) and `part_rows` gives
    each part's row count; `permuted` names the parts whose rows llama.cpp reorders for its
    rope, with their head counts.
    """
    permuted = permuted or {}
    gguf_of = {h: g for g, h in table}
    out: dict[str, list[tuple[str, Rows]]] = {}
    for bid in range(arch.num_layers):
        per_layer = {h.format(bid=bid): g.format(bid=bid) for h, g in gguf_of.items() if "{bid}" in g}
        for ours_tpl, parts in fused.items():
            ours = f"model.layers.{bid}.{ours_tpl}"
            start, pieces = 0, []
            for part in parts:
                n = part_rows[part]
                rows = torch.arange(start, start + n)
                if part in permuted:
                    rows = rows[rope_rows(n, permuted[part])]
                pieces.append((per_layer[f"model.layers.{bid}.{part}"], rows))
                start += n
            out[ours] = pieces
        fused_parts = {f"model.layers.{bid}.{p}" for ps in fused.values() for p in ps}
        for h, g in per_layer.items():
            if h not in fused_parts:
                out[h] = [(g, None)]
    for h, g in gguf_of.items():
        if "{bid}" not in g:
            out[h] = [(g, None)]
    return out


def llama_part_rows(arch: ArchConfig) -> dict[str, int]:
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return {"self_attn.q_proj": q, "self_attn.k_proj": kv, "self_attn.v_proj": kv,
            "mlp.gate_proj": arch.intermediate_size, "mlp.up_proj": arch.intermediate_size}


def llama_like_metadata(arch: ArchConfig) -> dict[str, Any]:
    """GGUF keys ({arch} unfilled) for the llama-shaped families' hyperparameters."""
    meta: dict[str, Any] = {
        K.LLM.VOCAB_SIZE: arch.vocab_size,
        K.LLM.CONTEXT_LENGTH: arch.max_position_embeddings,
        K.LLM.EMBEDDING_LENGTH: arch.hidden_size,
        K.LLM.BLOCK_COUNT: arch.num_layers,
        K.LLM.FEED_FORWARD_LENGTH: arch.intermediate_size,
        K.Attention.HEAD_COUNT: arch.num_heads,
        K.Attention.HEAD_COUNT_KV: arch.num_kv_heads,
        K.Attention.KEY_LENGTH: arch.head_dim,
        K.Attention.VALUE_LENGTH: arch.head_dim,
        K.Attention.LAYERNORM_RMS_EPS: float(arch.norm_eps),
        K.Rope.DIMENSION_COUNT: arch.rot_dim,
        K.Rope.FREQ_BASE: float(arch.rope["rope_theta"]),
    }
    meta.update(rope_metadata(arch))
    return meta


def rope_metadata(arch: ArchConfig) -> dict[str, Any]:
    """Rope scaling as llama.cpp states it (llama3 and longrope come as tensors, see rope_tensors)."""
    rope, kind = arch.rope, arch.rope["rope_type"]
    if kind in ("linear", "yarn"):
        out: dict[str, Any] = {K.Rope.SCALING_TYPE: kind, K.Rope.SCALING_FACTOR: float(rope["factor"])}
        if rope.get("original_max_position_embeddings"):
            out[K.Rope.SCALING_ORIG_CTX_LEN] = int(rope["original_max_position_embeddings"])
        for key, hf_key in ((K.Rope.SCALING_YARN_BETA_FAST, "beta_fast"), (K.Rope.SCALING_YARN_BETA_SLOW, "beta_slow")):
            if kind == "yarn" and rope.get(hf_key) is not None:
                out[key] = float(rope[hf_key])
        return out
    if kind == "longrope":
        return {K.Rope.SCALING_ATTN_FACTOR: float(rope["attention_factor"]),
                K.Rope.SCALING_ORIG_CTX_LEN: int(rope["original_max_position_embeddings"])}
    if kind == "llama3":
        return {K.Rope.SCALING_ORIG_CTX_LEN: int(rope["original_max_position_embeddings"])}
    if kind not in ("default", "dynamic"):  # dynamic NTK equals default inside the original window
        raise UserError(f"rope scaling {kind!r} cannot be written to GGUF "
                        "(supported: default, linear, yarn, llama3, longrope, dynamic)")
    return {}


def rope_tensors(arch: ArchConfig) -> dict[str, np.ndarray]:
    """Extra float32 tensors llama.cpp reads rope scaling from (llama3 divisors, longrope factors)."""
    from edgellm.models.rope import inv_freq_and_scale

    rope, kind = arch.rope, arch.rope["rope_type"]
    if kind == "llama3":
        dim = arch.rot_dim
        base = float(rope["rope_theta"])
        plain = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
        scaled, _ = inv_freq_and_scale(rope, dim, arch.max_position_embeddings)
        return {tname(T.ROPE_FREQS) + ".weight": (plain / scaled).numpy().astype(np.float32)}
    if kind == "longrope":
        return {tname(T.ROPE_FACTORS_LONG) + ".weight": np.asarray(rope["long_factor"], np.float32),
                tname(T.ROPE_FACTORS_SHORT) + ".weight": np.asarray(rope["short_factor"], np.float32)}
    return {}


# The llama layout: GGUF template <-> HF (pre-fusion) template, shared by several families.
LLAMA_TABLE: list[tuple[str, str]] = [
    (tname(T.TOKEN_EMBD), "model.embed_tokens"),
    (tname(T.OUTPUT_NORM), "model.norm"),
    (tname(T.OUTPUT), "lm_head"),
    (tname(T.ATTN_NORM), "model.layers.{bid}.input_layernorm"),
    (tname(T.ATTN_Q), "model.layers.{bid}.self_attn.q_proj"),
    (tname(T.ATTN_K), "model.layers.{bid}.self_attn.k_proj"),
    (tname(T.ATTN_V), "model.layers.{bid}.self_attn.v_proj"),
    (tname(T.ATTN_OUT), "model.layers.{bid}.self_attn.o_proj"),
    (tname(T.FFN_NORM), "model.layers.{bid}.post_attention_layernorm"),
    (tname(T.FFN_GATE), "model.layers.{bid}.mlp.gate_proj"),
    (tname(T.FFN_UP), "model.layers.{bid}.mlp.up_proj"),
    (tname(T.FFN_DOWN), "model.layers.{bid}.mlp.down_proj"),
]

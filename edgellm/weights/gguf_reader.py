"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints: HF config, names, layout."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR, GGUFValueType
from gguf import GGMLQuantizationType as QT

from edgellm.errors import UserError

SUPPORTED_TYPES = frozenset({
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
})
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_TENSORS = {
    MODEL_TENSOR.TOKEN_EMBD: "model.embed_tokens",
    MODEL_TENSOR.OUTPUT_NORM: "model.norm",
    MODEL_TENSOR.OUTPUT: "lm_head",
}
_BLOCK_TENSORS = {
    MODEL_TENSOR.ATTN_NORM: "input_layernorm",
    MODEL_TENSOR.ATTN_Q: "self_attn.q_proj",
    MODEL_TENSOR.ATTN_K: "self_attn.k_proj",
    MODEL_TENSOR.ATTN_V: "self_attn.v_proj",
    MODEL_TENSOR.ATTN_OUT: "self_attn.o_proj",
    MODEL_TENSOR.FFN_NORM: "post_attention_layernorm",
    MODEL_TENSOR.FFN_GATE: "mlp.gate_proj",
    MODEL_TENSOR.FFN_UP: "mlp.up_proj",
    MODEL_TENSOR.FFN_DOWN: "mlp.down_proj",
}
# rope_freqs carries llama3 rope scaling, which hf_config states as rope_scaling instead;
# attn_rot_embd is a leftover of old converters that llama.cpp itself ignores.
_DROPPED = (MODEL_TENSOR.ROPE_FREQS, MODEL_TENSOR.ATTN_ROT_EMBD)


def _tensor_name_map(n_layers: int) -> dict[str, str]:
    names: dict[str, str] = {}
    for kind, hf in _GLOBAL_TENSORS.items():
        names[gguf.TENSOR_NAMES[kind]] = hf
    for bid in range(n_layers):
        for kind, hf in _BLOCK_TENSORS.items():
            names[gguf.TENSOR_NAMES[kind].format(bid=bid)] = f"model.layers.{bid}.{hf}"
    return names


def _unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) views each head's q/k
    # rows as [2, head_dim/2] and transposes them to [head_dim/2, 2], interleaving HF's two
    # rotary halves for its GPT-J style rope. Transposing back restores HF's row order.
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape).contiguous())


def _float32_value(value: float) -> float:
    # GGUF stores these as float32: 1e-5 reads back as 9.99999974738e-06. The shortest
    # decimal that round-trips through float32 is the value the original config.json held.
    return float(str(np.float32(value)))


class GGUFSource:
    """A GGUF file read as a Hugging Face checkpoint."""

    format = "gguf"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except (ValueError, OSError, KeyError, IndexError, TypeError, MemoryError, OverflowError) as e:
            # MemoryError/OverflowError: a header announcing absurd array lengths
            raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
        arch = self._meta("general.architecture")
        if arch not in ARCHITECTURES:
            raise UserError(f"{path}: GGUF architecture {arch!r} is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")
        self.arch: str = arch
        self._tensors = {t.name: t for t in self._reader.tensors}
        for t in self._reader.tensors:
            if t.tensor_type not in SUPPORTED_TYPES:
                supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
                raise UserError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which edgellm "
                                f"cannot read (supported: {supported})")
        try:
            self.hf_config: dict[str, Any] = self._build_config()
        except (TypeError, ValueError, OverflowError) as e:  # e.g. a list where a count belongs
            raise UserError(f"{path}: GGUF metadata has a value of the wrong type ({e})") from None
        from edgellm.models.schema import HFConfig
        from edgellm.validation import validate

        # before anything is sized from it (one name per layer, the tokenizer, the model)
        validate(HFConfig, self.hf_config, f"{path} (GGUF metadata read as config.json)")
        name_map = _tensor_name_map(self.hf_config["num_hidden_layers"])
        dropped = re.compile("|".join(re.escape(gguf.TENSOR_NAMES[k]).replace(r"\{bid\}", r"\d+")
                                      for k in _DROPPED))
        self._hf_names: dict[str, str] = {}
        for name in self._tensors:
            base, _, suffix = name.rpartition(".")
            if dropped.fullmatch(base):
                continue
            if base not in name_map or suffix not in ("weight", "bias"):
                raise UserError(f"{path}: tensor {name} has no place in a {self.arch} model "
                                "(mixture-of-experts and other variants are not supported)")
            self._hf_names[name] = f"{name_map[base]}.{suffix}"

    # -- metadata --------------------------------------------------------------------------

    def _meta(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key.format(arch=getattr(self, "arch", "")))
        if field is None:
            return default
        value = field.contents()
        if field.types == [GGUFValueType.FLOAT32]:
            value = _float32_value(value)
        return value

    def _required(self, key: str) -> Any:
        value = self._meta(key)
        if value is None:
            raise UserError(f"{self.path}: GGUF metadata lacks {key.format(arch=self.arch)}")
        return value

    def _build_config(self) -> dict[str, Any]:
        K = gguf.Keys
        hidden = int(self._required(K.LLM.EMBEDDING_LENGTH))
        heads = int(self._required(K.Attention.HEAD_COUNT))
        if not 0 < heads <= 4096 or not 0 < hidden <= 1 << 17:
            raise UserError(f"{self.path}: GGUF metadata {K.Attention.HEAD_COUNT.format(arch=self.arch)}={heads} "
                            f"and {K.LLM.EMBEDDING_LENGTH.format(arch=self.arch)}={hidden} must be in 1..4096 "
                            f"and 1..{1 << 17}")
        kv_heads = self._meta(K.Attention.HEAD_COUNT_KV, heads)
        if isinstance(kv_heads, list):
            # Some files store one value per layer; these architectures need a single one.
            if len(set(kv_heads)) != 1:
                raise UserError(f"{self.path}: per-layer key/value head counts are not supported")
            kv_heads = kv_heads[0]
        embd = self._tensors.get(gguf.TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight")
        if embd is None:
            raise UserError(f"{self.path}: no token_embd.weight tensor")
        vocab_size = int(embd.shape[-1])
        head_dim = int(self._meta(K.Attention.KEY_LENGTH, hidden // heads))
        rope_dim = self._meta(K.Rope.DIMENSION_COUNT, head_dim)
        if rope_dim != head_dim:
            raise UserError(f"{self.path}: partial rotary embeddings ({rope_dim} of {head_dim} dims) "
                            f"are not supported for {self.arch}")
        cfg: dict[str, Any] = {
            "model_type": self.arch,
            "architectures": [ARCHITECTURES[self.arch]],
            "hidden_size": hidden,
            "intermediate_size": int(self._required(K.LLM.FEED_FORWARD_LENGTH)),
            "num_hidden_layers": int(self._required(K.LLM.BLOCK_COUNT)),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "vocab_size": vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": self._meta(K.Attention.LAYERNORM_RMS_EPS, 1e-6),
            "rope_theta": self._meta(K.Rope.FREQ_BASE, 10000.0),
            "max_position_embeddings": int(self._meta(K.LLM.CONTEXT_LENGTH, 2048)),
            "tie_word_embeddings": gguf.TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight" not in self._tensors,
            "attention_bias": self.arch == "qwen2" or "blk.0.attn_q.bias" in self._tensors,
            "torch_dtype": "float32",
        }
        if head_dim != hidden // heads:
            cfg["head_dim"] = head_dim
        rope_scaling = self._rope_scaling(head_dim, cfg["rope_theta"])
        if rope_scaling:
            cfg["rope_scaling"] = rope_scaling
        # Llama 3 style files name end-of-turn tokens besides eos; HF lists them all as eos ids.
        stops = [self._meta(k) for k in (K.Tokenizer.EOS_ID, K.Tokenizer.EOT_ID, K.Tokenizer.EOM_ID)]
        stops = list(dict.fromkeys(t for t in stops if t is not None))
        for key, value in (("bos_token_id", self._meta(K.Tokenizer.BOS_ID)),
                           ("eos_token_id", stops[0] if len(stops) == 1 else stops or None),
                           ("pad_token_id", self._meta(K.Tokenizer.PAD_ID))):
            if value is not None:
                cfg[key] = value
        return cfg

    def _rope_scaling(self, head_dim: int, theta: float) -> dict[str, Any] | None:
        K = gguf.Keys.Rope
        orig_ctx = self._meta(K.SCALING_ORIG_CTX_LEN)
        freqs = self._tensors.get(gguf.TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight")
        if freqs is not None:
            factors = gguf.quants.dequantize(freqs.data, freqs.tensor_type).astype(np.float64).reshape(-1)
            return self._llama3_scaling(factors, head_dim, theta, int(orig_ctx or 8192))
        kind = self._meta(K.SCALING_TYPE)
        factor = self._meta(K.SCALING_FACTOR) or self._meta("{arch}.rope.scale_linear")
        if kind is None and factor and factor != 1.0:
            kind = "linear"  # older files state only a linear factor
        if kind in (None, "none"):
            return None
        if kind not in ("linear", "yarn"):
            raise UserError(f"{self.path}: rope scaling type {kind!r} is not supported")
        scaling: dict[str, Any] = {"rope_type": kind, "factor": factor}
        if orig_ctx:
            scaling["original_max_position_embeddings"] = int(orig_ctx)
        for key, hf_key in ((K.SCALING_YARN_BETA_FAST, "beta_fast"), (K.SCALING_YARN_BETA_SLOW, "beta_slow")):
            if kind == "yarn" and self._meta(key) is not None:
                scaling[hf_key] = self._meta(key)
        return scaling

    def _llama3_scaling(self, factors: np.ndarray, head_dim: int, theta: float, orig_ctx: int) -> dict | None:
        # llama.cpp's converter turns HF's llama3 rope_scaling into per-dimension frequency
        # divisors: 1 for short wavelengths, `factor` for long ones, `1 / ((1 - s) / factor + s)`
        # in between, with s linear in 1/wavelength. Fitting that line recovers low/high_freq_factor;
        # every original context length gives the same frequencies, so the file's (or Llama 3's
        # 8192) is used. The fit is checked by recomputing the divisors.
        inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        factor = float(factors.max())
        if factors.shape != inv.shape:
            raise UserError(f"{self.path}: rope_freqs.weight has {factors.size} values, expected {inv.size}")
        if np.allclose(factors, 1.0):
            return None
        inv_wavelen = inv / (2 * math.pi)
        mid = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
        fitted = None
        if mid.sum() >= 2:
            smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
            slope, intercept = np.polyfit(inv_wavelen[mid], smooth, 1)
            low = float(f"{-intercept * orig_ctx / slope:.6g}")
            high = float(f"{low + orig_ctx / slope:.6g}")
            fitted = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": low,
                      "high_freq_factor": high, "original_max_position_embeddings": orig_ctx}
            wavelen = 1 / inv_wavelen
            smooth_all = (orig_ctx / wavelen - low) / (high - low)
            expect = np.where(wavelen < orig_ctx / high, 1.0,
                              np.where(wavelen > orig_ctx / low, factor,
                                       1 / ((1 - smooth_all) / factor + smooth_all)))
            if not np.allclose(expect, factors, rtol=1e-3):
                fitted = None
        if fitted is None:
            raise UserError(f"{self.path}: rope_freqs.weight does not follow llama3 rope scaling; "
                            "this file's rotary embedding is not supported")
        return fitted

    # -- tensors ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """HF names of the tensors `iter_tensors` yields, in file order."""
        return list(self._hf_names.values())

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor in HF layout), dequantized one tensor at a time."""
        heads = self.hf_config["num_attention_heads"]
        kv_heads = self.hf_config["num_key_value_heads"]
        permuted = self.arch == "llama"  # llama.cpp's qwen2 uses NEOX rope and keeps HF's row order
        for gguf_name, hf_name in self._hf_names.items():
            t = self._tensors[gguf_name]
            try:
                arr = gguf.quants.dequantize(t.data, t.tensor_type)
            except (ValueError, OSError) as e:
                raise UserError(f"{self.path}: cannot read tensor {gguf_name} ({e})") from None
            if arr.dtype != np.float32 or not arr.flags.writeable:
                arr = arr.astype(np.float32)  # copies out of the read-only file mapping
            tensor = torch.from_numpy(arr).reshape([int(d) for d in reversed(t.shape)])
            if permuted and ".self_attn.q_proj." in hf_name:
                tensor = _unpermute_rope_rows(tensor, heads)
            elif permuted and ".self_attn.k_proj." in hf_name:
                tensor = _unpermute_rope_rows(tensor, kv_heads)
            yield hf_name, tensor
            del arr, tensor

    # -- tokenizer -------------------------------------------------------------------------

    def write_tokenizer(self, out_dir: str | os.PathLike) -> list[str]:
        """Write tokenizer.json and tokenizer_config.json rebuilt from the GGUF vocabulary."""
        from edgellm.weights.gguf_tokenizer import build_tokenizer

        meta = {key: self._meta(key) for key in self._reader.fields if key.startswith("tokenizer.")}
        tokenizer_json, tokenizer_config = build_tokenizer(meta, str(self.path))
        tokenizer_config["model_max_length"] = self.hf_config["max_position_embeddings"]
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        return ["tokenizer.json", "tokenizer_config.json"]

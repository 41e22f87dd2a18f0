"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints: HF config, names, layout."""

from __future__ import annotations

import json
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
from edgellm.models.gguf_hooks import GGUFMeta
from edgellm.models.registry import gguf_family

# Every type the `gguf` package dequantizes that llama.cpp's common files use.
SUPPORTED_TYPES = frozenset({
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS,
})
# rope_freqs / rope_factors_* carry rope scaling, which the families' gguf_config state in the HF
# config instead; attn_rot_embd is a leftover of old converters that llama.cpp itself ignores.
_DROPPED = (MODEL_TENSOR.ROPE_FREQS, MODEL_TENSOR.ATTN_ROT_EMBD, MODEL_TENSOR.ROPE_FACTORS_LONG,
            MODEL_TENSOR.ROPE_FACTORS_SHORT)

_VOCAB_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                 "tokenizer.ggml.merges"}


def _field_value(field) -> Any:
    value = field.contents()
    return float(value) if field.types == [GGUFValueType.FLOAT32] else value


class GGUFSource:
    """A GGUF file read as a Hugging Face checkpoint of the family that claims its architecture."""

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
        fields = self._reader.fields
        arch = _field_value(fields["general.architecture"]) if "general.architecture" in fields else None
        self.family = gguf_family(arch)  # a one-line error listing the supported architectures
        self.arch: str = arch
        self._tensors = {t.name: t for t in self._reader.tensors}
        for t in self._reader.tensors:
            if t.tensor_type not in SUPPORTED_TYPES:
                supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
                raise UserError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which edgellm "
                                f"cannot read (supported: {supported})")
        self.meta = GGUFMeta(str(self.path), arch, {k: _field_value(f) for k, f in fields.items()
                                                    if k not in _VOCAB_ARRAYS},
                             {t.name: tuple(int(d) for d in reversed(t.shape)) for t in self._reader.tensors},
                             self._dequantize)
        try:
            self.hf_config: dict[str, Any] = self.family.gguf_config(self.meta)
        except (TypeError, ValueError, OverflowError) as e:  # e.g. a list where a count belongs
            raise UserError(f"{path}: GGUF metadata has a value of the wrong type ({e})") from None
        from edgellm.models.schema import HFConfig
        from edgellm.validation import validate

        # before anything is sized from it (one name per layer, the tokenizer, the model)
        validate(HFConfig, self.hf_config, f"{path} (GGUF metadata read as config.json)")
        name_map = self.family.gguf_tensor_names(self.hf_config)
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
        # HF tensors made of several GGUF ones (internlm2's wqkv, split phi3 qkv), in table order.
        order = {g: i for i, g in enumerate(name_map)}
        self._parts: dict[str, list[str]] = {}
        for name, hf in sorted(self._hf_names.items(), key=lambda kv: order[kv[0].rpartition(".")[0]]):
            self._parts.setdefault(hf, []).append(name)

    def _dequantize(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except (ValueError, OSError) as e:
            raise UserError(f"{self.path}: cannot read tensor {name} ({e})") from None
        if arr.dtype != np.float32 or not arr.flags.writeable:
            arr = arr.astype(np.float32)  # copies out of the read-only file mapping
        return arr.reshape([int(d) for d in reversed(t.shape)])

    # -- tensors ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """HF names of the tensors `iter_tensors` yields, in file order."""
        return list(dict.fromkeys(self._hf_names.values()))

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor in HF layout), dequantized one tensor at a time."""
        to_hf = getattr(self.family, "gguf_to_hf", None)
        waiting: dict[str, dict[str, torch.Tensor]] = {}
        emitted: set[str] = set()
        for gguf_name, hf_name in self._hf_names.items():
            tensor = torch.from_numpy(self._dequantize(gguf_name))
            if to_hf is not None:
                tensor = to_hf(gguf_name, tensor, self.hf_config)
            parts = self._parts[hf_name]
            if len(parts) > 1:  # held until its siblings arrive (one layer's q, k, v at most)
                got = waiting.setdefault(hf_name, {})
                got[gguf_name] = tensor
                if len(got) < len(parts):
                    continue
                got = waiting.pop(hf_name)
                tensor = self.family.gguf_join(hf_name, [got[p] for p in parts], self.hf_config)
            if hf_name not in emitted:
                emitted.add(hf_name)
                yield hf_name, tensor
            del tensor

    # -- tokenizer -------------------------------------------------------------------------

    def write_tokenizer(self, out_dir: str | os.PathLike) -> list[str]:
        """Write tokenizer.json and tokenizer_config.json rebuilt from the GGUF vocabulary."""
        from edgellm.weights.gguf_tokenizer import build_tokenizer

        meta = {key: _field_value(f) for key, f in self._reader.fields.items() if key.startswith("tokenizer.")}
        meta["general.name"] = self.meta.get("general.name")
        tokenizer_json, tokenizer_config = build_tokenizer(meta, str(self.path))
        tokenizer_config["model_max_length"] = self.hf_config["max_position_embeddings"]
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        return ["tokenizer.json", "tokenizer_config.json"]

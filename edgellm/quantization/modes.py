"""Quantization modes, named and laid out on disk as MLC-LLM does."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.errors import UserError


@dataclass(frozen=True)
class QuantMode:
    """One quantization mode.

    kind: "none" (plain weights), "group" (MLC-style packed group quantization),
    "int8" (edgellm's symmetric int8 with group scales).
    """

    name: str
    kind: str
    model_dtype: torch.dtype  # dtype of every non-quantized tensor on disk (norms, biases, scales)
    bits: int = 16
    group_size: int = 0
    elems_per_word: int = 0  # values packed in one uint32 ("group" kind)
    max_int: int = 0  # quantized value q stores w/scale + max_int
    quantize_embedding: bool = True  # embedding and lm_head too (q4f16_2: no)

    @property
    def quantized(self) -> bool:
        return self.kind != "none"

    def padded_k(self, k: int) -> int:
        """Input features rounded up to whole groups (the on-disk K)."""
        if not self.quantized:
            return k
        return -(-k // self.group_size) * self.group_size

    def num_groups(self, k: int) -> int:
        return -(-k // self.group_size)

    def packed_shape(self, n: int, k: int) -> tuple[int, int]:
        """Shape of `q_weight` for an [n, k] weight."""
        if self.kind == "group":
            return (n, self.padded_k(k) // self.group_size * (self.group_size // self.elems_per_word))
        return (n, self.padded_k(k))

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int32 if self.kind == "group" else torch.int8


_F16, _F32, _BF16 = torch.float16, torch.float32, torch.bfloat16

QUANTIZATION_MODES: dict[str, QuantMode] = {
    m.name: m
    for m in [
        QuantMode("q0f32", "none", _F32, 32),
        QuantMode("q0f16", "none", _F16, 16),
        QuantMode("q0bf16", "none", _BF16, 16),
        QuantMode("q4f16_1", "group", _F16, 4, 32, 8, 7),
        QuantMode("q4f32_1", "group", _F32, 4, 32, 8, 7),
        QuantMode("q4f16_2", "group", _F16, 4, 32, 8, 7, quantize_embedding=False),
        QuantMode("q3f16_1", "group", _F16, 3, 40, 10, 3),
        QuantMode("q8f16_1", "int8", _F16, 8, 32, 1, 127),
    ]
}


def get_mode(name: str) -> QuantMode:
    """The QuantMode called `name`, or a UserError listing the modes."""
    try:
        return QUANTIZATION_MODES[name]
    except KeyError:
        raise UserError(
            f"unknown quantization {name!r}; supported: {', '.join(QUANTIZATION_MODES)}"
        ) from None

"""Quantization modes, named and laid out on disk as MLC-LLM does."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from edgellm.errors import UserError


@dataclass(frozen=True)
class QuantMode:
    """One quantization mode.

    kind: "none" (plain weights), "group" (MLC-style packed group quantization),
    "int8" (edgellm's symmetric int8 with group scales), "awq" (4-bit codes packed as in "group",
    asymmetric: a zero point per group, `w = (q - zero) * scale`, kept from an AWQ checkpoint).
    """

    name: str
    kind: str
    model_dtype: torch.dtype  # dtype of every non-quantized tensor on disk (norms, biases, scales)
    bits: int = 16
    group_size: int = 0
    elems_per_word: int = 0  # values packed in one uint32 ("group" kind)
    max_int: int = 0  # quantized value q stores w/scale + max_int (awq: per-group zeros instead)
    quantize_embedding: bool = True  # embedding and lm_head too (q4f16_2: no)
    head: QuantMode | None = None  # the embedding's and lm_head's own mode (MNN's lm_quant_bit)

    @property
    def quantized(self) -> bool:
        return self.kind != "none"

    def group_for(self, k: int) -> int:
        """Elements per scale for a K-wide weight: the group size, or the whole (padded) row when
        group_size is 0 (per channel; padded to whole uint32 words)."""
        if self.group_size:
            return self.group_size
        epw = max(self.elems_per_word, 1)
        return -(-k // epw) * epw

    def padded_k(self, k: int) -> int:
        """Input features rounded up to whole groups (the on-disk K)."""
        if not self.quantized:
            return k
        gs = self.group_for(k)
        return -(-k // gs) * gs

    def num_groups(self, k: int) -> int:
        return -(-k // self.group_for(k))

    def packed_shape(self, n: int, k: int) -> tuple[int, int]:
        """Shape of `q_weight` for an [n, k] weight."""
        if self.kind in ("group", "awq"):
            return (n, self.padded_k(k) // self.elems_per_word)
        return (n, self.padded_k(k))

    @property
    def head_mode(self) -> QuantMode | None:
        """The mode of the embedding and lm_head (None: kept in the model dtype)."""
        if self.head is not None:
            return self.head if self.head.quantized else None
        return self if self.quantized and self.quantize_embedding else None

    @property
    def layout(self) -> dict:
        """What differs from the named mode's default layout ({} when nothing does), as recorded in
        mlc-chat-config.json (`quantization_layout`) and the tensor cache's metadata."""
        base = QUANTIZATION_MODES.get(self.name)
        out = {}
        if base is not None and self.group_size != base.group_size:
            out["group_size"] = self.group_size
        if self.head is not None:
            out["lm_head_bits"] = self.head.bits if self.head.quantized else 16
        return out

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int32 if self.kind in ("group", "awq") else torch.int8

    @property
    def zero_points(self) -> bool:
        """Whether layers carry `q_zero` [N, groups] (the model dtype, integer values) beside q_scale."""
        return self.kind == "awq"


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
        # AWQ checkpoints' own codes, scales and zero points (MLC-LLM's q4f16_awq: group 128, the
        # embedding and lm_head stay float16 as AutoAWQ leaves them)
        QuantMode("q4f16_awq", "awq", _F16, 4, 128, 8, 0, quantize_embedding=False),
    ]
}


def get_mode(name: str, layout: dict | None = None) -> QuantMode:
    """The QuantMode called `name` (with a `layout`: group_size, lm_head_bits), or a UserError."""
    try:
        mode = QUANTIZATION_MODES[name]
    except KeyError:
        raise UserError(
            f"unknown quantization {name!r}; supported: {', '.join(QUANTIZATION_MODES)}"
        ) from None
    layout = layout or {}
    unknown = set(layout) - {"group_size", "lm_head_bits"}
    if unknown:
        raise UserError(f"quantization layout: unknown key {sorted(unknown)[0]!r}")
    return with_layout(mode, layout.get("group_size"), layout.get("lm_head_bits"))


GROUP_SIZES = (32, 64, 128, 0)
HEAD_BITS = (4, 8, 16)


def with_layout(mode: QuantMode, group_size: int | None = None, head_bits: int | None = None) -> QuantMode:
    """`mode` with another group size (0 = one scale per output channel) and/or another bit width for
    the embedding and lm_head (MNN's quant_block and lm_quant_bit); q4 and q8 modes only."""
    if group_size is None and head_bits is None:
        return mode
    if not mode.quantized or not (mode.bits == 4 or mode.kind == "int8"):
        raise UserError(f"--group-size/--lm-quant-bit apply to the q4 and q8 modes, not {mode.name}")
    if group_size is not None:
        if group_size not in GROUP_SIZES:
            raise UserError(f"--group-size {group_size}: choose 32, 64, 128 or 0 (per channel)")
        mode = replace(mode, group_size=group_size)
    if head_bits is not None:
        if head_bits not in HEAD_BITS:
            raise UserError(f"--lm-quant-bit {head_bits}: choose 4, 8 or 16 (unquantized)")
        if head_bits == 16:
            head = QUANTIZATION_MODES["q0f32" if mode.model_dtype == torch.float32 else "q0f16"]
        else:
            head = QUANTIZATION_MODES["q4f16_1" if head_bits == 4 else "q8f16_1"]
            head = replace(head, model_dtype=mode.model_dtype, group_size=mode.group_size)
        mode = replace(mode, head=replace(head, name=f"{mode.name}-head{head_bits}"))
    return mode

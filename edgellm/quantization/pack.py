"""Quantize, pack and unpack weights in the on-disk layouts of SPEC.md.

Group modes (q4*, q3*): `q = clamp(round(w / scale + max_int), 0, 2 * max_int)` (ties to even,
the offset added before rounding as MLC-LLM does; each step in the model dtype) with
`scale = max|w| / max_int` per group of consecutive input (K) elements; value j of a word sits
at bits `bits*j ... bits*j + bits - 1` (lowest first). Words are kept as int32 in memory (the
same bytes as MLC's uint32). int8 mode: `q = clamp(round(w / scale), -127, 127)`, `scale =
max|w| / 127` per group of 32. awq mode: the group kind's words, with a zero point per group
(`w = (q - zero) * scale`); its codes come from AWQ checkpoints, never from `quantize`.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from edgellm.quantization.modes import QuantMode


def quantize(weight: torch.Tensor, mode: QuantMode) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (q_weight, q_scale) in `mode`'s disk layout.

    Arithmetic runs in the mode's model dtype (f16 for q4f16_1), as MLC-LLM does, so codes
    match its converter; padding past K gets code 0.
    """
    if mode.zero_points:
        raise ValueError(f"{mode.name} keeps an AWQ checkpoint's codes; it does not quantize float weights")
    n, k = weight.shape
    kp, gs = mode.padded_k(k), mode.group_for(weight.shape[1])
    md = mode.model_dtype
    if kp != k:
        weight = F.pad(weight, (0, kp - k))
    # max|w| in the input dtype, then rounded: rounding to the model dtype is monotonic and
    # symmetric, so this equals the max of the rounded values, and is much faster than f16 amax.
    scale = weight.view(n, kp // gs, gs).abs().amax(-1).to(md) / mode.max_int  # as stored
    zero = scale == 0
    safe = torch.where(zero, torch.ones_like(scale), scale).unsqueeze(-1)
    # Few, small temporaries (this runs on every weight of a multi-GB model): one copy in the
    # model dtype, updated in place, then 1-byte codes. Rounding of the integral results is
    # exact in f16, so rounding here equals rounding a float32 copy.
    x = weight.to(md).view(n, kp // gs, gs) / safe
    if mode.kind == "int8":
        return x.round_().clamp_(-127, 127).to(torch.int8).view(n, kp), scale
    x += mode.max_int  # the offset is added before rounding, as MLC-LLM does
    q = x.round_().clamp_(0, 2 * mode.max_int).to(torch.uint8)
    del x
    if zero.any():
        q[zero] = 0
    q = q.view(n, kp)
    if kp != k:
        q[:, k:] = 0
    return pack_codes(q, mode), scale


def pack_codes(q: torch.Tensor, mode: QuantMode) -> torch.Tensor:
    """uint8 codes [N, Kp] -> int32 words [N, Kp / elems_per_word], code r at bits r*bits..."""
    n, kp = q.shape
    if mode.bits == 4 and sys.byteorder == "little":
        # Two codes per byte, low nibble first; four bytes read little-endian are the word.
        pairs = q.view(n, kp // 2, 2)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).view(torch.int32)
    epw = mode.elems_per_word
    q = q.view(n, kp // epw, epw)
    words = q[..., 0].to(torch.int64)
    for r in range(1, epw):
        words |= q[..., r].to(torch.int64) << (r * mode.bits)  # < 2**32, fits int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(q_weight: torch.Tensor, mode: QuantMode) -> torch.Tensor:
    """Packed int32 words [N, W] -> integer values [N, W * elems_per_word] (int32, offset kept)."""
    if mode.kind == "int8":
        return q_weight.to(torch.int32)
    epw = mode.elems_per_word
    shifts = torch.arange(epw, dtype=torch.int32, device=q_weight.device) * mode.bits
    vals = (q_weight.unsqueeze(-1) >> shifts) & ((1 << mode.bits) - 1)
    return vals.reshape(q_weight.shape[0], -1)


def dequantize(
    q_weight: torch.Tensor,
    q_scale: torch.Tensor,
    mode: QuantMode,
    k: int,
    dtype: torch.dtype = torch.float32,
    q_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """(q_weight, q_scale[, q_zero]) -> [N, k] weight in `dtype`; exactly `(q - max_int) * scale`,
    or `(q - zero) * scale` with the per-group zero points of an "awq" mode."""
    q = unpack(q_weight, mode)
    n, kp = q.shape
    gs = kp // q_scale.shape[-1]
    if mode.zero_points:
        if q_zero is None:
            raise ValueError(f"{mode.name} weights need their zero points")
        offset = q_zero.to(dtype).unsqueeze(-1)  # [N, G, 1]
    else:
        offset = 0 if mode.kind == "int8" else mode.max_int
    w = (q.to(dtype).view(n, kp // gs, gs) - offset) * q_scale.to(dtype).unsqueeze(-1)
    return w.view(n, kp)[:, :k]

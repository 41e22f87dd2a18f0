"""Quantize, pack and unpack weights in the on-disk layouts of SPEC.md.

Group modes (q4*, q3*): `q = clamp(round(w / scale) + max_int, 0, 2 * max_int)` with
`scale = max|w| / max_int` per group of consecutive input (K) elements; value j of a word sits
at bits `bits*j ... bits*j + bits - 1` (lowest first). Words are kept as int32 in memory (the
same bytes as MLC's uint32). int8 mode: `q = clamp(round(w / scale), -127, 127)`, `scale =
max|w| / 127` per group of 32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgellm.quantization.modes import QuantMode


def quantize(weight: torch.Tensor, mode: QuantMode) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (q_weight, q_scale) in `mode`'s disk layout."""
    n, k = weight.shape
    kp, gs = mode.padded_k(k), mode.group_size
    w = F.pad(weight.float(), (0, kp - k)).view(n, kp // gs, gs)
    scale = (w.abs().amax(-1) / mode.max_int).to(mode.model_dtype)  # [N, groups], as stored
    s = scale.float()
    s = torch.where(s == 0, torch.ones_like(s), s).unsqueeze(-1)
    if mode.kind == "int8":
        q = torch.clamp(torch.round(w / s), -127, 127).to(torch.int8)
        return q.view(n, kp), scale
    q = torch.clamp(torch.round(w / s) + mode.max_int, 0, 2 * mode.max_int).to(torch.int64)
    epw = mode.elems_per_word
    q = q.view(n, kp // epw, epw)
    shifts = torch.arange(epw, dtype=torch.int64) * mode.bits
    words = (q << shifts).sum(-1)  # < 2**32, fits int64
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words, scale


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
) -> torch.Tensor:
    """(q_weight, q_scale) -> [N, k] weight in `dtype`; exactly `(q - max_int) * scale`."""
    q = unpack(q_weight, mode)
    n, kp = q.shape
    gs = mode.group_size
    offset = 0 if mode.kind == "int8" else mode.max_int
    w = (q.to(dtype) - offset).view(n, kp // gs, gs) * q_scale.to(dtype).unsqueeze(-1)
    return w.view(n, kp)[:, :k]

"""Linear and embedding layers that compute with quantized weights.

The buffers are named as on disk (`q_weight`, `q_scale`), and the reference forward dequantizes
them (opt O0; what export/compile trace). `repack()` moves a layer onto the native kernels
(edgellm.quantization.kernels): the weights are converted once into the kernels' layout, the
disk-layout buffers are released (no second copy in memory). Each layer's `precision` attribute,
set at load (`set_precision`, loader.load_model's `precision=`), picks the activations of its
native products: "high" stays within about 1e-5 of the float32 dequantized reference (16-bit
activations), "normal" (the default) uses 8-bit activations per group of 32 (the int8 GEMM; see
kernels.py). The reference forward (not repacked) ignores it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.quantization.arena import HugePageArena
from edgellm.quantization.modes import QuantMode
from edgellm.quantization.pack import dequantize

DEFAULT_PRECISION = "normal"  # MNN-LLM's default: 8-bit activations where that is faster

if TYPE_CHECKING:
    from edgellm.quantization.kernels import PackedWeight


# Group sizes the native kernels are used for: the named modes' own (q4/q8: 32, q3: 40).
NATIVE_GROUP_SIZES = (32, 40)


class QuantLinear(nn.Module):
    """y = x @ dequant(q_weight, q_scale[, q_zero]).T + bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: QuantMode,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        n_words = mode.packed_shape(out_features, in_features)[1]
        self.register_buffer(
            "q_weight", torch.empty(out_features, n_words, dtype=mode.storage_dtype, device=device))
        self.register_buffer(
            "q_scale", torch.empty(out_features, mode.num_groups(in_features), dtype=dtype, device=device))
        if mode.zero_points:  # awq: one zero point per scale (integer values in the scale's dtype)
            self.register_buffer("q_zero", torch.empty_like(self.q_scale))
        else:
            self.q_zero = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                     requires_grad=False)
        else:
            self.bias = None
        self.packed: PackedWeight | None = None
        self.precision = DEFAULT_PRECISION

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.dequantize().to(dtype or torch.float32)
        return dequantize(self.q_weight, self.q_scale, self.mode, self.in_features,
                          dtype or self.q_scale.dtype, self.q_zero)

    def repack(self, arena: HugePageArena | None = None) -> None:
        """Move onto the native kernels (CPU); frees the disk-layout buffers. Layers with zero
        points (q4f16_awq) have no native kernel and stay as they are. `arena`: a HugePageArena for
        the packed tensors (optional)."""
        if self.packed is None and not self.mode.zero_points:
            from edgellm.quantization.kernels import PackedWeight

            self.packed = PackedWeight.from_quantized(self.q_weight, self.q_scale, self.mode, self.out_features,
                                                      self.in_features, self.bias, precision=self.precision,
                                                      arena=arena)
            self.q_weight = None
            self.q_scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.linear(x).to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        packed = ", packed" if self.packed is not None else ""
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode.name}{packed}"


class QuantEmbedding(nn.Module):
    """Embedding lookup that dequantizes only the rows it reads; also usable as a tied lm_head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: QuantMode,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.mode = num_embeddings, embedding_dim, mode
        n_words = mode.packed_shape(num_embeddings, embedding_dim)[1]
        self.register_buffer(
            "q_weight", torch.empty(num_embeddings, n_words, dtype=mode.storage_dtype, device=device))
        self.register_buffer(
            "q_scale", torch.empty(num_embeddings, mode.num_groups(embedding_dim), dtype=dtype,
                                   device=device))
        self.packed: PackedWeight | None = None
        self.precision = DEFAULT_PRECISION

    def repack(self, arena: HugePageArena | None = None) -> None:
        """Move onto the native kernels (CPU); frees the disk-layout buffers (`arena` as QuantLinear's)."""
        if self.packed is None:
            from edgellm.quantization.kernels import PackedWeight

            self.packed = PackedWeight.from_quantized(self.q_weight, self.q_scale, self.mode, self.num_embeddings,
                                                      self.embedding_dim, precision=self.precision, arena=arena)
            self.q_weight = None
            self.q_scale = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.gather(ids)
        return dequantize(self.q_weight[ids.flatten()], self.q_scale[ids.flatten()], self.mode,
                          self.embedding_dim, self.q_scale.dtype).view(*ids.shape, -1)

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.linear(x).to(x.dtype)
        w = dequantize(self.q_weight, self.q_scale, self.mode, self.embedding_dim, x.dtype)
        return F.linear(x, w)


def make_linear(in_features: int, out_features: int, bias: bool, mode: QuantMode | None,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """A plain nn.Linear for unquantized modes, else a QuantLinear."""
    if mode is None or not mode.quantized:
        return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    return QuantLinear(in_features, out_features, bias, mode, dtype)


def make_embedding(num: int, dim: int, mode: QuantMode | None,
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    mode = mode.head_mode if mode is not None else None
    if mode is None:
        return nn.Embedding(num, dim, dtype=dtype)
    return QuantEmbedding(num, dim, mode, dtype)


def make_lm_head(in_features: int, vocab: int, mode: QuantMode | None,
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    return make_linear(in_features, vocab, False, mode.head_mode if mode is not None else None, dtype)


def tied_logits(embedding: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits through the embedding matrix (tied word embeddings)."""
    if isinstance(embedding, QuantEmbedding):
        return embedding.as_linear(x)
    return F.linear(x, embedding.weight)


def set_precision(model: nn.Module, precision: str) -> int:
    """Set the activation precision ("high" or "normal") of every quantized layer; returns how many.

    Call it before building a fused decoder (which copies the layers' descriptors).
    """
    from edgellm.quantization.kernels import check_precision

    check_precision(precision)
    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    for m in layers:
        m.precision = precision
        if m.packed is not None:
            m.packed.precision = precision
    return len(layers)


def repack_model(model: nn.Module, precision: str | None = None) -> int:
    """Repack every quantized layer of a CPU model for the native kernels.

    `precision` ("high" / "normal"), when given, is set on every layer first (else each keeps its
    own, "normal" unless set at load). Returns the number of layers repacked (0 when the kernels
    are unavailable or nothing is quantized); each layer's disk-layout buffers are freed as it
    goes, so peak memory stays near one copy of the weights.
    """
    from edgellm.quantization import kernels

    if precision is not None:
        set_precision(model, precision)
    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding)) and m.packed is None]
    if not layers or not kernels.available():
        return 0
    arena = HugePageArena()  # the packed weights in huge pages (see arena.py)
    for m in layers:
        qw = m.q_weight
        if qw is None or qw.device.type != "cpu" or (m.mode.kind == "group" and m.mode.bits > 4):
            continue
        if m.mode.group_size not in NATIVE_GROUP_SIZES or m.mode.zero_points:
            # zero points (q4f16_awq) have no native kernel yet: reference path
            continue  # as do other group sizes (--group-size 64/128/0)
        m.repack(arena)
    _release_freed_memory()
    return len(layers)


def _release_freed_memory() -> None:
    """Give the disk-layout copies just freed back to the OS (glibc keeps freed heap otherwise)."""
    import ctypes
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def is_repacked(model: nn.Module) -> bool:
    return any(getattr(m, "packed", None) is not None for m in model.modules())

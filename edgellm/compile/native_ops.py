"""edgellm's native quantized kernels as PyTorch custom operators, for compiled CPU libraries.

`edgellm::qlinear` (x @ W.T + bias with W in the kernels' packed layout) and `edgellm::qgather`
(embedding rows) run edgellm.quantization.kernels; `edgellm::attend` is one layer's attention step
over the library's KV caches, done as the eager engine's KV pool does it (the rows written in place,
then scaled_dot_product_attention over only the valid keys: causal without a mask for a first chunk).
Each has a fake (meta) kernel, so torch.export traces them as opaque calls and AOTInductor's generated
code calls them by name. A `.pt2` built this way needs these operators registered in the process that
loads it: importing this module does that (`edgellm.compile.aoti.load_pt2` does it before loading).

`native_model(model)` swaps a repacked model's quantized layers for modules calling the operators,
sharing the packed tensors (no copy): what `edgellm compile --device cpu` exports, and what the
runtime feeds the library as its constants.

The packed layout's descriptor fields travel as an int list in the graph ("meta": fmt, N, K, Kp,
group size, offset, activation bits); the tensors are the library's constants, handed in at load.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from edgellm.quantization.layers import QuantEmbedding, QuantLinear

# meta = [fmt, n, k, kp, gs, off, abits]
_PRECISION_OF_BITS = {16: "high", 8: "normal"}


def _packed(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, meta: list[int]):
    from edgellm.quantization.kernels import PackedWeight

    fmt, n, k, kp, gs, off, abits = meta
    return PackedWeight(fmt, n, k, kp, gs, off, codes, scale, bias, precision=_PRECISION_OF_BITS[abits])


@torch.library.custom_op("edgellm::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
            meta: list[int]) -> torch.Tensor:
    """x [..., K] -> [..., N] float32 through the native quantized product."""
    return _packed(codes, scale, bias, meta).linear(x)


@qlinear.register_fake
def _qlinear_fake(x, codes, scale, bias, meta):
    return x.new_empty((*x.shape[:-1], meta[1]), dtype=torch.float32)


@torch.library.custom_op("edgellm::qgather", mutates_args=())
def qgather(ids: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, meta: list[int]) -> torch.Tensor:
    """Embedding rows `ids` [...] -> [..., K] float32, dequantized."""
    return _packed(codes, scale, None, meta).gather(ids)


@qgather.register_fake
def _qgather_fake(ids, codes, scale, meta):
    return ids.new_empty((*ids.shape, meta[2]), dtype=torch.float32)


@torch.library.custom_op("edgellm::attend", mutates_args=("k_cache", "v_cache"))
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           positions: torch.Tensor, scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """k, v [T, KVH, D] written at `positions` (consecutive) of one layer's caches [KVH, context, D];
    q [T, H, D] attends over the keys up to the last of them (within `window`) -> [T, H, D]."""
    from edgellm.models.base import attention

    # in-graph attention over all positions with a mask cost the library a third of its prefill speed
    start, end = int(positions[0]), int(positions[-1]) + 1
    k_cache[:, start:end] = k.transpose(0, 1).to(k_cache.dtype)
    v_cache[:, start:end] = v.transpose(0, 1).to(v_cache.dtype)
    k_from = 0 if window is None else max(0, start - window + 1)
    o = attention(q.transpose(0, 1), k_cache[:, k_from:end].to(q.dtype), v_cache[:, k_from:end].to(q.dtype),
                  start, k_from, scale=scale, window=window, softcap=softcap)
    return o.transpose(0, 1).contiguous()


@attend.register_fake
def _attend_fake(q, k, v, k_cache, v_cache, positions, scale, window, softcap):
    return torch.empty_like(q)


def _meta(p) -> list[int]:
    return [p.fmt, p.n, p.k, p.kp, p.gs, p.off, p.desc.abits]


class NativeLinear(nn.Module):
    """A repacked QuantLinear as one `edgellm::qlinear` call (buffers: the packed tensors)."""

    def __init__(self, src: QuantLinear):
        super().__init__()
        p = src.packed
        self.meta = _meta(p)
        self.register_buffer("codes", p.codes)
        self.register_buffer("scale", p.scale)
        self.register_buffer("bias", p.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.edgellm.qlinear(x.float(), self.codes, self.scale, self.bias, self.meta).to(x.dtype)


class NativeEmbedding(QuantEmbedding):
    """A repacked QuantEmbedding (also the tied lm_head) through the operators."""

    def __init__(self, src: QuantEmbedding):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim, self.mode = src.num_embeddings, src.embedding_dim, src.mode
        p = src.packed
        self.meta = _meta(p)
        self.register_buffer("codes", p.codes)
        self.register_buffer("scale", p.scale)
        self.packed = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.edgellm.qgather(ids, self.codes, self.scale, self.meta)

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.edgellm.qlinear(x.float(), self.codes, self.scale, None, self.meta).to(x.dtype)


def is_native(model: nn.Module) -> bool:
    """Whether `model` (repacked) has layers the operators would run."""
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) and m.packed is not None and m.packed.fmt in (4, 8)
               for m in model.modules())


def calls_operators(model: nn.Module) -> bool:
    """Whether `model` (a native_model) has layers that call the operators."""
    return any(isinstance(m, (NativeLinear, NativeEmbedding)) for m in model.modules())


def native_model(model: nn.Module) -> nn.Module:
    """A shallow copy of a repacked CPU `model` whose packed quantized layers call the operators; the
    packed tensors are shared with `model`. Layers left on the reference path become float32 ones."""
    from edgellm.compile.lowering import EmbeddingF32, linear_f32

    swaps = {}
    for name, mod in model.named_modules():
        packed = getattr(mod, "packed", None)
        if isinstance(mod, QuantLinear):
            swaps[name] = NativeLinear(mod) if packed is not None and packed.fmt in (4, 8) else linear_f32(mod)
        elif isinstance(mod, QuantEmbedding):
            swaps[name] = NativeEmbedding(mod) if packed is not None and packed.fmt in (4, 8) else EmbeddingF32(mod)
    out = _copy_tree(model, set(swaps))
    for name, new in swaps.items():
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr, new)
    out.requires_grad_(False)
    return out.eval()


def _copy_tree(model: nn.Module, skip: set[str]) -> nn.Module:
    """Copies of the module objects (not their tensors) down to the ones in `skip`."""
    memo: dict[int, object] = {}
    for name, mod in model.named_modules():
        if name in skip:
            memo[id(mod)] = mod  # replaced right after; not worth copying
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = t  # share tensors
    for mod in model.modules():
        p = getattr(mod, "packed", None)
        if p is not None:
            memo[id(p)] = p  # holds ctypes descriptors: never copied
    return copy.deepcopy(model, memo)

"""Float32 versions of the quantized layers, for compiled programs that take plain weights.

An AOTInductor library computes with float32 weights: the converted model's codes are
dequantized once when the library is loaded (exactly `(q - offset) * scale`, as the eager
layers do on every call), so the compiled step is plain GEMMs with no unpacking in the loop.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from edgellm.quantization.layers import QuantEmbedding, QuantLinear
from edgellm.quantization.pack import dequantize


def linear_f32(mod: QuantLinear) -> nn.Linear:
    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
    lin.weight = nn.Parameter(mod.dequantized_weight(torch.float32).contiguous(), requires_grad=False)
    if mod.bias is not None:
        lin.bias = nn.Parameter(mod.bias.float(), requires_grad=False)
    return lin


class EmbeddingF32(QuantEmbedding):
    def __init__(self, src: QuantEmbedding):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim, self.mode = src.num_embeddings, src.embedding_dim, src.mode
        if getattr(src, "packed", None) is not None:  # repacked for the native kernels
            w = src.packed.dequantize().float().contiguous()
        else:
            w = dequantize(src.q_weight, src.q_scale, src.mode, src.embedding_dim, torch.float32).contiguous()
        self.register_buffer("weight", w)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight)

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


def float_model(model: nn.Module) -> nn.Module:
    """A copy of `model` with every quantized layer replaced by its float32 equivalent."""
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            new = linear_f32(mod)
        elif isinstance(mod, QuantEmbedding):
            new = EmbeddingF32(mod)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    model.requires_grad_(False)
    return model.eval()

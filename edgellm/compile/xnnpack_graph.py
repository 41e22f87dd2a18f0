"""Shaping the .pte step graph so XNNPACK takes it in few, large partitions.

ExecuTorch lowers each connected run of XNNPACK-supported ops as one delegate, and its cost
grows with (partitions x graph size): an op XNNPACK refuses on the activation path cuts the
graph there. With the sequence length T dynamic, XNNPACK refuses a reshape to a symbolic size,
a slice or split, a non-trailing unsqueeze and a mean over a 2-D tensor, and the model code
has all of these in every layer. This module removes them without changing what is computed:

- `XnnpackFriendlyPass` (an edge-dialect graph pass): a reshape whose only symbolic size is T
  is written with -1 for it; `split(cat([a, b, ..]))` along the same pieces is the pieces;
  a mean over the last dim is a mean over a 4-D view (XNNPACK's global average pooling).
- `SplitLinear`: a fused projection (qkv, gate+up) as one product per part, joined by a cat,
  so the model's split of its output is the parts themselves (the pass removes cat + split).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn


def _edge_ops():
    from executorch.exir.dialects._ops import ops  # ExecuTorch is imported only when compiling

    return ops.edge.aten


def _static(shape) -> list[int] | None:
    """`shape` with its symbolic size (if any) as -1; None if it has more than one."""
    out = [d if isinstance(d, int) else -1 for d in shape]
    return out if out.count(-1) <= 1 else None


class XnnpackFriendlyPass:
    """Rewrites reshapes, split-of-cat and last-dim means (see the module docstring)."""

    def __call__(self, gm: fx.GraphModule):
        from executorch.exir.pass_base import PassResult

        ops = _edge_ops()
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target == ops.view_copy.default:
                changed |= self._view(node)
            elif node.target == ops.split_with_sizes_copy.default:
                changed |= self._split_of_cat(node)
            elif node.target == ops.mean.dim:
                changed |= self._mean(gm, node)
        if changed:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, changed)

    @staticmethod
    def _view(node: fx.Node) -> bool:
        if all(isinstance(d, int) for d in node.args[1]):
            return False
        shape = _static(node.meta["val"].shape)
        if shape is None:
            return False
        node.args = (node.args[0], shape)
        return True

    @staticmethod
    def _split_of_cat(node: fx.Node) -> bool:
        src, sizes = node.args[0], list(node.args[1])
        dim = node.args[2] if len(node.args) > 2 else 0
        if not (isinstance(src, fx.Node) and src.target == _edge_ops().cat.default):
            return False
        parts = list(src.args[0])
        cat_dim = src.args[1] if len(src.args) > 1 else 0
        rank = src.meta["val"].dim()
        if dim % rank != cat_dim % rank or len(parts) != len(sizes):
            return False
        if [p.meta["val"].shape[dim] for p in parts] != sizes:
            return False
        for user in list(node.users):
            if user.target is not operator.getitem:
                return False
        for user in list(node.users):
            user.replace_all_uses_with(parts[user.args[1]])
        return True

    @staticmethod
    def _mean(gm: fx.GraphModule, node: fx.Node) -> bool:
        x = node.args[0]
        val = x.meta["val"]
        dims = node.args[1] if len(node.args) > 1 else None
        keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim"))
        rank = val.dim()
        if (rank == 4 or not keep or node.kwargs.get("dtype") is not None or dims is None
                or [d % rank for d in dims] != [rank - 1]):
            return False
        inner = val.shape[-1]
        four = _static([*val.shape[:-1], 1, inner]) if rank == 3 else _static([val.shape[0], 1, 1, inner])
        back = _static(node.meta["val"].shape)
        if four is None or back is None or not isinstance(inner, int) or rank not in (2, 3):
            return False
        ops = _edge_ops()
        with gm.graph.inserting_before(node):
            v4 = gm.graph.call_function(ops.view_copy.default, (x, four))
            v4.meta["val"] = val.reshape(four)
            m = gm.graph.call_function(ops.mean.dim, (v4, [2, 3], True))
            m.meta["val"] = v4.meta["val"].mean([2, 3], keepdim=True)
            out = gm.graph.call_function(ops.view_copy.default, (m, back))
            out.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(out)
        return True


class SplitLinear(nn.Module):
    """A fused projection computed as its parts (each a module of the same kind), joined on the
    last dim: the model's split of the output then meets the cat (removed by the pass)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

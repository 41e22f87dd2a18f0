"""The .pte step of a llama-shaped model built from three small XNNPACK programs, lowered once.

Lowering the whole model graph to XNNPACK costs time in proportion to its size many times over
(ExecuTorch re-traces it in every pass: ~13 s a layer, 7 minutes for SmolLM2's 30). Every
layer computes the same thing with other weights, so each kind of work is exported and lowered
once, with the weights as inputs, and the step calls the lowered programs once a layer
(ExecuTorch's "composite" flow; the program file holds each delegate once):

- `_Pre`: norm1, then the q, k and v products -> q [T, H*D], k, v [T, KVH*D]
- `_Post`: attention over the cached keys and the new ones, the output product and the residual,
  norm2, the gated MLP and its residual -> the next hidden state
- `_Head`: the final norm and the output head of the last row -> logits [1, vocab]

Between them, on ExecuTorch's portable kernels: each layer's weights expanded from its own 4-bit
codes (`embedding_4bit`, exact; the memory plan reuses one layer's buffers for the next), the
per-head q/k norms (qwen3), RoPE and the KV cache writes. The arithmetic is the model's own
(static_cache.BufferKVCache's attention, RMSNorm as base.RMSNorm computes it).
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.compile.static_cache import BufferKVCache, buffer_attention
from edgellm.models.base import RMSNorm


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] @ w[N, K].T (+ b) as LinearExact computes it (a batch matmul, T as -1)."""
    n, k = w.shape
    y = torch.bmm(w.view(1, n, k), x.reshape(1, -1, k).permute(0, 2, 1)).permute(0, 2, 1)
    if b is not None:
        y = y + b
    return y.reshape(-1, n)


def _rotate_half_matrix(d: int) -> torch.Tensor:
    """W [D, D] with x @ W.T == base.rotate_half(x) exactly (one +-1 a row: the rest adds zeros)."""
    w, h = torch.zeros(d, d), d // 2
    idx = torch.arange(h)
    w[idx, idx + h] = -1.0
    w[idx + h, idx] = 1.0
    return w


class _Pre(nn.Module):
    """-> q [T, H, D] (roped), k and v [KVH, T, D] (k roped): the layout the cache is written in."""

    def __init__(self, eps: float, heads: int, kv_heads: int, head_dim: int, bias: bool, qk_eps: float | None):
        super().__init__()
        self.eps, self.heads, self.kv_heads, self.bias, self.qk_eps = eps, heads, kv_heads, bias, qk_eps
        self.register_buffer("rot", _rotate_half_matrix(head_dim))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]  # base.apply_rope: x * cos + rotate_half(x) * sin
        return x * cos + _mm(x.reshape(-1, d), self.rot, None).reshape(-1, x.shape[1], d) * sin

    def forward(self, x, cos, sin, w_norm, wq, wk, wv, *extra):
        # extra: the q, k, v biases (when the layer has them), then the q and k norm weights (qwen3)
        bq, bk, bv = extra[:3] if self.bias else (None, None, None)
        wqn, wkn = extra[-2:] if self.qk_eps is not None else (None, None)
        h = _rms(x, w_norm, self.eps)
        d = self.rot.shape[0]
        q = _mm(h, wq, bq).reshape(-1, self.heads, d)
        k = _mm(h, wk, bk).reshape(-1, self.kv_heads, d)
        v = _mm(h, wv, bv).reshape(-1, self.kv_heads, d)
        if wqn is not None:  # qwen3's per-head norms, before RoPE
            q, k = _rms(q, wqn, self.qk_eps), _rms(k, wkn, self.qk_eps)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        return q, k.permute(1, 0, 2), v.permute(1, 0, 2)


class _Post(nn.Module):
    def __init__(self, eps: float, scale: float, softcap: float | None, act):
        super().__init__()
        self.eps, self.scale, self.softcap, self.act = eps, scale, softcap, act

    def forward(self, x, q, k, v, kc, vc, bias, wo, w_norm, wg, wu, wd, bo=None, bg=None, bu=None, bd=None):
        o = buffer_attention(q, k.permute(1, 0, 2), v.permute(1, 0, 2), kc, vc, bias, scale=self.scale,
                             softcap=self.softcap)
        x = x + _mm(o.reshape(-1, wo.shape[1]), wo, bo)
        h = _rms(x, w_norm, self.eps)
        return x + _mm(self.act(_mm(h, wg, bg)) * _mm(h, wu, bu), wd, bd)


class _Head(nn.Module):
    def __init__(self, eps: float, softcap: float | None):
        super().__init__()
        self.eps, self.softcap = eps, softcap

    def forward(self, x, w_norm, w):
        out = _mm(_rms(x, w_norm, self.eps), w, None)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def _weight(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(float32 weight [N, K], bias) of a mobile_model linear: expanded from its codes when it keeps them."""
    if hasattr(mod, "packed"):  # LinearExact
        return mod.weight(), mod.bias
    return mod.weight, mod.bias  # nn.Linear (float)


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    w = norm.weight.float()
    return w + norm.offset if norm.offset else w


def layered_specs(model: nn.Module) -> list | None:
    """The model's layers as LayerSpecs when every one has the shape this step computes, else None."""
    from edgellm.compile.xnnpack_graph import SplitLinear

    fused = getattr(model, "fused_layers", None)
    specs = fused() if fused is not None else None
    if not specs or type(model.final_norm) is not RMSNorm or model.cfg.rot_dim != model.cfg.head_dim:
        return None
    for s in specs:
        parts_ok = (isinstance(s.qkv, SplitLinear) and len(s.qkv.parts) == 3 and isinstance(s.up, SplitLinear)
                    and len(s.up.parts) == 2)
        norms = [s.norm1, s.norm2] + [n for n in (s.q_norm, s.k_norm) if n is not None]
        if (not parts_ok or not s.gated or s.parallel or s.post_attn_norm is not None
                or s.post_mlp_norm is not None or any(type(n) is not RMSNorm for n in norms)):
            return None
    return specs


class LayeredCacheStep(nn.Module):
    """(tokens [1, T], input_pos [1]) -> logits [1, vocab], the KV cache in the module's buffers
    (static_cache.BufferCacheStep's interface and cache), each layer through the lowered programs."""

    def __init__(self, model: nn.Module, specs: list, max_len: int, pre, post, head):
        super().__init__()
        self.model, self.specs = model, specs
        self.pre, self.post, self.head = pre, post, head  # lowered programs (LoweredBackendModule)
        a = model.cfg
        for i in range(a.num_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(a.num_kv_heads, max_len, a.head_dim))
            self.register_buffer(f"v_cache_{i}", torch.zeros(a.num_kv_heads, max_len, a.head_dim))
        self.register_buffer("key_pos", torch.arange(max_len, dtype=torch.int64))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        a = self.model.cfg
        ids = tokens.reshape(-1)
        positions = input_pos + torch.arange(ids.shape[0], dtype=torch.int64)
        cache = BufferKVCache(self, positions)
        x = self.model.embed(ids)
        cos, sin = self.model.rope(positions)
        rep = a.num_heads // a.num_kv_heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D], once for all layers
        for i, s in enumerate(self.specs):
            (wq, bq), (wk, bk), (wv, bv) = (_weight(p) for p in s.qkv.parts)
            qk_norms = () if s.q_norm is None else (_norm_weight(s.q_norm), _norm_weight(s.k_norm))
            q, k, v = self.pre(x, cos, sin, _norm_weight(s.norm1), wq, wk, wv, *_biases(bq, bk, bv), *qk_norms)
            kc, vc = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            (wo, bo), (wg, bg), (wu, bu), (wd, bd) = (_weight(m) for m in (s.o, *s.up.parts, s.down))
            x = self.post(x, q, k, v, kc, vc, cache.mask_bias(rep, s.window), wo, _norm_weight(s.norm2),
                          wg, wu, wd, *_biases(bo, bg, bu, bd))
            kc[:, positions] = k  # [KVH, T, D]
            vc[:, positions] = v
        emb = self.model.embedding
        head = self.model.output
        w, _ = _weight(emb.head if head is None else head)
        return self.head(x[-1:], _norm_weight(self.model.final_norm), w)


def _biases(*bs: torch.Tensor | None) -> tuple:
    """The optional bias inputs of a lowered program: all of them or none."""
    return () if all(b is None for b in bs) else bs


def lower_layers(mm: nn.Module, specs: list, max_len: int, chunk: int) -> LayeredCacheStep:
    """Export and lower the three programs once (weights as inputs, T dynamic) and build the step."""
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend  # noqa: F401  (registers it)
    from executorch.exir import EdgeCompileConfig, to_edge
    from executorch.exir.backend.backend_api import to_backend
    from torch.export import Dim

    from edgellm.compile.xnnpack_graph import XnnpackFriendlyPass

    a, s0 = mm.cfg, specs[0]
    t = Dim("T", min=1, max=chunk)
    n = min(4, chunk)
    rep, d = a.num_heads // a.num_kv_heads, a.head_dim
    (wq, bq), (wk, bk), (wv, bv) = (_weight(p) for p in s0.qkv.parts)
    (wo, bo), (wg, bg), (wu, bu), (wd, bd) = (_weight(m) for m in (s0.o, *s0.up.parts, s0.down))
    pre_x = _biases(bq, bk, bv) + (() if s0.q_norm is None else (_norm_weight(s0.q_norm), _norm_weight(s0.k_norm)))
    post_b = _biases(bo, bg, bu, bd)
    x, kc = torch.zeros(n, a.hidden_size), torch.zeros(a.num_kv_heads, max_len, d)
    kn = torch.zeros(a.num_kv_heads, n, d)
    w_head = _weight(mm.embedding.head if mm.output is None else mm.output)[0]
    pre = _Pre(s0.norm1.eps, a.num_heads, a.num_kv_heads, d, bool(_biases(bq, bk, bv)),
               None if s0.q_norm is None else s0.q_norm.eps)
    jobs = [
        (pre, (x, torch.zeros(n, 1, d), torch.zeros(n, 1, d), _norm_weight(s0.norm1), wq, wk, wv, *pre_x),
         [{0: t}, {0: t}, {0: t}] + [None] * (4 + len(pre_x))),
        (_Post(s0.norm2.eps, a.scale, a.attn_softcap, s0.act),
         (x, torch.zeros(n, a.num_heads, d), kn, kn.clone(), kc, kc.clone(), torch.zeros(rep * n, max_len + n),
          wo, _norm_weight(s0.norm2), wg, wu, wd, *post_b),
         [{0: t}, {0: t}, {1: t}, {1: t}, None, None, {0: rep * t, 1: t + max_len}] + [None] * (5 + len(post_b))),
        (_Head(mm.final_norm.eps, a.final_softcap), (torch.zeros(1, a.hidden_size), _norm_weight(mm.final_norm),
                                                     w_head), [None] * 3),
    ]
    lowered = []
    for mod, args, dyn in jobs:
        with torch.no_grad():
            ep = torch.export.export(mod.eval(), tuple(x_.detach() for x_ in args), dynamic_shapes=dyn, strict=False)
        edge = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False))
        edge = edge.transform([XnnpackFriendlyPass()])
        lowered.append(to_backend("XnnpackBackend", edge.exported_program(), []))
    return LayeredCacheStep(mm, specs, max_len, *lowered)

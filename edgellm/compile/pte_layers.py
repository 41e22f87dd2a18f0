"""The .pte step of a llama-shaped model built from small XNNPACK programs, each lowered once.

Lowering the whole model graph to XNNPACK costs time in proportion to its size many times over
(ExecuTorch re-traces it in every pass: ~13 s a layer, 7 minutes for SmolLM2's 30). Every
layer computes the same thing with other weights, so each kind of work is exported and lowered
once, with the weights as inputs, and the step calls the lowered programs once a layer
(ExecuTorch's "composite" flow; the program file holds each delegate once):

- `_Pre`: norm1, the q, k and v products, qwen3's per-head q/k norms and RoPE (rotate_half as a
  product with a +-1 matrix, exact) -> q [T, H, D], k and v [KVH, T, D]
- `_Post`: attention over the cached keys and the new ones, the output product and the residual,
  norm2, the gated MLP and its residual -> the next hidden state
- `_Head`: the final norm and the output head of the last row -> logits [1, vocab]
- `_Mid`: `_Post` of one layer and `_Pre` of the next as one program (the step calls it between
  the first `_Pre` and the last `_Post`): ExecuTorch's passes over the step trace every call of
  a lowered program again, so fewer calls make a faster export.

Between them, on ExecuTorch's portable kernels: each layer's weights expanded from its own 4-bit
codes (`embedding_4bit`, exact; the memory plan reuses one layer's buffers for the next), the
RoPE table lookup, the mask and the KV cache writes. The arithmetic is the model's own
(static_cache.BufferKVCache's attention, RMSNorm as base.RMSNorm computes it).
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.compile.static_cache import BufferKVCache, buffer_attention
from edgellm.models.base import RMSNorm, rms_norm


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
        h = rms_norm(x, w_norm, self.eps)
        d = self.rot.shape[0]
        q = _mm(h, wq, bq).reshape(-1, self.heads, d)
        k = _mm(h, wk, bk).reshape(-1, self.kv_heads, d)
        v = _mm(h, wv, bv).reshape(-1, self.kv_heads, d)
        if wqn is not None:  # qwen3's per-head norms, before RoPE
            q, k = rms_norm(q, wqn, self.qk_eps), rms_norm(k, wkn, self.qk_eps)
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
        h = rms_norm(x, w_norm, self.eps)
        return x + _mm(self.act(_mm(h, wg, bg)) * _mm(h, wu, bu), wd, bd)


class _Mid(nn.Module):
    """_Post of one layer then _Pre of the next, one program: half the calls the step makes (the
    cost of ExecuTorch's passes over the step grows with the calls)."""

    def __init__(self, post: _Post, pre: _Pre, n_post: int):
        super().__init__()
        self.post_, self.pre_, self.n_post = post, pre, n_post

    def forward(self, *args):
        x = self.post_(*args[:self.n_post])
        return (x, *self.pre_(x, *args[self.n_post:]))


class _Head(nn.Module):
    def __init__(self, eps: float, softcap: float | None):
        super().__init__()
        self.eps, self.softcap = eps, softcap

    def forward(self, x, w_norm, w):
        out = _mm(rms_norm(x, w_norm, self.eps), w, None)
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

    def __init__(self, model: nn.Module, specs: list, max_len: int, pre, mid, post, head):
        super().__init__()
        self.model, self.specs = model, specs
        # lowered programs (LoweredBackendModule); mid is None for a one-layer model
        self.pre, self.mid, self.post, self.head = pre, mid, post, head
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
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D], once for all layers
        rep = a.num_heads // a.num_kv_heads
        q, k, v = self.pre(x, *_pre_args(self.specs[0], cos, sin))
        last = len(self.specs) - 1
        for i, s in enumerate(self.specs):
            kc, vc = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            post = _post_args(s, q, k, v, kc, vc, cache.mask_bias(rep, s.window))
            if i < last:
                x, q2, k2, v2 = self.mid(x, *post, *_pre_args(self.specs[i + 1], cos, sin))
            else:
                x = self.post(x, *post)
            kc[:, positions] = k  # [KVH, T, D], after the program read the cache as it was
            vc[:, positions] = v
            if i < last:
                q, k, v = q2, k2, v2
        emb = self.model.embedding
        head = self.model.output
        w, _ = _weight(emb.head if head is None else head)
        return self.head(x[-1:], _norm_weight(self.model.final_norm), w)


def _pre_args(s, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """_Pre's inputs after x for the layer of LayerSpec `s` (its weights expanded from their codes)."""
    qkv = [_weight(p) for p in s.qkv.parts]
    qk_norms = () if s.q_norm is None else (_norm_weight(s.q_norm), _norm_weight(s.k_norm))
    return (cos, sin, _norm_weight(s.norm1), *(w for w, _ in qkv), *_biases(*qkv), *qk_norms)


def _post_args(s, q, k, v, kc, vc, bias) -> tuple:
    """_Post's inputs after x for the layer of LayerSpec `s`."""
    (wo, bo), (wg, bg), (wu, bu), (wd, bd) = ws = [_weight(m) for m in (s.o, *s.up.parts, s.down)]
    return (q, k, v, kc, vc, bias, wo, _norm_weight(s.norm2), wg, wu, wd, *_biases(*ws))


def _nest(dyn: list, named: int) -> list:
    """Dynamic shapes of a forward(named inputs..., *args): the *args part as one list."""
    return [*dyn[:named], tuple(dyn[named:])] if len(dyn) > named else dyn


def _biases(*pairs: tuple[torch.Tensor, torch.Tensor | None]) -> tuple:
    """The optional bias inputs of a lowered program for (weight, bias) pairs: none when no layer
    product has one, else one each (zeros where one lacks it: adding 0 changes nothing)."""
    if all(b is None for _, b in pairs):
        return ()
    return tuple(torch.zeros(w.shape[0]) if b is None else b.float() for w, b in pairs)


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
    x, kc = torch.zeros(n, a.hidden_size), torch.zeros(a.num_kv_heads, max_len, d)
    kn, cos = torch.zeros(a.num_kv_heads, n, d), torch.zeros(n, 1, d)
    pre_a = _pre_args(s0, cos, cos.clone())
    post_a = _post_args(s0, torch.zeros(n, a.num_heads, d), kn, kn.clone(), kc, kc.clone(),
                        torch.zeros(rep * n, max_len + n))
    pre_dyn = [{0: t}, {0: t}] + [None] * (len(pre_a) - 2)
    post_dyn = [{0: t}, {1: t}, {1: t}, None, None, {0: rep * t, 1: t + max_len}] + [None] * (len(post_a) - 6)
    w_head = _weight(mm.embedding.head if mm.output is None else mm.output)[0]
    pre = _Pre(s0.norm1.eps, a.num_heads, a.num_kv_heads, d, bool(_biases(*(_weight(p) for p in s0.qkv.parts))),
               None if s0.q_norm is None else s0.q_norm.eps)
    post = _Post(s0.norm2.eps, a.scale, a.attn_softcap, s0.act)
    # the shapes of a forward's *args are one nested list: _Pre has 7 named inputs, _Mid none
    jobs = [
        (pre, (x, *pre_a), _nest([{0: t}, *pre_dyn], 7)),
        (_Mid(post, pre, 1 + len(post_a)), (x, *post_a, *pre_a), _nest([{0: t}, *post_dyn, *pre_dyn], 0))
        if len(specs) > 1 else None,
        (post, (x, *post_a), [{0: t}, *post_dyn]),
        (_Head(mm.final_norm.eps, a.final_softcap), (torch.zeros(1, a.hidden_size), _norm_weight(mm.final_norm),
                                                     w_head), [None] * 3),
    ]
    lowered = []
    for job in jobs:
        if job is None:
            lowered.append(None)
            continue
        mod, args, dyn = job
        with torch.no_grad():
            ep = torch.export.export(mod.eval(), tuple(x_.detach() for x_ in args), dynamic_shapes=dyn, strict=False)
        edge = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False))
        edge = edge.transform([XnnpackFriendlyPass()])
        lowered.append(to_backend("XnnpackBackend", edge.exported_program(), []))
    return LayeredCacheStep(mm, specs, max_len, *lowered)

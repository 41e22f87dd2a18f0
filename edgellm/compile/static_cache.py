"""Export-friendly KV cache and the step programs that compiled libraries are made of.

A compiled step handles one sequence: token ids [T] at absolute positions [T] (consecutive),
a KV cache of fixed length `max_len` per layer, and returns float32 logits of the last row
[1, vocab]. Attention is pure tensor ops: the new keys/values are written with `index_copy_`
at the tensor positions and every query sees the cached keys through a position mask, so the
same graph serves every position without Python control flow.

Two cache layouts:
- `ExternalKVCache`: the cache tensors are inputs of the step (one [KVH, max_len, D] tensor per
  layer for keys and for values: the KV pool's layout, so the native decode step reads them too),
  written in place (AOTInductor). Key positions [S] are an input too: S = start + T, so
  attention reads only the first S cached positions (S is a dynamic dimension). With `native`
  (a cpu library on edgellm's operators) each layer's write + attention is one `edgellm::attend`
  call instead (edgellm.compile.native_ops: the eager engine's attention over the valid keys).
- the ExecuTorch program keeps the cache inside as mutable buffers and attends over all
  `max_len` cached positions (those not written before this call masked) and the new rows.
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.models.base import Step


def masked_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, positions: torch.Tensor,
                     key_pos: torch.Tensor, *, scale: float, window: int | None,
                     softcap: float | None) -> torch.Tensor:
    """q [T, H, D] at `positions` [T]; keys/vals [KVH, S, D] at `key_pos` [S] -> [T, H, D].

    Grouped-query attention as two batched matmuls over the KV heads (the query heads that share
    a KV head are stacked as rows), so the cache is read in place, never repeated per head.
    """
    t, h, d = q.shape
    kvh = keys.shape[0]
    rep = h // kvh
    qp, kp = positions.unsqueeze(1), key_pos.unsqueeze(0)
    mask = kp <= qp  # [T, S]
    if window is not None:
        mask = mask & ((qp - kp) < window)
    qg = q.reshape(t, kvh, rep, d).permute(1, 2, 0, 3).reshape(kvh, rep * t, d)  # row r*T + i
    scores = torch.bmm(qg, keys.transpose(1, 2)) * scale  # [KVH, rep*T, S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if rep > 1:
        mask = mask.repeat(rep, 1)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    o = torch.bmm(probs, vals)  # [KVH, rep*T, D]
    return o.reshape(kvh, rep, t, d).permute(2, 0, 1, 3).reshape(t, h, d)


class ExternalKVCache:
    """`attend` over cache tensors passed in by the caller (written in place); `native`: through the
    `edgellm::attend` operator."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, key_pos: torch.Tensor,
                 native: bool = False):
        self.k, self.v, self.positions, self.key_pos = k, v, positions, key_pos
        self.native = native

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, *,
               scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        kc, vc = self.k[layer], self.v[layer]  # [KVH, max_len, D], one tensor per layer
        if self.native:
            return torch.ops.edgellm.attend(q, k, v, kc, vc, self.positions, scale, window, softcap)
        # index_copy_ on a graph input is updated in place by inductor (no copy of the cache)
        kc.index_copy_(1, self.positions, k.transpose(0, 1).to(kc.dtype))
        vc.index_copy_(1, self.positions, v.transpose(0, 1).to(vc.dtype))
        # a gathered copy of the first S positions: a view's layout would depend on S == max_len,
        # which export refuses to specialize on
        keys = kc.index_select(1, self.key_pos).to(q.dtype)
        vals = vc.index_select(1, self.key_pos).to(q.dtype)
        return masked_attention(q, keys, vals, self.positions, self.key_pos, scale=scale, window=window,
                                softcap=softcap)


def buffer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                     bias: torch.Tensor, *, scale: float, softcap: float | None) -> torch.Tensor:
    """q [T, H, D] over the cache kc/vc [KVH, max_len, D] followed by the new k/v [T, KVH, D];
    `bias` [rep*T, max_len + T] (BufferKVCache.mask_bias) -> [T, H, D].

    Shaped for XNNPACK (see xnnpack_graph): reshapes name T as -1, the mask is an added bias.
    """
    kn, vn = k.transpose(0, 1).to(kc.dtype), v.transpose(0, 1).to(vc.dtype)  # [KVH, T, D]
    keys = torch.cat([kc, kn], 1).to(q.dtype)  # [KVH, max_len + T, D]
    vals = torch.cat([vc, vn], 1).to(q.dtype)
    h, d = q.shape[1], q.shape[2]
    kvh = keys.shape[0]
    rep = h // kvh
    qg = q.reshape(-1, kvh, rep, d).permute(1, 2, 0, 3).reshape(kvh, -1, d)  # row r*T + i
    scores = torch.bmm(qg, keys.transpose(1, 2)) * scale  # [KVH, rep*T, max_len + T]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.float() + bias, dim=-1).to(q.dtype)
    o = torch.bmm(probs, vals)  # [KVH, rep*T, D]
    return o.reshape(kvh, rep, -1, d).permute(2, 0, 1, 3).reshape(-1, h, d)


class BufferKVCache:
    """`attend` over the wrapper's own cache buffers (static length) and the new rows.

    The keys are the cache as it was (the positions before the first new one are valid) followed
    by the new rows, the mask is an additive bias built once per call from the positions only,
    and the cache write comes last: no op XNNPACK refuses sits inside the attention.
    """

    def __init__(self, owner: nn.Module, positions: torch.Tensor):
        self.owner, self.positions = owner, positions
        big = owner.key_pos.shape[0] + positions.shape[0] + 1  # a position no query reaches
        old = torch.where(owner.key_pos < positions[:1], owner.key_pos, big)
        self.key_pos = torch.cat([old, positions])  # [max_len + T]
        self.bias: dict = {}

    def mask_bias(self, rep: int, window: int | None) -> torch.Tensor:
        """[rep * T, max_len + T]: 0 where a query sees a key, -inf elsewhere (rows as in the scores)."""
        if (rep, window) not in self.bias:
            qp, kp = self.positions.unsqueeze(1), self.key_pos.unsqueeze(0)
            mask = kp <= qp
            if window is not None:
                mask = mask & ((qp - kp) < window)
            bias = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, float("-inf"))
            self.bias[(rep, window)] = bias.repeat(rep, 1) if rep > 1 else bias
        return self.bias[(rep, window)]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, *,
               scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        kc, vc = getattr(self.owner, f"k_cache_{layer}"), getattr(self.owner, f"v_cache_{layer}")
        rep = q.shape[1] // kc.shape[0]
        out = buffer_attention(q, k, v, kc, vc, self.mask_bias(rep, window), scale=scale, softcap=softcap)
        # an index_put on a mutable buffer: ExecuTorch's reinplace pass keeps it in place
        kc[:, self.positions] = k.transpose(0, 1).to(kc.dtype)
        vc[:, self.positions] = v.transpose(0, 1).to(vc.dtype)
        return out


def _step(positions: torch.Tensor) -> Step:
    # Only `positions` and `logit_rows` are read by the models; the rest is bookkeeping.
    return Step([0], [0], [1], positions=positions, logit_rows=slice(-1, None))


class ExternalCacheStep(nn.Module):
    """(ids [T], positions [T], key_pos [S], k_caches, v_caches) -> logits [1, vocab]; caches written.

    k_caches/v_caches are lists with one [KVH, max_len, D] tensor per layer.
    """

    def __init__(self, model: nn.Module, native: bool = False):
        super().__init__()
        self.model, self.native = model, native

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_pos: torch.Tensor,
                k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        cache = ExternalKVCache(k_caches, v_caches, positions, key_pos, self.native)
        return self.model(ids, _step(positions), cache)


class BufferCacheStep(nn.Module):
    """(tokens [1, T], input_pos [1]) -> logits [1, vocab]; the KV cache lives in the module's buffers.

    The signature is ExecuTorch's LLM runner convention (KV cache on, dynamic shape): tokens of
    one sequence and the position of the first of them.
    """

    def __init__(self, model: nn.Module, max_len: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        a = model.cfg
        for i in range(a.num_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(a.num_kv_heads, max_len, a.head_dim, dtype=dtype))
            self.register_buffer(f"v_cache_{i}", torch.zeros(a.num_kv_heads, max_len, a.head_dim, dtype=dtype))
        self.register_buffer("key_pos", torch.arange(max_len, dtype=torch.int64))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        ids = tokens.reshape(-1)
        positions = input_pos + torch.arange(ids.shape[0], dtype=torch.int64)
        return self.model(ids, _step(positions), BufferKVCache(self, positions))

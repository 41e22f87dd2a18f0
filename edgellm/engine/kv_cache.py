"""KV cache: one contiguous region per sequence slot.

k[layer] and v[layer] are [slots, KVH, max_len, D]; a sequence in slot s keeps its keys at
positions 0..len-1 of row s, so attention reads a view of the valid part without copying.
"""

from __future__ import annotations

import torch

from edgellm.models.base import Step, attention


class SlotKVCache:
    """Fixed slots of `max_len` tokens each."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.num_layers, self.num_slots, self.max_len = num_layers, num_slots, max_len
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        shape = (num_slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, *,
               scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        kc, vc = self.k[layer], self.v[layer]
        out = torch.empty_like(q)
        row = 0
        for slot, start, n in zip(step.slots, step.starts, step.lengths):
            end = start + n
            if end > self.max_len:
                raise ValueError(f"sequence of {end} tokens exceeds KV cache length {self.max_len}")
            kc[slot, :, start:end] = k[row:row + n].transpose(0, 1).to(self.dtype)
            vc[slot, :, start:end] = v[row:row + n].transpose(0, 1).to(self.dtype)
            k_start = 0 if window is None else max(0, start - window + 1)
            keys = kc[slot, :, k_start:end].to(q.dtype)
            vals = vc[slot, :, k_start:end].to(q.dtype)
            o = attention(q[row:row + n].transpose(0, 1), keys, vals, start, k_start,
                          scale=scale, window=window, softcap=softcap)
            out[row:row + n] = o.transpose(0, 1)
            row += n
        return out

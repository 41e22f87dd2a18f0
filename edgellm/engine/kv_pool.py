"""The engine's KV cache: a contiguous, growable region per sequence under one memory budget.

Each sequence owns per-layer tensors k[l], v[l] of shape [KVH, cap, D] holding positions
base[l] .. base[l] + cap - 1, so attention reads a view of exactly the valid keys (no gather).
Capacity grows in steps as the sequence does; sliding-window layers drop keys that left the
window (shifting the kept ones to the front) instead of growing, so they hold about one window.
Finished sequences can stay as a prefix cache (reuse_kv): a new prompt that starts with their
tokens takes their KV over. Everything is budgeted in bytes; eviction is LRU.

Element types float32, float16, bfloat16, or int8: then each row (one head, one position) is D
int8 codes followed by its float32 scale in 4 more bytes (symmetric, scale = max|x| / 127), so rows
move, shift and fork as whole rows whatever the type.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from edgellm.models.base import Step, attention

GROW = 128  # capacity granularity in tokens (windowed layers)
# Without windows every layer grows at once, into one [layers, KVH, cap, D] tensor per sequence (one
# allocation and one copy per growth), so capacity can follow the length closely: rows left unused after
# each head's keys cost attention its reads (the prefetchers run into them; 8 sequences x 30 layers x 3
# heads x 96 keys on 2 threads: 0.28 ms with no spare rows, 0.38 with 32, 0.45 with 48).
GROW_SHARED = 16
INT8_SCALE_BYTES = 4  # float32 scale stored after the D codes of an int8 row


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """float [..., D] -> int8 rows [..., D + 4]: codes round(x / scale), then scale = max|x| / 127."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / 127.0
    codes = torch.where(scale > 0, torch.round(x / scale), torch.zeros_like(x)).to(torch.int8)
    return torch.cat([codes, scale.contiguous().view(torch.int8)], dim=-1)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 rows [..., D + 4] -> [..., D] codes * scale."""
    d = rows.shape[-1] - INT8_SCALE_BYTES
    scale = rows[..., d:].contiguous().view(torch.float32)
    return (rows[..., :d].float() * scale).to(dtype)


def longest_prefix(entries: dict, prompt: list[int], usable=lambda entry, n: True) -> tuple[int | None, int]:
    """(key, length) of the entry (with .length and .tokens) sharing the longest usable prefix with
    `prompt`, leaving at least its last token; (None, 0) if none shares any."""
    best, best_len = None, 0
    for key, entry in entries.items():
        n = 0
        limit = min(entry.length, len(prompt) - 1)
        toks = entry.tokens
        while n < limit and toks[n] == prompt[n]:
            n += 1
        if n > best_len and usable(entry, n):
            best, best_len = key, n
    return best, best_len


class SeqKV:
    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.base = [0] * num_layers  # absolute position stored at index 0 of layer l
        self.length = 0  # positions 0..length-1 have been computed
        self.tokens: list[int] = []  # the token ids behind those positions (for prefix reuse)
        self.tag: str | None = None  # what else the KV depends on: the LoRA adapter's key (None: the base)
        # what a native decode step derived from k and v (their pointers); whoever replaces a layer's
        # tensor resets it (a replaced list is recognised by identity)
        self.native = None
        self.k_all = self.v_all = None  # [layers, KVH, cap, D] when k / v are its layers (no windows)
        # positions below this fit every layer as laid out (min of base + capacity); 0: not known.
        # reserve() answers from it without planning each layer (30 layers x 8 sequences a step).
        self.fits_until = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() * 2 for t in self.k if t is not None)


class KVPool:
    """Per-sequence KV regions for a model, within `budget_tokens` tokens' worth of memory."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, windows: list[int | None],
                 budget_tokens: int, dtype: torch.dtype = torch.float32, device: str = "cpu", alloc=None):
        self.alloc = alloc  # (shape, dtype) -> tensor, e.g. pool_setup.mmap_allocator(); None: torch.empty
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.windows, self.dtype, self.device = windows, dtype, device
        self.elem_size = dtype.itemsize  # bytes per cache element (asked on every reserve)
        if dtype == torch.int8 and head_dim % 4:
            raise ValueError(f"an int8 KV cache needs a head size divisible by 4, not {head_dim}")
        self.row = head_dim + (INT8_SCALE_BYTES if dtype == torch.int8 else 0)  # elements per cache row
        self.bytes_per_token = 2 * kv_heads * self.row * self.elem_size * num_layers
        self.budget_tokens = budget_tokens
        self.budget_bytes = budget_tokens * self.bytes_per_token
        self.used_bytes = 0
        self.shared = all(w is None for w in windows)  # every layer grows at once (GROW_SHARED)
        self.grow = GROW_SHARED if self.shared else GROW
        self.seqs: dict[int, SeqKV] = {}
        self.prefix_cache: OrderedDict[int, SeqKV] = OrderedDict()
        self._next_slot = 0

    def fits(self, tokens: int) -> bool:
        """Whether one sequence of `tokens` positions fits the budget when alone (windowed layers hold
        about a window, whatever the length)."""
        elem = self.elem_size
        caps = 0
        for window in self.windows:
            need = tokens if window is None else min(tokens, window + GROW)
            caps += -(-need // self.grow) * self.grow
        return caps * 2 * self.kv_heads * self.row * elem <= self.budget_bytes

    # ---- allocation ---------------------------------------------------------------------
    def new_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        self.seqs[slot] = SeqKV(self.num_layers)
        return slot

    def _drop(self, kv: SeqKV) -> None:
        self.used_bytes -= kv.nbytes
        kv.k = [None] * self.num_layers
        kv.v = [None] * self.num_layers
        kv.k_all = kv.v_all = None

    def free(self, slot: int, keep_for_reuse: bool = False) -> None:
        kv = self.seqs.pop(slot, None)
        if kv is None:
            return
        if keep_for_reuse and kv.length > 0:
            self.prefix_cache[slot] = kv
            self.prefix_cache.move_to_end(slot)
        else:
            self._drop(kv)

    def clear_prefix_cache(self) -> None:
        while self.prefix_cache:
            self._drop(self.prefix_cache.popitem(last=False)[1])

    def drop_prefixes(self, tag: str) -> None:
        """Free the cached prefixes computed under adapter `tag` (it was unloaded: none can match again)."""
        for slot in [s for s, kv in self.prefix_cache.items() if kv.tag == tag]:
            self._drop(self.prefix_cache.pop(slot))

    def _evict_for(self, nbytes: int) -> bool:
        while self.used_bytes + nbytes > self.budget_bytes and self.prefix_cache:
            self._drop(self.prefix_cache.popitem(last=False)[1])
        return self.used_bytes + nbytes <= self.budget_bytes

    def reserve(self, slot: int, start: int, end: int, expect: int | None = None) -> bool:
        """Make room to write positions start..end-1 of `slot`; False if over budget.

        Positions before `start` are computed (the scheduler reserves from a sequence's
        num_computed), so a region that grows or slides keeps exactly those. `expect`: the length the
        sequence may reach (prompt + max_tokens); room grows toward it when the budget allows, since
        every regrowth copies the cache into memory the kernel must first fault in (1-4 ms a time).
        """
        kv = self.seqs[slot]
        kv.length = start
        if end <= kv.fits_until:
            return True
        for generous in (True, False):  # grow 2x (up to what is expected) when it fits, else just enough
            plans, extra = self._plan(kv, start, end, generous, expect)
            if not extra or self._evict_for(extra):
                if self.shared and len(plans) == self.num_layers and len({c for _, _, c in plans}) == 1:
                    self._regrow(kv, plans[0][2])
                else:
                    for layer, keep_from, new_cap in plans:
                        self._relayout(kv, layer, keep_from, new_cap)
                kv.fits_until = min(b + (0 if k is None else k.shape[1]) for b, k in zip(kv.base, kv.k))
                return True
        return False

    def _plan(self, kv: SeqKV, start: int, end: int, generous: bool, expect: int | None = None) -> tuple[list, int]:
        plans, extra = [], 0
        elem = self.elem_size
        for layer in range(self.num_layers):
            window, base = self.windows[layer], kv.base[layer]
            cap = 0 if kv.k[layer] is None else kv.k[layer].shape[1]
            if end - base <= cap:
                continue
            keep_from = base if window is None else max(base, start - window + 1)
            need = end - keep_from
            if need <= cap:
                plans.append((layer, keep_from, cap))  # shift the window only
                continue
            room = need
            if generous:  # twice the room, or what the sequence is expected to reach (at most 4x what it needs)
                room = max(need, 2 * cap, min((expect or 0) - keep_from, 4 * need))
            new_cap = -(-room // self.grow) * self.grow
            if window is not None:
                new_cap = min(new_cap, -(-(need + GROW) // GROW) * GROW)
            plans.append((layer, keep_from, new_cap))
            extra += (new_cap - cap) * 2 * self.kv_heads * self.row * elem
        return plans, extra

    def _alloc(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.alloc is not None:
            return self.alloc(shape, self.dtype)
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def _regrow(self, kv: SeqKV, new_cap: int) -> None:
        """Every layer to capacity new_cap at once (no windows: each holds positions 0..cap-1)."""
        k_all, v_all = (self._alloc((self.num_layers, self.kv_heads, new_cap, self.row)) for _ in range(2))
        if kv.length:
            if kv.k_all is not None:
                k_all[:, :, :kv.length] = kv.k_all[:, :, :kv.length]
                v_all[:, :, :kv.length] = kv.v_all[:, :, :kv.length]
            else:
                for layer, (k, v) in enumerate(zip(kv.k, kv.v)):
                    k_all[layer, :, :kv.length] = k[:, :kv.length]
                    v_all[layer, :, :kv.length] = v[:, :kv.length]
        self.used_bytes += 2 * k_all.numel() * k_all.element_size() - kv.nbytes
        kv.k, kv.v, kv.k_all, kv.v_all = list(k_all.unbind(0)), list(v_all.unbind(0)), k_all, v_all
        kv.base = [0] * self.num_layers
        kv.native = None

    def _relayout(self, kv: SeqKV, layer: int, keep_from: int, new_cap: int) -> None:
        old_k, old_v, base = kv.k[layer], kv.v[layer], kv.base[layer]
        keep = max(kv.length - keep_from, 0)
        if old_k is not None and old_k.shape[1] == new_cap:
            if keep and keep_from > base:  # shift the kept window to the front, in place
                s = keep_from - base
                old_k[:, :keep] = old_k[:, s:s + keep].clone()
                old_v[:, :keep] = old_v[:, s:s + keep].clone()
            kv.base[layer] = keep_from
            kv.fits_until = 0
            return
        shape = (self.kv_heads, new_cap, self.row)
        k, v = self._alloc(shape), self._alloc(shape)
        kv.k_all = kv.v_all = None  # the layers no longer share one tensor
        if old_k is not None and keep:
            s = keep_from - base
            k[:, :keep] = old_k[:, s:s + keep]
            v[:, :keep] = old_v[:, s:s + keep]
        self.used_bytes += (k.numel() + v.numel()) * k.element_size()
        if old_k is not None:
            self.used_bytes -= (old_k.numel() + old_v.numel()) * old_k.element_size()
        kv.k[layer], kv.v[layer], kv.base[layer] = k, v, keep_from
        kv.native = None
        kv.fits_until = 0

    def set_length(self, slot: int, length: int) -> None:
        """Positions 0..length-1 of `slot` are computed (after a step wrote them)."""
        self.seqs[slot].length = length

    def commit(self, slot: int, tokens: list[int], tag: str | None = None) -> None:
        """Record that the KV of `tokens` (all positions 0..len-1) is now computed (under adapter `tag`)."""
        kv = self.seqs[slot]
        kv.length = len(tokens)
        kv.tokens, kv.tag = tokens, tag

    # ---- prefix reuse -----------------------------------------------------------------------
    def take_prefix(self, prompt: list[int], tag: str | None = None) -> tuple[int | None, int]:
        """(slot, reused tokens) of the cached sequence (computed under the same adapter `tag`) sharing the
        longest prefix with `prompt`.

        At least the last prompt token is always left to compute (its logits are needed).
        """
        best, best_len = longest_prefix(self.prefix_cache, prompt,
                                        lambda kv, n: kv.tag == tag and self._window_keeps(kv, n))
        if best is None:
            return None, 0
        kv = self.prefix_cache.pop(best)
        kv.length, kv.tokens = best_len, kv.tokens[:best_len]
        slot = self._next_slot
        self._next_slot += 1
        self.seqs[slot] = kv
        return slot, best_len

    def _window_keeps(self, kv: SeqKV, n: int) -> bool:
        """Whether a windowed layer still holds the keys a continuation at position n needs."""
        return all(w is None or kv.base[i] <= max(0, n - w + 1) for i, w in enumerate(self.windows))

    def fork(self, src: int) -> int | None:
        """A new slot holding a copy of `src`'s KV (n > 1 choices share one prefill)."""
        kv = self.seqs[src]
        if not self._evict_for(kv.nbytes):
            return None
        slot = self.new_slot()
        dst = self.seqs[slot]
        dst.k = [t.clone() if t is not None else None for t in kv.k]
        dst.v = [t.clone() if t is not None else None for t in kv.v]
        dst.base, dst.length, dst.tokens = list(kv.base), kv.length, list(kv.tokens)
        self.used_bytes += dst.nbytes
        return slot

    # ---- attention ----------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, *,
               scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        out = torch.empty_like(q)
        row = 0
        for slot, start, n in zip(step.slots, step.starts, step.lengths):
            kv = self.seqs[slot]
            kc, vc, base = kv.k[layer], kv.v[layer], kv.base[layer]
            i0 = start - base
            k_from = base if window is None else max(base, start - window + 1)
            if self.dtype == torch.int8:
                kc[:, i0:i0 + n] = quantize_rows(k[row:row + n].transpose(0, 1))
                vc[:, i0:i0 + n] = quantize_rows(v[row:row + n].transpose(0, 1))
                keys = dequantize_rows(kc[:, k_from - base:i0 + n], q.dtype)
                vals = dequantize_rows(vc[:, k_from - base:i0 + n], q.dtype)
            else:
                kc[:, i0:i0 + n] = k[row:row + n].transpose(0, 1).to(self.dtype)
                vc[:, i0:i0 + n] = v[row:row + n].transpose(0, 1).to(self.dtype)
                keys = kc[:, k_from - base:i0 + n].to(q.dtype)
                vals = vc[:, k_from - base:i0 + n].to(q.dtype)
            o = attention(q[row:row + n].transpose(0, 1), keys, vals, start, k_from,
                          scale=scale, window=window, softcap=softcap)
            out[row:row + n] = o.transpose(0, 1)
            row += n
        return out

    def stats(self) -> dict:
        active = sum(kv.length for kv in self.seqs.values())
        cached = sum(kv.length for kv in self.prefix_cache.values())
        return {
            "kv_cache_bytes_used": self.used_bytes,
            "kv_cache_bytes_budget": self.budget_bytes,
            "kv_cache_tokens_active": active,
            "kv_cache_tokens_prefix_cache": cached,
            "kv_cache_tokens_free": max(self.budget_bytes - self.used_bytes, 0) // self.bytes_per_token,
            "kv_cache_sequences": len(self.seqs),
        }


class _Entry:
    __slots__ = ("length", "tag", "tokens")

    def __init__(self) -> None:
        self.length, self.tokens, self.tag = 0, [], None


class SlotLedger:
    """The scheduler's slots for a runner that keeps its own caches (a compiled model library).

    Bookkeeping only -- which slots exist, how many positions each has computed, and the tokens of
    finished ones for prefix reuse -- and no memory: the runner's states hold the keys and values.
    """

    dtype = None

    def __init__(self, max_cached: int = 64):
        self.seqs: dict[int, _Entry] = {}
        self.prefix_cache: OrderedDict[int, _Entry] = OrderedDict()
        self.max_cached = max_cached
        self._next_slot = 0

    def new_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        self.seqs[slot] = _Entry()
        return slot

    def fits(self, tokens: int) -> bool:
        return True  # the library's states are as long as its context window

    def reserve(self, slot: int, start: int, end: int, expect: int | None = None) -> bool:
        self.seqs[slot].length = start
        return True

    def set_length(self, slot: int, length: int) -> None:
        self.seqs[slot].length = length

    def commit(self, slot: int, tokens: list[int], tag: str | None = None) -> None:
        entry = self.seqs[slot]
        entry.length, entry.tokens, entry.tag = len(tokens), tokens, tag

    def free(self, slot: int, keep_for_reuse: bool = False) -> None:
        entry = self.seqs.pop(slot, None)
        if entry is not None and keep_for_reuse and entry.length > 0:
            self.prefix_cache[slot] = entry
            while len(self.prefix_cache) > self.max_cached:
                self.prefix_cache.popitem(last=False)

    def clear_prefix_cache(self) -> None:
        self.prefix_cache.clear()

    def drop_prefixes(self, tag: str) -> None:
        for slot in [s for s, e in self.prefix_cache.items() if e.tag == tag]:
            del self.prefix_cache[slot]

    def take_prefix(self, prompt: list[int], tag: str | None = None) -> tuple[int | None, int]:
        best, best_len = longest_prefix(self.prefix_cache, prompt, lambda e, n: e.tag == tag)
        if best is None:
            return None, 0
        entry = self.prefix_cache.pop(best)
        entry.length, entry.tokens = best_len, entry.tokens[:best_len]
        slot = self.new_slot()
        self.seqs[slot] = entry
        return slot, best_len

    def fork(self, src: int) -> int | None:
        slot = self.new_slot()
        self.seqs[slot].length = self.seqs[src].length
        self.seqs[slot].tokens = list(self.seqs[src].tokens)
        return slot

    def stats(self) -> dict:
        return {"kv_cache_tokens_active": sum(e.length for e in self.seqs.values()),
                "kv_cache_tokens_prefix_cache": sum(e.length for e in self.prefix_cache.values()),
                "kv_cache_sequences": len(self.seqs)}

"""The KV pool an engine (or a tensor-parallel rank) gets: its layers and heads, budget and dtype."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgellm.engine.kv_pool import KVPool
from edgellm.errors import UserError
from edgellm.quantization.modes import get_mode

if TYPE_CHECKING:
    from edgellm.config import ChatConfig
    from edgellm.engine.options import EngineOptions


def default_kv_budget(context_window: int) -> int:
    """KV budget in tokens when max_total_seq_length is not given: a few full-length sequences."""
    return max(context_window, 4 * min(context_window, 4096))



def make_pool(arch, cfg: ChatConfig, options: EngineOptions, device: str, ctx: int, cls=KVPool) -> KVPool:
    """The KV pool for `arch`'s layers and kv heads (a tensor-parallel rank's own heads), within the
    options' budget (max_total_seq_length, else default_kv_budget) and KV dtype."""
    windows = [w if options.sliding_window_size is None else options.sliding_window_size for w in arch.windows]
    budget = options.max_total_seq_length or default_kv_budget(ctx)
    kv_dtype = options.kv_dtype(get_mode(cfg.quantization).model_dtype)
    alloc = None
    if options.kvcache_mmap:  # MNN's kvcache_mmap: the KV cache in memory-mapped files under tmp_path
        if device != "cpu":
            raise UserError("kvcache_mmap keeps the KV cache in memory-mapped files: cpu only")
        from edgellm.engine.kv_pool import mmap_allocator

        alloc = mmap_allocator(options.tmp_path)
    return cls(arch.num_layers, arch.num_kv_heads, arch.head_dim, windows, budget, kv_dtype, device, alloc=alloc)

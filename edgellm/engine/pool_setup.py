"""The KV pool an engine (or a tensor-parallel rank) gets: its layers and heads, budget and dtype."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from edgellm.engine.kv_pool import KVPool
from edgellm.errors import UserError
from edgellm.quantization.modes import get_mode

if TYPE_CHECKING:
    from edgellm.config import ChatConfig
    from edgellm.engine.options import EngineOptions


def default_kv_budget(context_window: int) -> int:
    """KV budget in tokens when max_total_seq_length is not given: a few full-length sequences."""
    return max(context_window, 4 * min(context_window, 4096))



def mmap_allocator(tmp_path: str | None = None):
    """An allocator of CPU tensors backed by memory-mapped files under `tmp_path` (MNN's kvcache_mmap):
    the OS pages the KV cache out to disk under memory pressure. Each file is unlinked as soon as it
    is mapped, so nothing is left behind; its space is freed with the tensor."""
    import os
    import tempfile

    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        fd, path = tempfile.mkstemp(prefix="edgellm-kv-", suffix=".bin", dir=tmp_path)
        try:
            os.close(fd)
            t = torch.from_file(path, shared=True, size=max(numel, 1), dtype=dtype)
        finally:
            os.unlink(path)
        return t[:numel].view(shape)

    return alloc


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
        alloc = mmap_allocator(options.tmp_path)
    return cls(arch.num_layers, arch.num_kv_heads, arch.head_dim, windows, budget, kv_dtype, device, alloc=alloc)

"""Memory for the repacked weights in transparent huge pages.

A decode step streams every weight byte once. In 4 KiB pages that is a TLB miss (a page walk) every
4 KiB of the stream, and the hardware prefetchers stop at each page boundary; in 2 MiB pages neither
happens. Linux backs anonymous memory with huge pages only where asked (`transparent_hugepage` is
`madvise` on most distributions) and only in 2 MiB-aligned ranges, which torch's allocator gives
neither to the one-megabyte tensors a layer's weights are. So the repacked tensors of one model are
carved out of a few large aligned mappings marked MADV_HUGEPAGE. Elsewhere (no madvise, huge pages
off) this is plain memory and costs nothing: untouched pages of a mapping are never backed.
"""

from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20
CHUNK = 64 << 20  # bytes per mapping (a larger tensor gets one of its own)
ALIGN = 64  # every tensor starts on a cache line


class HugePageArena:
    """Bump allocator of tensors that live as long as the model (nothing is ever freed on its own:
    a mapping goes when the last tensor viewing it does)."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self._buf: torch.Tensor | None = None  # uint8 view of the current mapping, from its aligned start
        self._used = 0

    def _new_mapping(self, nbytes: int) -> None:
        size = -(-max(nbytes, self.chunk) // HUGE_PAGE) * HUGE_PAGE
        # anonymous and private (a shared mapping is shmem, which has its own huge-page switch); the extra
        # huge page leaves room to align
        private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}
        mm = mmap.mmap(-1, size + HUGE_PAGE, **private)
        whole = torch.frombuffer(mm, dtype=torch.uint8)  # keeps `mm` alive as long as any view of it
        skip = -whole.data_ptr() % HUGE_PAGE
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None:
            try:
                mm.madvise(advice, skip, size)  # before the first touch: faults then take whole huge pages
            except OSError:
                pass  # huge pages unavailable: 4 KiB pages, as before
        self._buf, self._used = whole[skip:skip + size], 0

    def empty(self, shape: tuple[int, ...] | int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor of `shape` and `dtype` in huge-page memory."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        start = -(-self._used // ALIGN) * ALIGN
        if self._buf is None or start + nbytes > self._buf.numel():
            self._new_mapping(nbytes)
            start = 0
        self._used = start + nbytes
        return self._buf[start:start + nbytes].view(dtype).view(shape)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (contiguous) copied into huge-page memory."""
        out = self.empty(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out

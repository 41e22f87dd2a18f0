"""The repacked weights live in huge-page memory (edgellm/quantization/arena.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgellm.quantization import kernels
from edgellm.quantization.arena import HUGE_PAGE, HugePageArena
from edgellm.quantization.layers import QuantLinear, repack_model
from edgellm.quantization.modes import get_mode
from edgellm.quantization.pack import quantize

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vma_fields(addr: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `addr`."""
    fields: dict[str, str] = {}
    hit = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            if hit:
                break
            hit = lo <= addr < hi
        elif hit:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def test_arena_tensors_are_aligned_distinct_and_writable():
    arena = HugePageArena(chunk=HUGE_PAGE)
    a = arena.empty((3, 5), torch.float16)
    b = arena.empty(100, torch.uint8)
    big = arena.empty(HUGE_PAGE + 1, torch.uint8)  # larger than a chunk: a mapping of its own
    for t in (a, b, big):
        assert t.data_ptr() % 64 == 0 and t.is_contiguous()
    assert a.shape == (3, 5) and a.dtype == torch.float16
    a.fill_(1.5)
    b.fill_(7)
    big.fill_(9)
    assert a.sum().item() == 22.5 and int(b.sum()) == 700 and a.max().item() == 1.5  # no overlap
    c = arena.copy(torch.arange(10, dtype=torch.float32))
    assert torch.equal(c, torch.arange(10, dtype=torch.float32))


@pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")
@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages")
def test_repacked_weights_are_in_huge_page_memory():
    mode = get_mode("q4f16_1")
    model = torch.nn.Sequential(QuantLinear(256, 512, False, mode), QuantLinear(512, 256, False, mode))
    ref = []
    for m in model:
        qw, qs = quantize(torch.randn(m.out_features, m.in_features), mode)
        m.q_weight.copy_(qw)
        m.q_scale.copy_(qs)
        ref.append(m.dequantized_weight())
    assert repack_model(model) == 2
    for m, w in zip(model, ref):
        for t in (m.packed.codes, m.packed.scale):
            fields = _vma_fields(t.data_ptr())
            assert fields.get("THPeligible") == "1", fields  # madvised before the first touch
        assert torch.equal(m.dequantized_weight(), w)  # the same weights, only elsewhere

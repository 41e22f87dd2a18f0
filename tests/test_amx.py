"""The AMX-int8 tile product (csrc/linear_amx.cpp) gives the AVX-512 kernels' results bit for bit.

On a CPU without AMX the tile kernel runs with its tiles emulated in C (mode 2): every line of its
logic (tiling, the B rows of 4-bit codes, the per-group epilogue, the rows and blocks it leaves to the
AVX-512 kernels) is exercised; the emulation does what the Intel SDM says tileloadd, tilezero,
tdpbsud and tilestored do. On a CPU with AMX, kernels.py turns the hardware tiles on only after the
same comparison (el_amx_selftest) passed in a child process, and the last test checks that verdict.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgellm.quantization import amx, kernels
from edgellm.quantization.layers import repack_model
from edgellm.quantization.modes import get_mode
from edgellm.quantization.pack import quantize
from tests.helpers import forward, kv_pool

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"native kernels unavailable: {kernels.unavailable_reason()}")


@pytest.fixture
def tiles():
    """The library, its tile mode restored afterwards; skips where the AMX kernel is not built (no AVX-512)."""
    lib = kernels.library()
    before = lib.el_amx_mode()
    if lib.el_amx_set(2) != 0:
        pytest.skip("the AMX kernel (and its emulation) is built on AVX-512 machines only")
    lib.el_amx_set(0)
    rows = lib.el_amx_min_rows(8)  # (a CPU with AMX may have timed its tiles faster only from more rows)
    yield lib
    lib.el_amx_min_rows(rows)
    lib.el_amx_set(before)


def _both(lib, fn):
    """fn() on the AVX-512 kernels, then on (emulated) tiles; also how many products ran on tiles."""
    lib.el_amx_set(0)
    want = fn()
    count = lib.el_amx_products()
    lib.el_amx_set(2)
    got = fn()
    lib.el_amx_set(0)
    return want, got, lib.el_amx_products() - count


@pytest.mark.parametrize("quant", ["q4f16_1", "q4f32_1", "q3f16_1", "q8f16_1"])
@pytest.mark.parametrize("n,k", [(100, 200), (40, 1000), (264, 544)])  # odd and partial last row blocks
def test_tile_product_equals_the_avx512_kernels(tiles, quant, n, k):
    mode = get_mode(quant)
    torch.manual_seed(n * k + 1)
    w = torch.randn(n, k) * torch.linspace(0.2, 3.0, k)
    pw = kernels.PackedWeight.from_quantized(*quantize(w, mode), mode, n, k, torch.randn(n), precision="normal")
    # one 8-row tile (a decode step of 8 sequences) and rows after it, one 16-row tile, pairs of them, and
    # rows past the last whole tile
    for m in (8, 13, 16, 29, 33, 70):
        x = torch.randn(m, k) * 3
        x[-1, : min(k, 40)] = 0.0  # a whole zero group
        want, got, on_tiles = _both(tiles, lambda x=x: pw.linear(x))
        assert on_tiles == 1, (m, on_tiles)
        assert torch.equal(got, want), (m, (got - want).abs().max().item())
    # fewer than 8 rows (decode of up to 7 sequences) and 16-bit activations (precision=high) stay on the
    # AVX-512 kernels
    _, _, on_tiles = _both(tiles, lambda: pw.linear(torch.randn(7, k)))
    assert on_tiles == 0
    pw.precision = "high"
    _, _, on_tiles = _both(tiles, lambda: pw.linear(torch.randn(8, k)))
    assert on_tiles == 0


def test_prefill_logits_on_tiles_equal_the_avx512_kernels(tiles, tiny_model_q4):
    from edgellm.models.loader import load_model

    model, cfg = load_model(tiny_model_q4, precision="normal")
    repack_model(model, "normal")
    ids = torch.arange(5, 45)  # 40 tokens: two row tiles and 8 rows after them

    def prefill():
        pool, slot = kv_pool(model, cfg.context_window_size)
        with torch.inference_mode():
            return forward(model, pool, slot, ids, 0)

    want, got, on_tiles = _both(tiles, prefill)
    assert on_tiles >= 4 * cfg.model_config["num_hidden_layers"], on_tiles  # every layer's products
    assert torch.equal(got, want)


def test_batched_decode_on_tiles_equals_the_avx512_kernels(tiles, tiny_model_q4):
    """Decode steps of 8 sequences (the fused native step: every product has 8 rows) give the same tokens
    and logits on 8-row tiles as on the AVX-512 kernels' 8-row pair kernel, and every product ran on tiles."""
    from tests.test_speed_paths import generate

    prompts = [[3 + 7 * i] for i in range(8)]  # one-token prompts: every step is a fused 8-row step

    def decode():
        return generate(tiny_model_q4, prompts, 4, "O2", precision="normal")

    want, got, on_tiles = _both(tiles, decode)
    runner, steps = got[2], got[3]
    assert steps == 4 and want[3] == 4  # the one native call for all 8 rows, every step
    assert on_tiles == steps * (4 * runner.model.cfg.num_layers + 1)  # every layer's 4 products and the head
    assert got[0] == want[0]
    for a, b in zip(got[1], want[1]):
        assert torch.equal(a, b)


def test_self_test_verdicts(tiles):
    assert tiles.el_amx_selftest(2) == 0  # the emulated tiles match the AVX-512 kernels


def test_hardware_tiles_are_on_exactly_where_the_cpu_has_them():
    lib = kernels.library()
    path = Path(lib._name)
    if lib.el_amx_cpu():
        # the CPU's own tiles match the AVX-512 kernels bit for bit (the child-process check amx.setup ran
        # before it decided), and they are on exactly when that check also timed them faster
        assert amx.probe(path, 300).startswith(("ok", "bit-exact")), amx.probe(path, 300)
        verdict = path.with_name("amx-selftest").read_text().strip()
        assert kernels.isa().endswith("+amx") == verdict.startswith("ok"), (kernels.isa(), verdict)
    else:
        assert lib.el_amx_selftest(1) == 2  # unavailable here, not "differs"
        assert lib.el_amx_set(1) == -1
        assert lib.el_amx_time(1, 16, 64, 64, 1, 1) < 0
        assert "+amx" not in kernels.isa()


def test_timing_restores_the_mode_and_the_threshold_follows_it(tiles):
    tiles.el_amx_set(2)
    assert tiles.el_amx_time(0, 16, 64, 64, 1, 1) > 0 and tiles.el_amx_time(2, 16, 64, 64, 1, 1) > 0
    assert tiles.el_amx_mode() == 2  # the timing left the mode as it found it
    # tiles from the fewest timed rows where they were faster at every larger count too
    assert amx.amx_min_rows({16: (1.0, 2.0), 64: (4.0, 3.0), 256: (16.0, 9.0)}) == 64
    assert amx.amx_min_rows({16: (1.0, 0.5), 64: (4.0, 3.0), 256: (16.0, 9.0)}) == 16
    assert amx.amx_min_rows({16: (1.0, 0.5), 64: (4.0, 5.0), 256: (16.0, 9.0)}) == 256
    assert amx.amx_min_rows({16: (1.0, 0.5), 64: (4.0, 3.0), 256: (16.0, 17.0)}) is None
    assert amx.verdict_rows("ok min_rows=64 (AVX-512 / tiles: ...)") == 64
    assert amx.verdict_rows("bit-exact, but the tiles were not faster ...") is None
    # the threshold: 16-row products stay on the AVX-512 kernels once tiles start at 64 rows; it is never
    # below the shortest row tile (8)
    assert tiles.el_amx_min_rows(2) == 8 and tiles.el_amx_min_rows(0) == 8
    mode = get_mode("q4f16_1")
    pw = kernels.PackedWeight.from_quantized(*quantize(torch.randn(32, 64), mode), mode, 32, 64)
    try:
        tiles.el_amx_min_rows(64)
        _, _, on_tiles = _both(tiles, lambda: pw.linear(torch.randn(16, 64)))
        assert on_tiles == 0
        _, _, on_tiles = _both(tiles, lambda: pw.linear(torch.randn(64, 64)))
        assert on_tiles == 1
    finally:
        tiles.el_amx_min_rows(8)


def test_the_gate_follows_the_cached_verdict(tmp_path, monkeypatch):
    """amx.setup on a CPU with AMX reads the verdict kept beside the library: tiles on from its row count,
    or off with a warning. (The library here is a stand-in that records the calls: this CPU has no AMX,
    so the real one never reaches this code.)"""

    class Lib:
        def __init__(self):
            self.calls = []

        def el_amx_cpu(self):
            return 1

        def el_amx_set(self, mode):
            self.calls.append(("set", mode))
            return 0

        def el_amx_min_rows(self, rows):
            self.calls.append(("rows", rows))
            return 16

    monkeypatch.delenv("EDGELLM_AMX", raising=False)
    lib_path = tmp_path / "libedgellm_kernels.so"
    stamp = tmp_path / "amx-selftest"
    stamp.write_text("ok min_rows=64 (AVX-512 / tiles: 16 rows 90 / 120 us, 64 rows 350 / 200 us)\n")
    lib = Lib()
    amx.setup(lib, lib_path, 10)
    assert lib.calls == [("set", 1), ("rows", 64)]
    stamp.write_text("bit-exact, but the tiles were not faster than the AVX-512 kernels (...)\n")
    lib = Lib()
    amx.setup(lib, lib_path, 10)
    assert lib.calls == []
    monkeypatch.setenv("EDGELLM_AMX", "off")
    stamp.write_text("ok min_rows=16\n")
    lib = Lib()
    amx.setup(lib, lib_path, 10)
    assert lib.calls == []

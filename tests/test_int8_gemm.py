"""precision=normal: the int8 GEMM (8-bit activations per group, u8s8 dot products) computes exactly
the quantized math it promises, at every row count, with each row independent of the others; and the
kernel library is refused when its C ABI is not the one kernels.py speaks."""

from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch

from edgellm.errors import UserError
from edgellm.quantization import kernel_build, kernels
from edgellm.quantization.layers import QuantLinear, set_precision
from edgellm.quantization.modes import get_mode, with_layout
from edgellm.quantization.pack import quantize, unpack

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"native kernels unavailable: {kernels.unavailable_reason()}")


def int8_reference(x: torch.Tensor, q_weight: torch.Tensor, q_scale: torch.Tensor, mode, k: int) -> torch.Tensor:
    """The promised math in torch: per row and group of gs, a = round(x * 127 / max|x|) (ties to even),
    exact integer dot products with the weights' integer values, scaled by both scales, float64 sums."""
    n, gs, kp = q_weight.shape[0], mode.group_size, mode.padded_k(k)
    off = 0 if mode.kind == "int8" else mode.max_int
    w = (unpack(q_weight, mode) - off).to(torch.int64).view(n, kp // gs, gs)
    xp = torch.nn.functional.pad(x.float(), (0, kp - k)).view(x.shape[0], kp // gs, gs)
    amax = xp.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    a = torch.round(xp * inv).clamp(-127, 127).to(torch.int64)
    sa = torch.where(amax > 0, amax / 127.0, torch.zeros_like(amax)).squeeze(-1)
    dots = torch.einsum("mgk,ngk->mng", a, w)
    return (dots.double() * (q_scale.double()[None] * sa.double()[:, None])).sum(-1)


# q4f16_1:128 = groups of 128 (each kernel has a path for groups of 32 and one for longer multiples of 32)
@pytest.mark.parametrize("quant", ["q4f16_1", "q4f16_1:128", "q4f32_1", "q3f16_1", "q8f16_1"])
@pytest.mark.parametrize("n,k", [(100, 200), (96, 64), (40, 1000), (264, 544)])  # K not a multiple of 256
def test_int8_gemm_matches_reference_math(quant, n, k):
    name, _, gs = quant.partition(":")
    mode = get_mode(name) if not gs else with_layout(get_mode(name), group_size=int(gs))
    torch.manual_seed(n * k)
    w = torch.randn(n, k) * torch.linspace(0.2, 3.0, k)
    qw, qs = quantize(w, mode)
    bias = torch.randn(n)
    pw = kernels.PackedWeight.from_quantized(qw, qs, mode, n, k, bias, precision="normal")
    for m in (1, 3, 4, 7, 9, 33, 70):  # odd counts: the multi-row blocks and their remainders
        x = torch.randn(m, k) * 3
        x[0, :7] = 0.0
        x[-1, : min(k, 40)] = 0.0  # a whole zero group
        ref = int8_reference(x, qw, qs, mode, k) + bias.double()
        got = pw.linear(x)
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, (m, err)
        # each row is quantized and multiplied on its own: batching changes no bit of it
        for i in range(m):
            assert torch.equal(got[i], pw.linear(x[i:i + 1])[0]), (m, i)


def test_precision_selects_activation_bits_on_layers():
    mode = get_mode("q4f16_1")
    lin = QuantLinear(200, 48, False, mode)
    qw, qs = quantize(torch.randn(48, 200), mode)
    lin.q_weight.copy_(qw)
    lin.q_scale.copy_(qs)
    x = torch.randn(20, 200)
    ref = lin(x)  # the float32 dequantized reference
    assert lin.precision == "normal"  # the default
    lin.repack()
    normal = lin(x)
    assert torch.allclose(normal.double(), int8_reference(x, qw, qs, mode, 200).float().double(), atol=1e-4)
    set_precision(lin, "high")
    assert lin.packed.precision == "high"
    high = lin(x)
    assert (high - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (normal - ref).abs().max() > (high - ref).abs().max()  # 8-bit activations do round more
    with pytest.raises(UserError, match="unknown precision 'ultra'"):
        set_precision(lin, "ultra")


def test_library_with_another_abi_is_refused(tmp_path):
    src = tmp_path / "old.cpp"
    src.write_text('extern "C" int el_abi_version() { return 1; }\n'
                   'extern "C" int el_sizeof(int which) { return 8; }\n')
    lib_path = tmp_path / "libold.so"
    subprocess.run(["g++", "-shared", "-fPIC", str(src), "-o", str(lib_path)], check=True)
    with pytest.raises(RuntimeError, match="kernel ABI 1"):
        kernel_build.check_abi(ctypes.CDLL(str(lib_path)), lib_path)
    kernel_build.check_abi(kernels.library(), tmp_path / "current")  # the built one passes


def test_engine_option_precision_is_checked_before_loading():
    from edgellm.engine.options import make_options

    assert make_options({"precision": "high"}).precision == "high"
    with pytest.raises(UserError, match="unknown precision 'ultra'"):
        make_options({"precision": "ultra"})


@pytest.mark.parametrize("precision", ["normal", "high"])
def test_products_from_two_threads_at_once_equal_one_at_a_time(precision):
    """Two engines in one process step from their own threads: each call's phases wait on a barrier of
    its own team, so concurrent products give the bits a lone call gives (and finish)."""
    import threading

    mode = get_mode("q4f16_1")
    torch.manual_seed(7)
    pw = kernels.PackedWeight.from_quantized(*quantize(torch.randn(200, 320), mode), mode, 200, 320,
                                             precision=precision)
    xs = [torch.randn(m, 320) for m in (1, 2, 5, 8, 40)]
    want = [pw.linear(x) for x in xs]
    bad: list[str] = []

    def worker(seed: int) -> None:
        torch.set_num_threads(2)
        for r in range(60):
            i = (r + seed) % len(xs)
            if not torch.equal(pw.linear(xs[i]), want[i]):
                bad.append(f"thread {seed} round {r} rows {xs[i].shape[0]}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a product never finished"
    assert not bad, bad

"""Native CPU kernels for quantized layers and the fused decode step.

Why native code: PyTorch's fast int4 kernel (`_weight_int4pack_mm_for_cpu`) needs bfloat16
activations, which moves results by about 1e-2; with float32 activations it is ~30x slower.
An inductor-generated dequantize-and-dot GEMV over the packed words measured about 3x slower
than that bf16 kernel (and a compiled graph pays a dispatcher round trip per custom op), so the
quantized products are a few small C++ files (csrc/, split by concern and ISA; common.h describes
the C ABI and the layouts): weights repacked at load into 16-row blocks, activations quantized per
group, exact integer u8s8 dot products per group (AVX512-VNNI vpdpbusd; on AVX2-only CPUs
vpmaddubsw + vpmaddwd, or AVX-VNNI; a portable scalar fallback elsewhere), float32 scales. Each
row is quantized on its own, so its result never depends on the other rows in the batch.
`precision` (MNN-LLM's option, set per layer at load) picks the activations:
  high: 16 bits (2^-15 relative step, well below the f16 rounding of the weights' scales) split
    into two int8 planes -- within about 1e-5 of the float32 dequantized reference; more than
    GEMV_MAX_ROWS rows go through dequantize + float32 GEMM (at float32 peak) instead.
    (Three planes, 21-bit activations, were within 1e-6 but cost a quarter more per batched step.)
  normal (default): 8 bits per group of 32, one plane, as llama.cpp's Q8 activations, at every row
    count: half the integer work of `high`, and prefill becomes an int8 GEMM (activation rows in
    blocks of 4 per weight load on AVX2, 8 on AVX-512; on a CPU with AMX-INT8, products of 8 rows or
    more (prefill, batched decode) run on AMX tiles once a self-test on the machine has matched them to
    the AVX-512 kernels bit for bit and timed them faster: see csrc/linear_amx.cpp and quantization/amx.py).
Measured on the 2-core AVX-512 machine, one thread, 1536x576 / 8960x1536 q4f16_1 GEMV (high): this
kernel 38 / 411 us; `_weight_int4pack_mm_for_cpu` with bf16 activations 64 / 1022 us; the best
inductor expression 223 / 3589 us.

The library has a plain C ABI (no PyTorch headers), so g++ builds it (kernel_build.py) in about 6
seconds on 2 cores (one compiler per source file at once, then a link), once; it is cached under
`$EDGELLM_HOME/kernels/<hash of every source, compiler and CPU flags>/` and loaded with ctypes, after
an ABI handshake (`el_abi_version`, struct sizes). It uses the OpenMP runtime PyTorch already loaded,
with PyTorch's thread count. Without a compiler (or with EDGELLM_NATIVE=0) `available()` is False and
layers keep the reference path.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading

import torch

from edgellm.errors import UserError
from edgellm.quantization import kernel_build
from edgellm.quantization.arena import HugePageArena

# the ABI's structs, named here for the kernels' users (K.EModel, K.ELayer)
from edgellm.quantization.kernel_build import ELayer, ELinear, EModel  # noqa: F401

log = logging.getLogger("edgellm.kernels")

# activation precision of quantized products (MNN-LLM's option name): activation bits
PRECISIONS = {"high": 16, "normal": 8, "low": 8}  # MNN's "low": the fewest bits we offer
ROW_BLOCK = 16

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when unavailable."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lock:
        if _lib is None and _lib_error is None:
            if os.environ.get("EDGELLM_NATIVE", "1") in ("0", "false", "off"):
                _lib_error = "disabled by EDGELLM_NATIVE=0"
            elif platform.machine().lower() not in ("x86_64", "amd64"):
                _lib_error = f"native kernels are x86-64 only (this is {platform.machine()})"
            else:
                try:
                    _lib = kernel_build.build()
                except Exception as e:  # no compiler, odd platform: the reference path still works
                    _lib_error = str(e)
                    log.warning("edgellm native kernels unavailable, using the reference path: %s", e)
    return _lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    library()
    return _lib_error


def isa() -> str:
    """Which kernel variant was built: "avx512-vnni", "avx2", "portable" or "none"; "+amx" when the
    AMX tile product is on ("+amx-emulated" under EDGELLM_AMX=emulate)."""
    lib = library()
    if lib is None:
        return "none"
    name = {512: "avx512-vnni", 256: "avx2"}.get(lib.el_isa(), "portable")
    return name + {1: "+amx", 2: "+amx-emulated"}.get(lib.el_amx_mode(), "")


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS ("high", "normal"), else a UserError naming them."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    return precision


def threads() -> int:
    return max(1, torch.get_num_threads())


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def argmax_rows(x: torch.Tensor) -> list[int]:
    """Each row's argmax of x [B, N] (float32) by the native kernel the decode step uses (numpy's
    semantics: the first maximum; the first NaN if a row has one)."""
    x = x.float().contiguous()
    out = (ctypes.c_int32 * x.shape[0])()
    library().el_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out, threads())
    return list(out)


class PackedWeight:
    """A quantized (or float32) [N, K] weight in the kernels' layout, with its ctypes descriptor.

    fmt 4: q4*/q3* nibble codes; fmt 8: q8 codes; fmt 32: plain float32. `precision` (see
    `check_precision`) picks the activations of quantized products: "high" = 16 bits (within about
    1e-5 of the float32 dequantized reference; more than GEMV_MAX_ROWS rows go through dequantize +
    float32 GEMM), "normal" = 8 bits per group of 32 at every row count (the int8 GEMM).
    """

    def __init__(self, fmt: int, n: int, k: int, kp: int, gs: int, off: int, codes: torch.Tensor | None,
                 scale: torch.Tensor | None, bias: torch.Tensor | None, wf: torch.Tensor | None = None,
                 precision: str = "normal"):
        self.fmt, self.n, self.k, self.kp, self.gs, self.off = fmt, n, k, kp, gs, off
        self.codes, self.scale, self.wf = codes, scale, wf
        self.bias = None if bias is None else bias.detach().float().contiguous()
        d = ELinear()
        d.w, d.scale, d.bias, d.wf = _ptr(codes), _ptr(scale), _ptr(self.bias), _ptr(wf)
        d.N, d.K, d.Kp = n, k, kp
        d.G = kp // gs if gs else 0
        d.gs, d.fmt, d.off = gs, fmt, off
        d.half = int(scale is not None and scale.dtype == torch.float16)
        d.abits = PRECISIONS[check_precision(precision)]
        self.desc = d
        self.ref = ctypes.byref(d)

    @property
    def precision(self) -> str:
        return "high" if self.desc.abits == 16 else "normal"

    @precision.setter
    def precision(self, value: str) -> None:
        # a fused decoder built earlier keeps its own copy of the descriptor: set this before building one
        self.desc.abits = PRECISIONS[check_precision(value)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.bias, self.wf)
                   if t is not None)

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, q_weight: torch.Tensor, q_scale: torch.Tensor, mode, n: int, k: int,
                       bias: torch.Tensor | None = None, precision: str = "normal",
                       arena: HugePageArena | None = None) -> PackedWeight:
        """`arena` (optional): where the packed codes and scales live."""
        lib = library()
        empty = torch.empty if arena is None else arena.empty
        kp, gs = mode.padded_k(k), mode.group_size
        nb = -(-n // ROW_BLOCK)
        qw = q_weight.contiguous()
        if mode.kind == "group":
            if mode.bits > 4:
                raise ValueError(f"no packed layout for {mode.bits}-bit groups")
            codes = empty(nb * kp * 8, dtype=torch.uint8)
            lib.el_repack_nib(qw.data_ptr(), n, kp, mode.bits, mode.elems_per_word, mode.max_int,
                              codes.data_ptr(), threads())
            fmt, off = 4, mode.max_int
        else:
            codes = empty(nb * kp * 16, dtype=torch.uint8)
            lib.el_repack_q8(qw.data_ptr(), n, kp, codes.data_ptr(), threads())
            fmt, off = 8, 128
        # f16 scales on disk (q4f16_1, q8f16_1...) stay f16 here even when the model upcast them at load:
        # the conversion back is exact and halves the scale bytes every decode step reads.
        sdt = torch.float16 if torch.float16 in (q_scale.dtype, mode.model_dtype) else torch.float32
        groups = kp // gs
        s = torch.zeros(nb * ROW_BLOCK, groups, dtype=sdt)
        s[:n] = q_scale.to(sdt)
        s = s.view(nb, ROW_BLOCK, groups).transpose(1, 2).contiguous()
        if arena is not None:
            s = arena.copy(s)
        return cls(fmt, n, k, kp, gs, off, codes, s, bias, precision=precision)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedWeight:
        w = weight.detach()
        if w.dtype != torch.float32 or not w.is_contiguous():
            w = w.float().contiguous()
        n, k = w.shape
        return cls(32, n, k, k, 0, 0, None, None, bias, wf=w)

    # ---- compute ---------------------------------------------------------------------------
    def dequantize(self, rows: slice | None = None) -> torch.Tensor:
        """float32 [rows, K] (all rows by default)."""
        n0, n1 = (0, self.n) if rows is None else (rows.start or 0, self.n if rows.stop is None else rows.stop)
        out = torch.empty(n1 - n0, self.k)
        library().el_dequant(self.ref, n0, n1, out.data_ptr(), self.k, threads())
        return out

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids` (any shape) -> [*ids.shape, K] float32."""
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.n):
            raise IndexError(f"token id out of range for an embedding of {self.n} rows")
        out = torch.empty(flat.numel(), self.k)
        library().el_gather(self.ref, flat.data_ptr(), flat.numel(), out.data_ptr(), threads())
        return out.view(*ids.shape, self.k)

    # rows up to which the fused integer product beats dequantize + float32 GEMM
    GEMV_MAX_ROWS = 8
    # float32 rows dequantized at once on the GEMM path (bounds its temporary buffer)
    CHUNK_ELEMS = 4 << 20

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32 -> [..., N] float32 = x @ W.T (+ bias)."""
        shape = x.shape
        x2 = x.reshape(-1, self.k)
        if x2.dtype != torch.float32 or x2.stride(-1) != 1:
            x2 = x2.float().contiguous()
        m = x2.shape[0]
        if m <= self.GEMV_MAX_ROWS or self.fmt == 32 or self.desc.abits == 8:
            out = torch.empty(m, self.n)
            if m:
                library().el_linear(self.ref, x2.data_ptr(), m, x2.stride(0), out.data_ptr(), self.n, threads())
            return out.view(*shape[:-1], self.n)
        rows = max(ROW_BLOCK, self.CHUNK_ELEMS // max(self.k, 1) // ROW_BLOCK * ROW_BLOCK)
        if rows >= self.n:
            out = torch.nn.functional.linear(x2, self.dequantize(), self.bias)
        else:
            out = torch.empty(m, self.n)
            for n0 in range(0, self.n, rows):
                n1 = min(self.n, n0 + rows)
                out[:, n0:n1] = x2 @ self.dequantize(slice(n0, n1)).t()
            if self.bias is not None:
                out += self.bias
        return out.view(*shape[:-1], self.n)

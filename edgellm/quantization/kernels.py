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
    blocks of 4 per weight load on AVX2, 8 on AVX-512; on a CPU with AMX-INT8, products of 16 rows or
    more run on AMX tiles once a self-test on the machine has matched them to the AVX-512 kernels bit
    for bit: see csrc/linear_amx.cpp and quantization/amx.py).
Measured on the 2-core AVX-512 machine, one thread, 1536x576 / 8960x1536 q4f16_1 GEMV (high): this
kernel 38 / 411 us; `_weight_int4pack_mm_for_cpu` with bf16 activations 64 / 1022 us; the best
inductor expression 223 / 3589 us.

The library has a plain C ABI (no PyTorch headers), so g++ builds it in about 6 seconds on 2 cores (one
compiler per source file at once, then a link), once; it is
cached under `$EDGELLM_HOME/kernels/<hash of every source, compiler and CPU flags>/` and loaded with
ctypes, after an ABI handshake (`el_abi_version`, struct sizes). It uses the OpenMP runtime PyTorch
already loaded, with PyTorch's thread count. Without
a compiler (or with EDGELLM_NATIVE=0) `available()` is False and layers keep the reference path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from edgellm.errors import UserError
from edgellm.paths import edgellm_home
from edgellm.quantization import amx
from edgellm.quantization.arena import HugePageArena

log = logging.getLogger("edgellm.kernels")

CSRC = Path(__file__).with_name("csrc")
# The C ABI this module speaks (EL_ABI_VERSION in csrc/common.h); a library that answers otherwise is refused.
ABI_VERSION = 10
# activation precision of quantized products (MNN-LLM's option name): activation bits
PRECISIONS = {"high": 16, "normal": 8, "low": 8}  # MNN's "low": the fewest bits we offer
# EDGELLM_KERNEL_MARCH picks another target (e.g. x86-64-v3 to exercise the portable path).
FLAGS = ["-O3", f"-march={os.environ.get('EDGELLM_KERNEL_MARCH', 'native')}", "-fopenmp", "-fPIC", "-shared",
         "-std=c++17", "-fno-math-errno"]
ROW_BLOCK = 16

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()


class ELinear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("wf", ctypes.c_void_p)] + [
        (n, ctypes.c_int32) for n in ("N", "K", "Kp", "G", "gs", "fmt", "half", "off", "abits")]


class ELayer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("ln1", "ln2", "ln1b", "ln2b", "pn1", "pn2", "qn", "kn")] + [
        (n, ctypes.c_int32) for n in ("norm", "parallel", "act", "gated")] + [
        ("qkv", ELinear), ("o", ELinear), ("gu", ELinear), ("down", ELinear)]


class EModel(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("L", "H", "nh", "nkv", "D", "rot", "I", "maxpos")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("softcap", ctypes.c_float),
        ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
        ("layers", ctypes.POINTER(ELayer)), ("fn_kind", ctypes.c_int32), ("fn_w", ctypes.c_void_p),
        ("fn_b", ctypes.c_void_p), ("head", ctypes.POINTER(ELinear)), ("embed", ctypes.POINTER(ELinear))]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_root() -> Path:
    return edgellm_home() / "kernels"


def _compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


def build_timeout() -> float:
    """Seconds a compiler may take (EDGELLM_KERNEL_BUILD_TIMEOUT, default 120): a hung one must not hang start."""
    try:
        return max(float(os.environ.get("EDGELLM_KERNEL_BUILD_TIMEOUT", "120")), 0.1)
    except ValueError:
        return 120.0


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=build_timeout())
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{cmd[0]} did not finish within {build_timeout():g} s "
                           f"(EDGELLM_KERNEL_BUILD_TIMEOUT)") from None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync_write(path: Path, data: bytes | None = None) -> None:
    """fsync `path` (writing `data` first if given) so a rename after it cannot publish a torn file."""
    with open(path, "r+b" if data is None else "wb") as f:
        if data is not None:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _verified(lib_path: Path) -> bool:
    """The cached library is whole: its size and sha256 match the stamp written with it."""
    stamp = lib_path.with_name(lib_path.name + ".sha256")
    try:
        size, digest = stamp.read_text().split()
        return lib_path.stat().st_size == int(size) > 0 and _digest(lib_path) == digest
    except (OSError, ValueError):
        return False


def _compile(cxx: str, out_dir: Path, lib_path: Path, sources: list[Path]) -> None:
    """Compile into a temporary file, fsync it, then rename it and its stamp into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.part", dir=out_dir)
    os.close(fd)
    objs = tempfile.mkdtemp(suffix=".objs.part", dir=out_dir)
    try:
        # one compiler per source, as many at once as there are CPUs (2 cores: the build in about half
        # the time), then one link
        compile_flags = [f for f in FLAGS if f != "-shared"]
        outs = [str(Path(objs) / (src.stem + ".o")) for src in sources]
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            jobs = [pool.submit(_run, [cxx, *compile_flags, "-c", str(src), "-o", out])
                    for src, out in zip(sources, outs)]
            for job in jobs:
                try:
                    res = job.result()
                    if res.returncode != 0:
                        raise RuntimeError(f"compiling the kernels in {CSRC} failed: {res.stderr.strip()[-2000:]}")
                except Exception:
                    pool.shutdown(cancel_futures=True)  # the compilers not started yet need not run
                    raise
        res = _run([cxx, *FLAGS, *outs, "-o", tmp])
        if res.returncode != 0:
            raise RuntimeError(f"linking the kernels in {CSRC} failed: {res.stderr.strip()[-2000:]}")
        _fsync_write(Path(tmp))
        stamp_tmp = Path(tmp + ".sha256")
        _fsync_write(stamp_tmp, f"{os.path.getsize(tmp)} {_digest(Path(tmp))}\n".encode())
        os.replace(tmp, lib_path)
        os.replace(stamp_tmp, lib_path.with_name(lib_path.name + ".sha256"))
        dir_fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        shutil.rmtree(objs, ignore_errors=True)
        for leftover in (tmp, tmp + ".sha256"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def _build() -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++/clang++)")
    files = sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h"))
    src = b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in files)
    version = _run([cxx, "--version"]).stdout.splitlines()[:1]
    key = hashlib.sha256(src + repr((FLAGS, version, _cpu_flags(), platform.machine())).encode()).hexdigest()[:16]
    out_dir = _cache_root() / key
    lib_path = out_dir / "libedgellm_kernels.so"
    if not _verified(lib_path):
        if lib_path.exists():  # truncated, emptied or unstamped: loading it could crash the process (SIGBUS)
            log.warning("edgellm native kernels: cached %s is damaged, rebuilding it", lib_path)
        _compile(cxx, out_dir, lib_path, [p for p in files if p.suffix == ".cpp"])
    lib = ctypes.CDLL(str(lib_path))
    _check_abi(lib, lib_path)
    vp, i32, i64p = ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p
    lib.el_isa.restype = i32
    lib.el_repack_nib.argtypes = [vp, i32, i32, i32, i32, i32, vp, i32]
    lib.el_repack_q8.argtypes = [vp, i32, i32, vp, i32]
    lib.el_dequant.argtypes = [ctypes.POINTER(ELinear), i32, i32, vp, i32, i32]
    lib.el_gather.argtypes = [ctypes.POINTER(ELinear), i64p, i32, vp, i32]
    lib.el_linear.argtypes = [ctypes.POINTER(ELinear), vp, i32, i32, vp, i32, i32]
    lib.el_decode_scratch_bytes.argtypes = [ctypes.POINTER(EModel), i32, i32, i32]
    lib.el_decode_scratch_bytes.restype = ctypes.c_size_t
    lib.el_read.argtypes = [vp, ctypes.c_size_t, i32, i32]
    lib.el_read.restype = ctypes.c_double
    lib.el_decode.argtypes = [ctypes.POINTER(EModel), i32, vp, vp, vp, vp, vp, vp, vp, vp, i32, i32, i32, vp, vp, vp]
    lib.el_argmax_rows.argtypes = [vp, i32, i32, vp, i32]
    lib.el_amx_set.argtypes = [i32]
    lib.el_amx_selftest.argtypes = [i32]
    lib.el_amx_products.restype = ctypes.c_long
    lib.el_amx_min_rows.argtypes = [i32]
    lib.el_amx_min_rows.restype = i32
    lib.el_amx_time.restype = ctypes.c_double
    lib.el_amx_time.argtypes = [i32] * 6
    amx.setup(lib, lib_path, build_timeout())
    return lib


def _check_abi(lib: ctypes.CDLL, path: Path) -> None:
    """Refuse a library built from other sources than the structs above describe."""
    try:
        lib.el_abi_version.restype = ctypes.c_int
        lib.el_sizeof.restype = ctypes.c_int
        lib.el_sizeof.argtypes = [ctypes.c_int]
        version = lib.el_abi_version()
        sizes = [lib.el_sizeof(i) for i in range(3)]
    except AttributeError:
        version, sizes = None, []
    want = [ctypes.sizeof(t) for t in (ELinear, ELayer, EModel)]
    if version != ABI_VERSION or sizes != want:
        raise RuntimeError(f"{path} speaks kernel ABI {version} with struct sizes {sizes}, this edgellm needs "
                           f"ABI {ABI_VERSION} with {want}; delete it to rebuild")


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
                    _lib = _build()
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

"""Building, caching and loading the native kernel library (csrc/): the C ABI's structs, one compiler
per source file then a link, a sha256-stamped cache under `$EDGELLM_HOME/kernels/<key>/`, and the ABI
handshake. `edgellm.quantization.kernels.library()` calls `build()` once per process."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edgellm.paths import edgellm_home
from edgellm.quantization import amx

log = logging.getLogger("edgellm.kernels")

CSRC = Path(__file__).with_name("csrc")
# The C ABI this module speaks (EL_ABI_VERSION in csrc/common.h); a library that answers otherwise is refused.
ABI_VERSION = 10
# EDGELLM_KERNEL_MARCH picks another target (e.g. x86-64-v3 to exercise the portable path).
FLAGS = ["-O3", f"-march={os.environ.get('EDGELLM_KERNEL_MARCH', 'native')}", "-fopenmp", "-fPIC", "-shared",
         "-std=c++17", "-fno-math-errno"]


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


def build() -> ctypes.CDLL:
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
    check_abi(lib, lib_path)
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


def check_abi(lib: ctypes.CDLL, path: Path) -> None:
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

"""Issue 18 item 8: a damaged kernel cache is rebuilt, a hung compiler falls back in bounded time.

Through the real CLI (`edgellm bench` on a q4 model, which loads the native kernels), each in a fresh
process with its own EDGELLM_HOME.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None, reason="no C++ compiler")


def bench(model: Path, home: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "edgellm", "bench", str(model), "--prompt-len", "4", "--gen-len", "2",
                        "--repeat", "1", "--no-bandwidth"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "EDGELLM_HOME": str(home), "EDGELLM_NATIVE": "1", **env})
    return r, time.monotonic() - t0


def cached_library(home: Path) -> Path:
    libs = list((home / "kernels").glob("*/libedgellm_kernels.so"))
    assert len(libs) == 1, libs
    return libs[0]


@pytest.mark.slow
def test_damaged_cached_library_is_rebuilt(tiny_model_q4, tmp_path):
    r, _ = bench(tiny_model_q4, tmp_path)
    assert r.returncode == 0 and "unavailable" not in r.stderr, r.stderr[-2000:]
    lib = cached_library(tmp_path)
    good = lib.stat().st_size
    for size in (4096, 0):  # truncated (used to crash every start with SIGBUS), then emptied
        with open(lib, "r+b") as f:
            f.truncate(size)
        r, _ = bench(tiny_model_q4, tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]  # not SIGBUS (-7)
        assert "damaged, rebuilding" in r.stderr and "unavailable" not in r.stderr, r.stderr[-2000:]
        assert cached_library(tmp_path).stat().st_size == good
        assert not list(lib.parent.glob("*.part*"))  # no temporary files left behind


def test_hung_compiler_falls_back_within_the_bound(tiny_model_q4, tmp_path):
    cxx = tmp_path / "hung-g++"
    cxx.write_text("#!/bin/sh\nsleep 600\n")
    cxx.chmod(0o755)
    r, took = bench(tiny_model_q4, tmp_path, CXX=str(cxx), EDGELLM_KERNEL_BUILD_TIMEOUT="3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert took < 120, took
    warnings = [ln for ln in r.stderr.splitlines() if "native kernels unavailable" in ln]
    assert len(warnings) == 1 and "did not finish within 3 s" in warnings[0], r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("march", ["x86-64-v3", "alderlake", "x86-64"])
def test_other_instruction_sets_compute_the_same_products(march, tmp_path):
    """The AVX2, AVX2 + AVX-VNNI (alderlake: most laptops' CPUs, no AVX-512) and portable kernels (built
    with EDGELLM_KERNEL_MARCH on whatever CPU runs CI) pass the int8 GEMM's reference math and the fused
    decode step's parity: a change to shared code (the barrier, the dispatch) is checked on every
    instruction set, not only the one this machine picks."""
    import os
    import platform
    import subprocess
    import sys

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86-64 instruction sets")
    if march == "alderlake":
        with open("/proc/cpuinfo") as f:
            if " avx_vnni" not in f.read():
                pytest.skip("this CPU has no AVX-VNNI")
    env = {**os.environ, "EDGELLM_KERNEL_MARCH": march, "EDGELLM_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "tests/test_int8_gemm.py", "tests/test_speed_paths.py::test_fused_decode_matches_reference",
                        "tests/test_speed_paths.py::test_fused_decode_real_head_dims"],
                       env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-500:]

"""The gate of the AMX-int8 tile product (csrc/linear_amx.cpp, csrc/amx_check.cpp).

On a CPU with AMX-INT8 the tiles are turned on only after a child process on this machine has run the
tile kernel against the AVX-512 kernels (bit for bit) and timed both, and only from the row count where
the tiles were faster; the verdict is kept beside the built library. EDGELLM_AMX=off keeps them off;
EDGELLM_AMX=emulate runs the tile kernel's logic with the tile operations emulated in C (the tests' way
to check it on CPUs without AMX).
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("edgellm.kernels")

VERDICTS = {1: "its results differ from the AVX-512 kernels'", 2: "Linux did not grant the tile state"}
PROBE_UNFINISHED = "the self-test did not finish"
# rows of the products the child process times (a 1536 x 1536 4-bit weight, one thread, both kernels)
TIMED_ROWS = (8, 16, 64, 256)  # 8: a decode step of 8 sequences
_PROBE = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
rc = lib.el_amx_selftest(1)
if rc:
    sys.exit(rc)
lib.el_amx_time.restype = ctypes.c_double
lib.el_amx_time.argtypes = [ctypes.c_int] * 6
best = {}
for _ in range(3):  # the kernels alternate, so a slow phase of the machine costs both
    for m in map(int, sys.argv[2:]):
        for mode in (0, 1):
            t = lib.el_amx_time(mode, m, 1536, 1536, 3, 1)
            best[m, mode] = min(best.get((m, mode), t), t)
print(" ".join(f"{m}:{best[m, 0]:.6g}:{best[m, 1]:.6g}" for m in map(int, sys.argv[2:])))
"""


def setup(lib: ctypes.CDLL, lib_path: Path, timeout: float) -> None:
    """AMX-int8 tiles for products of 8 rows or more (prefill, decode steps of 8+ sequences): on when the CPU
    has AMX-INT8, the tile kernel matched the AVX-512 kernels bit for bit in a child process on this machine,
    and from the row count where that child timed the tiles faster (once per built library: the verdict is
    kept beside it; a crash there costs only the child). EDGELLM_AMX=off keeps them off; EDGELLM_AMX=emulate
    runs the tile kernel's logic with tiles emulated in C (tests, any AVX-512 CPU)."""
    want = os.environ.get("EDGELLM_AMX", "auto").lower()
    if want in ("0", "off", "false", "no"):
        return
    if want == "emulate":
        lib.el_amx_set(2)
        return
    if not lib.el_amx_cpu():
        return
    stamp = lib_path.with_name("amx-selftest")
    try:
        verdict = stamp.read_text().strip()
    except OSError:
        verdict = probe(lib_path, timeout)
        if not verdict.startswith(PROBE_UNFINISHED):  # a child that timed out may pass next time
            try:
                stamp.write_text(verdict + "\n")
            except OSError:
                pass
    rows = verdict_rows(verdict)
    if rows is not None and lib.el_amx_set(1) == 0:
        lib.el_amx_min_rows(rows)
        log.info("edgellm native kernels: AMX-int8 tiles on for products of %d rows or more (%s)", rows, verdict)
    else:
        log.warning("edgellm native kernels: this CPU has AMX-INT8 but the tile product stays off (%s); "
                    "the AVX-512 kernels run", verdict if rows is None else "Linux did not grant the tile state")


def verdict_rows(verdict: str) -> int | None:
    """The fewest rows a product needs to go to tiles, from a verdict "ok min_rows=R ..."; None: off."""
    if not verdict.startswith("ok min_rows="):
        return None
    try:
        return int(verdict.split()[1].split("=")[1])
    except (IndexError, ValueError):
        return None


def amx_min_rows(times: dict[int, tuple[float, float]]) -> int | None:
    """From {rows: (AVX-512 seconds, tile seconds)}: the fewest timed rows from which the tiles were faster
    at every larger timed count too; None when they were not faster even at the most rows."""
    rows = None
    for m in sorted(times, reverse=True):
        avx, tiles = times[m]
        if not 0 < tiles < avx:
            break
        rows = m
    return rows


def probe(lib_path: Path, timeout: float) -> str:
    """Run el_amx_selftest(1), then time both kernels, in a child process: "ok min_rows=R (timings)", or why
    the tiles stay off."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, str(lib_path), *map(str, TIMED_ROWS)],
                           capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{PROBE_UNFINISHED}: {e}"
    if r.returncode != 0:
        rc = r.returncode
        return VERDICTS.get(rc, f"the self-test ended with {f'signal {-rc}' if rc < 0 else f'status {rc}'}")
    try:
        times = {int(m): (float(a), float(t)) for m, a, t in (f.split(":") for f in r.stdout.split())}
    except ValueError:
        return f"the self-test printed {r.stdout.strip()[:200]!r}"
    shown = ", ".join(f"{m} rows {a * 1e6:.0f} / {t * 1e6:.0f} us" for m, (a, t) in sorted(times.items()))
    rows = amx_min_rows(times)
    if rows is None:
        return f"bit-exact, but the tiles were not faster than the AVX-512 kernels ({shown})"
    return f"ok min_rows={rows} (AVX-512 / tiles: {shown})"

"""AMX tiles against the AVX-512 kernels on this machine, side by side (for a CPU with AMX-INT8).

    python benchmarks/amx_ab.py [MODEL] [--rounds 3] [--threads 2] [--batch 8] [--emulate]

Prints the CPU, whether it has AMX-INT8, and the verdict of the tiles' self-test kept beside the built
kernel library (bit-exact or not, and from how many rows the tiles were timed faster); then alternates
child processes of `edgellm bench` with EDGELLM_AMX=off and with the default (tiles where the verdict
allows them): prefill pp512, decode tg128 of one sequence and of `--batch` sequences. A decode step of 8
sequences is where the tiles matter most for small models (its products are compute: see
docs/benchmarks.md, eleventh session), and prefill everywhere. On a CPU without AMX it says so and stops;
`--emulate` then runs the tiles' emulation in C instead (EDGELLM_AMX=emulate: checks this script's
plumbing, far slower than either kernel, so its speeds mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench(model: str | None, amx: str, threads: int, batch: int, prompt_len: int, gen_len: int) -> dict:
    """One `edgellm bench --json` in a child process with EDGELLM_AMX=amx (the library is per process)."""
    cmd = [sys.executable, "-c", "from edgellm.cli.main import main; main()", "bench", "--json", "--repeat", "1",
           "--no-bandwidth", "--threads", str(threads), "--batch", str(batch), "--prompt-len", str(prompt_len),
           "--gen-len", str(gen_len)] + ([model] if model else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env={**os.environ, "EDGELLM_AMX": amx})
    if r.returncode != 0:
        raise SystemExit(f"edgellm bench failed (EDGELLM_AMX={amx}): {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--emulate", action="store_true", help="no AMX here: run the tiles' C emulation instead")
    args = ap.parse_args()

    from edgellm.quantization import kernels

    lib = kernels.library()
    if lib is None:
        raise SystemExit(f"native kernels unavailable: {kernels.unavailable_reason()}")
    has_amx = bool(lib.el_amx_cpu())
    stamp = Path(lib._name).with_name("amx-selftest")
    verdict = stamp.read_text().strip() if stamp.is_file() else "(none: no self-test has run for this library)"
    print(f"CPU: {cpu_model()}; AMX-INT8: {'yes' if has_amx else 'no'}; kernels: {kernels.isa()}")
    print(f"tiles' self-test verdict ({stamp}): {verdict}")
    if not has_amx and not args.emulate:
        print("no AMX-INT8 on this CPU: nothing to compare (--emulate checks the plumbing)")
        return
    arms = ("off", "emulate" if not has_amx else "auto")
    keys = ("pp", "tg1", f"tg{args.batch}")
    got: dict[str, dict[str, list[float]]] = {a: {k: [] for k in keys} for a in arms}
    for r in range(args.rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:  # alternate the order: a drifting machine costs both
            one = bench(args.model, arm, args.threads, 1, args.prompt_len, args.gen_len)
            many = bench(args.model, arm, args.threads, args.batch, args.prompt_len, args.gen_len)
            got[arm]["pp"].append(one["pp"]["mean"])
            got[arm]["tg1"].append(one["tg"]["mean"])
            got[arm][f"tg{args.batch}"].append(many["tg"]["mean"])
            print(f"round {r + 1} EDGELLM_AMX={arm:7s} kernels {one['kernels']}: pp{args.prompt_len} "
                  f"{one['pp']['mean']:.1f}, tg{args.gen_len} {one['tg']['mean']:.1f}, "
                  f"x{args.batch} {many['tg']['mean']:.1f} tok/s", flush=True)
    print(f"\nmedians over {args.rounds} rounds ({args.threads} threads):")
    print(f"{'EDGELLM_AMX':12s} {'pp t/s':>10s} {'tg t/s':>10s} {f'tg x{args.batch} t/s':>12s} {'x/1':>6s}")
    med = {a: {k: statistics.median(v) for k, v in got[a].items()} for a in arms}
    for a in arms:
        m = med[a]
        print(f"{a:12s} {m['pp']:10.1f} {m['tg1']:10.1f} {m[keys[2]]:12.1f} {m[keys[2]] / m['tg1']:6.2f}")
    off, on = med[arms[0]], med[arms[1]]
    print(f"tiles / AVX-512: pp {on['pp'] / off['pp']:.2f}x, tg {on['tg1'] / off['tg1']:.2f}x, "
          f"tg x{args.batch} {on[keys[2]] / off[keys[2]]:.2f}x")


if __name__ == "__main__":
    main()

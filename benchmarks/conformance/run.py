"""Peer conformance suites against one `edgellm serve` (issue 12); not part of the CI test run.

    python benchmarks/conformance/run.py [MODEL] [--suite mlc|llamacpp|vllm] [-k EXPR]

The suites re-state, in our own code, the checks of the server test suites of MLC-LLM
(tests/python/serve/server/test_server.py), llama.cpp (tools/server/tests/unit/) and vLLM
(tests/entrypoints/openai/), each test naming the peer test it follows; what is model- or
server-specific (exact texts of their test models, their own error shapes or debug endpoints) is
adapted, and features edgellm lacks are skipped with the reason. Starts the server on a free port
(MODEL defaults to the bundled SmolLM2, q4f16_1), runs each suite with pytest and prints
pass/fail/skip counts per suite and the skip reasons.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from serve_load import start_server  # noqa: E402  (benchmarks/ holds the shared start-up)

SUITES = {"mlc": "test_mlc.py", "llamacpp": "test_llamacpp.py", "vllm": "test_vllm.py"}


def run_suite(name: str, base: str, extra: list[str]) -> dict:
    env = {**os.environ, "EDGELLM_CONFORMANCE_BASE": base}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", "--rootdir", str(HERE),
           "-c", os.devnull, str(HERE / SUITES[name]), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    out = proc.stdout
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out.splitlines()[-1])}
    skips = sorted({m for m in re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", out)})
    fails = re.findall(r"FAILED (\S+)", out)
    return {"counts": counts, "skips": skips, "fails": fails, "log": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--suite", choices=sorted(SUITES), action="append")
    ap.add_argument("-k", default=None)
    ap.add_argument("--log", default=None, help="write the pytest output of each suite here (a directory)")
    args = ap.parse_args()
    server, base = start_server(args.model, "max_num_sequence=8;threads=2;precision=high")
    total = {"passed": 0, "failed": 0, "skipped": 0}
    try:
        for name in args.suite or list(SUITES):
            res = run_suite(name, base, ["-k", args.k] if args.k else [])
            c = res["counts"]
            for k in total:
                total[k] += c.get(k, 0)
            print(f"{name}: {c.get('passed', 0)} passed, {c.get('failed', 0) + c.get('error', 0)} failed, "
                  f"{c.get('skipped', 0)} skipped")
            for f in res["fails"]:
                print(f"  FAILED {f}")
            for s in res["skips"]:
                print(f"  skip: {s}")
            if args.log:
                Path(args.log).mkdir(parents=True, exist_ok=True)
                (Path(args.log) / f"{name}.log").write_text(res["log"])
    finally:
        server.terminate()
        server.wait(timeout=60)
    n = sum(total.values())
    print(f"overall: {total['passed']} of {n} passed, {total['failed']} failed, {total['skipped']} skipped")


if __name__ == "__main__":
    main()

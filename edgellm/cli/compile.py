"""edgellm compile MODEL -o LIB [--device D] [--opt O2] [--overrides "k=v;k=v"]"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a converted model directory or its mlc-chat-config.json")
    p.add_argument("-o", "--output", required=True,
                   help="the library: .pt2/.so/.dylib (cpu, cuda, mps), .pte (android, iphone) or .tar (any)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, mps, android or iphone (metal and metal:x86-64 mean mps); "
                        "auto picks from the output suffix and this machine")
    p.add_argument("--opt", default="O2",
                   help="O0..O3 (default O2). .pt2: O0/O1 build faster, O3 autotunes GEMMs. "
                        ".pte: O0 keeps float32 weights, O1-O3 use int4 weights with int8 activations")
    p.add_argument("--overrides", default="",
                   help='"context_window_size=N;prefill_chunk_size=N;max_batch_size=N"')


def run(args: argparse.Namespace) -> int:
    from edgellm.compile.compiler import compile_model

    opt = args.opt.strip()
    if "=" in opt:  # MLC-LLM's TVM flags ("flashinfer=1;cublas_gemm=1"): nothing to switch here
        print(f"note: --opt {opt!r}: TVM pass flags do not apply to edgellm; using O2", file=sys.stderr)
        opt = "O2"
    compile_model(args.model, args.output, args.device, opt, args.overrides)
    return 0

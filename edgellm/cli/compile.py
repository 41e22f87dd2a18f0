"""edgellm compile MODEL -o LIB [--quantization Q] [--model-type T] [--device D] [--host TRIPLE] [--opt O2]
[--system-lib-prefix P] [--overrides "k=v;k=v"]"""

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
                        ".pte: O1/O2 carry the model's own 4-bit codes and scales (exact), O3 XNNPACK's "
                        "int4 kernels (int8 activations, bf16 scales: faster, not exact), O0 float32 weights")
    p.add_argument("--overrides", default="",
                   help='"context_window_size=N;prefill_chunk_size=N;max_batch_size=N;sliding_window=N;'
                        'tensor_parallel_shards=1"')
    p.add_argument("--quantization", default=None,
                   help="checked against the model's own (a library is built for the converted weights)")
    p.add_argument("--model-type", default=None, help="checked against the model's own")
    p.add_argument("--host", default=None,
                   help="target LLVM triple: arm64-apple-ios -> iphone, aarch64-linux-android -> android, "
                        "this machine's desktop triple -> cpu (others and wasm32 are refused)")
    p.add_argument("--system-lib-prefix", default=None,
                   help="recorded in the library; names the artifact inside a .tar")


def run(args: argparse.Namespace) -> int:
    from edgellm.compile.compiler import compile_model

    opt = args.opt.strip()
    if "=" in opt:  # MLC-LLM's TVM flags ("flashinfer=1;cublas_gemm=1"): nothing to switch here
        print(f"note: --opt {opt!r}: TVM pass flags do not apply to edgellm; using O2", file=sys.stderr)
        opt = "O2"
    compile_model(args.model, args.output, args.device, opt, args.overrides, host=args.host,
                  system_lib_prefix=args.system_lib_prefix, quantization=args.quantization,
                  model_type=args.model_type)
    return 0

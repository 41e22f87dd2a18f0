"""edgellm bench MODEL [--prompt-len 512] [--gen-len 128] [--batch 1] [--threads N] [--precision P] [--json]"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="converted model directory, HF model directory or .gguf file (default: the bundled model)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens to prefill (pp)")
    p.add_argument("--gen-len", type=int, default=128, help="tokens to decode (tg)")
    p.add_argument("--batch", type=int, default=1, help="sequences run concurrently")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--repeat", type=int, default=5, help="repetitions (mean and standard deviation)")
    p.add_argument("--opt", default="O2", choices=["O0", "O1", "O2", "O3"], help="optimization level")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--quantization", default="q4f16_1",
                   help="quantization used when MODEL needs converting first (GGUF / HF)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "int8"],
                   help="auto: float16 for models stored in float16, else float32")
    p.add_argument("--use-mmap", action="store_true", help="memory-map the weight shards")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the memory-bandwidth measurement")
    p.add_argument("--model-lib", default=None,
                   help="a compiled model library (.pt2/.so, .pte or .tar) to run instead of the eager model")
    p.add_argument("--precision", default="normal", choices=["high", "normal", "low"],
                   help="activations of quantized products: high = 16-bit (exact), normal/low = int8 GEMM")
    p.add_argument("--tensor-parallel-shards", type=int, default=None,
                   help="split the model over N processes (docs/distributed.md); default: mlc-chat-config.json's")
    p.add_argument("--lora", action="append", default=None, metavar="NAME=DIR",
                   help="a LoRA adapter at run time; repeatable: the batch's requests use them in turn")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    import sys

    from edgellm.bench import format_report, run_bench
    from edgellm.engine.options import make_options, parse_lora_specs
    from edgellm.prepare import runtime_config

    args.model, file_options = runtime_config(args.model)  # an MNN-style config.json: options for its model
    if file_options:
        opts = make_options(file_options)
        args.threads = args.threads or opts.threads
        args.use_mmap = args.use_mmap or opts.use_mmap
        if args.kv_cache_dtype == "auto":
            args.kv_cache_dtype = opts.kv_cache_dtype
        if opts.backend_type and args.device == "cpu":
            args.device = opts.backend_type

    report = run_bench(args.model, prompt_len=args.prompt_len, gen_len=args.gen_len, batch=args.batch,
                       threads=args.threads, repeat=args.repeat, opt=args.opt, device=args.device,
                       quantization=args.quantization, use_mmap=args.use_mmap, kv_cache_dtype=args.kv_cache_dtype,
                       bandwidth=not args.no_bandwidth, log=lambda m: print(m, file=sys.stderr),
                       model_lib=args.model_lib, precision=args.precision,
                       tensor_parallel_shards=args.tensor_parallel_shards,
                       lora_adapters=parse_lora_specs(args.lora) or None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0

"""edgellm perplexity MODEL --file TEXT [--precision high|normal] [--ctx 512] [--chunks N] [--json]"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="converted model directory, HF model directory or .gguf file (default: the bundled model)")
    p.add_argument("--file", required=True, help="UTF-8 text to score")
    p.add_argument("--precision", default="normal", choices=["high", "normal"],
                   help="activations of the quantized kernels: high = 16 bits, normal = 8 bits (default)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (the second half of each is scored)")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many chunks")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--quantization", default="q4f16_1",
                   help="quantization used when MODEL needs converting first (GGUF / HF)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    import torch

    from edgellm.errors import UserError
    from edgellm.prepare import prepare_model
    from edgellm.quality import format_report, perplexity

    path = Path(args.file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--file {args.file}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
    if args.chunks is not None and args.chunks < 1:
        raise UserError("--chunks must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr)
    model_dir = prepare_model(args.model, quantization=args.quantization, log=log)
    report = perplexity(model_dir, text, ctx=args.ctx, precision=args.precision, max_chunks=args.chunks, log=log)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 0

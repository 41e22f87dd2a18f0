"""edgellm gen_config CONFIG --quantization Q --conv-template T -o DIR"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="HF model directory, its config.json, or a .gguf file")
    p.add_argument("--quantization", required=True)
    p.add_argument("--conv-template", required=True, help="a template name, or auto (the model's own)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--model-type", default="auto")
    p.add_argument("--context-window-size", type=int, default=None)
    p.add_argument("--sliding-window-size", type=int, default=None)
    p.add_argument("--prefill-chunk-size", type=int, default=None)
    p.add_argument("--tensor-parallel-shards", type=int, default=None)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--group-size", "--quant-block", "--quant_block", dest="group_size", type=int, default=None,
                   help="as given to convert_weight (default: read from the converted weights in OUTPUT)")
    p.add_argument("--lm-quant-bit", "--lm_quant_bit", dest="lm_head_bits", type=int, default=None,
                   help="as given to convert_weight (default: read from the converted weights in OUTPUT)")


def run(args: argparse.Namespace) -> int:
    from edgellm.gen_config import gen_config

    cfg = gen_config(args.config, args.quantization, args.conv_template, args.output,
                     model_type=args.model_type, context_window_size=args.context_window_size,
                     sliding_window_size=args.sliding_window_size,
                     prefill_chunk_size=args.prefill_chunk_size,
                     tensor_parallel_shards=args.tensor_parallel_shards,
                     max_batch_size=args.max_batch_size, force=args.force, log=print,
                     group_size=args.group_size, lm_head_bits=args.lm_head_bits)
    print(f"Wrote {args.output}/mlc-chat-config.json ({cfg.model_type}, {cfg.quantization}, "
          f"context {cfg.context_window_size}, tokenizer: {', '.join(cfg.tokenizer_files)})")
    return 0

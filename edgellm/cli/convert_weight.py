"""edgellm convert_weight CONFIG --quantization Q -o DIR"""

from __future__ import annotations

import argparse

from edgellm.quantization.modes import QUANTIZATION_MODES
from edgellm.weights.source import SOURCE_FORMATS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="HF model directory, its config.json, or a .gguf file")
    p.add_argument("--quantization", required=True, help=f"one of {', '.join(QUANTIZATION_MODES)}")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--model-type", default="auto", help="auto (from config.json) or a model type")
    p.add_argument("--device", default="cpu", help="device used to quantize (cpu, cuda, mps)")
    p.add_argument("--source", default=None, help="weights path if not beside CONFIG")
    p.add_argument("--source-format", default="auto", help=f"one of {', '.join(SOURCE_FORMATS)}")
    p.add_argument("--lora-adapter", default=None, help="PEFT LoRA adapter directory to merge")
    p.add_argument("--lora-split", "--lora_split", dest="lora_split", action="store_true",
                   help="write the --lora-adapter apart (OUTPUT/lora/NAME, for --lora at run time), not merged")
    p.add_argument("--force", action="store_true", help="write into a directory holding other files")
    p.add_argument("--group-size", "--quant-block", "--quant_block", dest="group_size", type=int, default=None,
                   help="q4/q8 modes: elements per scale, 32 (default), 64, 128 or 0 (per channel)")
    p.add_argument("--lm-quant-bit", "--lm_quant_bit", dest="lm_head_bits", type=int, default=None,
                   help="bits of the embedding and lm_head (4, 8, or 16 = unquantized); default: as the body")


def run(args: argparse.Namespace) -> int:
    from edgellm.weights.convert import convert_weight

    manifest = convert_weight(args.config, args.quantization, args.output, model_type=args.model_type,
                              device=args.device, source=args.source, source_format=args.source_format,
                              lora_adapter=args.lora_adapter, lora_split=args.lora_split, force=args.force,
                              group_size=args.group_size, lm_head_bits=args.lm_head_bits)
    meta = manifest["metadata"]
    print(f"Wrote {len(manifest['records'])} shards to {args.output}: {meta['ParamSize']:,} parameters, "
          f"{meta['ParamBytes'] / 2**20:.1f} MiB, {meta['BitsPerParam']:.2f} bits/param")
    if args.lora_split:
        from pathlib import Path

        name = Path(args.lora_adapter).expanduser().resolve().name
        print(f"Wrote the LoRA adapter apart to {Path(args.output) / 'lora' / name} (serve it with --lora {name}=DIR)")
    return 0

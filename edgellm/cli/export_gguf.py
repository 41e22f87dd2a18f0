"""edgellm export-gguf MODEL_DIR -o FILE.gguf [--type q4_0|q4_1|q8_0|f16|f32]"""

from __future__ import annotations

import argparse

TYPES = ("q4_0", "q4_1", "q8_0", "f16", "f32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a converted model directory (convert_weight + gen_config output)")
    p.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    p.add_argument("--type", default=None, metavar="TYPE",
                   help=f"one of {', '.join(TYPES)} (default: the nearest to the model's quantization)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")


def run(args: argparse.Namespace) -> int:
    from edgellm.weights.gguf_writer import export_gguf

    summary = export_gguf(args.model_dir, args.output, args.type, force=args.force)
    types = ", ".join(f"{n} {k}" for k, n in sorted(summary["types"].items()))
    print(f"Wrote {args.output}: {summary['architecture']}, {summary['tensors']} tensors ({types}), "
          f"{summary['bytes'] / 2**20:.1f} MiB")
    return 0

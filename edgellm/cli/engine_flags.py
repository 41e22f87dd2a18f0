"""The engine flags `chat` and `serve` share (read back by engine.options' *_overrides)."""

from __future__ import annotations

import argparse


def add_engine_flags(p: argparse.ArgumentParser, overrides_example: str) -> None:
    """--model-lib, --overrides, --speculative-mode, --lora and --additional-models."""
    p.add_argument("--model-lib", default=None, help="a compiled model library (.pt2)")
    p.add_argument("--overrides", default=None, help=f'engine options, e.g. "{overrides_example}"')
    p.add_argument("--speculative-mode", default=None, choices=["disable", "small_draft", "ngram"],
                   help="speculative decoding: a draft model (--additional-models) or prompt lookup")
    p.add_argument("--lora", action="append", default=None, metavar="NAME=DIR",
                   help="a LoRA adapter as NAME (a PEFT or --lora-split directory); repeatable")
    p.add_argument("--additional-models", nargs="+", default=None, metavar="DIR",
                   help="models besides the main one; small_draft drafts with the first")

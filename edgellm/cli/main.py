"""`edgellm` / `python -m edgellm`: dispatch to one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from edgellm.errors import UserError

# subcommand -> module; each module has add_arguments(parser) and run(args) -> int | None
COMMANDS = {
    "convert_weight": ("edgellm.cli.convert_weight", "read, map, quantize and write model weights"),
    "gen_config": ("edgellm.cli.gen_config", "write mlc-chat-config.json and tokenizer files"),
    "compile": ("edgellm.cli.compile", "build a model library for a device"),
    "chat": ("edgellm.cli.chat", "chat with a model in the terminal"),
    "serve": ("edgellm.cli.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "bench": ("edgellm.cli.bench", "measure prefill and decode tokens/s"),
    "perplexity": ("edgellm.cli.perplexity", "perplexity and KL divergence against the float32 dequantized reference"),
    "package": ("edgellm.cli.package", "bundle models and libraries for an Android or iOS app"),
    "export_gguf": ("edgellm.cli.export_gguf", "write a converted model as a GGUF file for llama.cpp / Ollama"),
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser(available: dict[str, object]) -> Parser:
    parser = Parser(prog="edgellm", description="Universal LLM deployment engine (CPU first).")
    from edgellm.config import VERSION

    parser.add_argument("--version", action="version", version=f"edgellm {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=Parser)
    for name, (_, help_text) in COMMANDS.items():
        mod = available.get(name)
        for alias in (name, name.replace("_", "-")) if "_" in name else (name,):
            kwargs = {"help": help_text} if alias == name else {}
            p = sub.add_parser(alias, description=help_text, **kwargs)
            if mod is not None:
                mod.add_arguments(p)
            p.set_defaults(command=name)
    return parser


def _load(name: str):
    try:
        return importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        if e.name == COMMANDS[name][0]:
            return None
        raise


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the command asked for: keeps `edgellm --help` and startup fast.
    wanted = next((a.replace("-", "_") for a in argv if not a.startswith("-")), None)
    available = {wanted: _load(wanted)} if wanted in COMMANDS else {}
    parser = build_parser(available)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        sys.exit(2)
    mod = available.get(args.command)
    if mod is None:
        parser.error(f"the {args.command} command is not available in this build")
    try:
        code = mod.run(args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        sys.exit(130)
    except Exception as e:  # a bug, not the user's mistake: one line unless debugging
        if os.environ.get("EDGELLM_DEBUG"):
            raise
        sys.stderr.write(f"internal error: {type(e).__name__}: {e} (set EDGELLM_DEBUG=1 for a traceback)\n")
        sys.exit(1)
    sys.exit(code or 0)

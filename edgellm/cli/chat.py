"""edgellm chat [MODEL]: chat in the terminal (or one message per line from a pipe)."""

from __future__ import annotations

import argparse
import sys

from edgellm.cli.engine_flags import add_engine_flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="converted directory, HF model directory or .gguf file (default: bundled SmolLM2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    add_engine_flags(p, "context_window_size=2048;prefill_chunk_size=256;threads=2")


def _interactive(session) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.key_binding import KeyBindings

    from edgellm.chat import HELP

    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    prompt = PromptSession(key_bindings=kb)
    print(HELP, flush=True)
    while True:
        try:
            line = prompt.prompt(">>> ")
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt clears the line
        except EOFError:
            break  # Ctrl-D
        if not _turn(session, line):
            break


def _turn(session, line: str) -> bool:
    """One line of input: a special command or a message whose reply streams. False = quit."""
    from edgellm.errors import UserError

    if not line.strip():
        return True
    if line.lstrip().startswith("/"):
        out = session.command(line)
        if out is None:
            return False
        print(out, flush=True)
        return True
    reply = session.send(line)
    try:
        for piece in reply:
            if session.notice:
                print(session.notice, flush=True)
                session.notice = None
            print(piece, end="", flush=True)
        print(flush=True)
    except KeyboardInterrupt:
        reply.close()
        print("\n[stopped]", flush=True)
    except UserError as e:
        print(f"error: {e}", flush=True)
    return True


def _piped(session) -> None:
    for raw in sys.stdin:
        if not _turn(session, raw.rstrip("\n")):
            return


def run(args: argparse.Namespace) -> int:
    from edgellm.api.engine import Engine
    from edgellm.chat import ChatSession
    from edgellm.engine.options import lora_overrides, make_options, parse_overrides, speculative_overrides
    from edgellm.prepare import prepare_model, runtime_config

    args.model, file_options = runtime_config(args.model)  # an MNN-style config.json: options for its model
    overrides = {**file_options, **parse_overrides(args.overrides), **speculative_overrides(args),
                 **lora_overrides(args)}
    make_options(overrides)  # reject bad overrides before any slow work
    model_dir = prepare_model(args.model, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    engine = Engine(str(model_dir), args.model_lib, args.device, **overrides)
    try:
        session = ChatSession(engine)
        if engine.lora_adapters:  # chat --lora NAME=DIR: answer with the first adapter (/set lora=none: the base)
            session.settings["lora"] = engine.lora_adapters[0]
        if sys.stdin.isatty():
            _interactive(session)
        else:
            _piped(session)
    finally:
        engine.terminate()
    return 0

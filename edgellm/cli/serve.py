"""edgellm serve MODEL: an OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="converted directory, HF model directory or .gguf file (default: bundled SmolLM2)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--mode", default="server", choices=["local", "interactive", "server"])
    p.add_argument("--device", default="auto")
    p.add_argument("--model-lib", default=None, help="a compiled model library (.pt2)")
    p.add_argument("--overrides", default=None,
                   help='engine options, e.g. "max_num_sequence=16;max_total_seq_length=16384;prefill_chunk_size=512"')
    p.add_argument("--speculative-mode", default=None, choices=["disable", "small_draft", "ngram"],
                   help="speculative decoding: a draft model (--additional-models) or prompt lookup")
    p.add_argument("--additional-models", nargs="+", default=None, metavar="DIR",
                   help="models besides the main one; small_draft drafts with the first")
    p.add_argument("--no-ui", action="store_true", help="do not serve the browser chat page at /")
    p.add_argument("--allowed-origins", default=None,
                   help="comma-separated browser origins allowed to call the API (CORS), or '*'; default none")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from edgellm.api.async_engine import AsyncEngine
    from edgellm.engine.options import make_options, parse_overrides, speculative_overrides
    from edgellm.errors import UserError
    from edgellm.prepare import prepare_model
    from edgellm.serve.app import create_app

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    from edgellm.prepare import runtime_config

    args.model, file_options = runtime_config(args.model)  # an MNN-style config.json: options for its model
    overrides = {**file_options, **parse_overrides(args.overrides), **speculative_overrides(args)}
    make_options({**overrides, "mode": args.mode})
    model_dir = prepare_model(args.model, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    engine = AsyncEngine(str(model_dir), args.model_lib, args.device, mode=args.mode, **overrides)
    aliases = tuple(a for a in (args.model, str(model_dir), engine.config.model_type) if a)
    origins = tuple(o.strip() for o in (args.allowed_origins or "").split(",") if o.strip())
    app = create_app(engine, api_key=args.api_key, model_aliases=aliases, max_body_bytes=args.max_body_bytes,
                     ui=not args.no_ui, allowed_origins=origins)
    print(f"Serving {engine.model_id} on http://{args.host}:{args.port}/v1 "
          f"({engine.options.num_sequences} concurrent sequences, context {engine.context_window})",
          file=sys.stderr, flush=True)
    if not args.no_ui:
        print(f"Chat page on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    finally:
        engine.terminate()
    return 0

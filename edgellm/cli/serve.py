"""edgellm serve MODEL: an OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import sys

from edgellm.cli.engine_flags import add_engine_flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="converted directory, HF model directory or .gguf file (default: bundled SmolLM2)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1, /metrics and /openapi.json "
                        "(also read from $EDGELLM_API_KEY; --api-key-file keeps it out of `ps`)")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics and /openapi.json without the key")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens a request may ask for (400 past it; also the default)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a free sequence; more get 429 (default: 256)")
    p.add_argument("--header-timeout", type=float, default=30.0,
                   help="seconds a client has to send its request headers (default: 30)")
    p.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a client has to send its request body (default: 60)")
    p.add_argument("--mode", default="server", choices=["local", "interactive", "server"])
    p.add_argument("--device", default="auto")
    add_engine_flags(p, "max_num_sequence=16;max_total_seq_length=16384;prefill_chunk_size=512")
    p.add_argument("--allow-lora-updates", action="store_true",
                   help="add POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read paths on this machine)")
    p.add_argument("--no-ui", action="store_true", help="do not serve the browser chat page at /")
    p.add_argument("--allowed-origins", default=None,
                   help="comma-separated browser origins allowed to call the API (CORS), or '*'; default none")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from edgellm.api.async_engine import AsyncEngine
    from edgellm.engine.options import lora_overrides, make_options, parse_overrides, speculative_overrides
    from edgellm.errors import UserError
    from edgellm.prepare import prepare_model
    from edgellm.serve.app import create_app
    from edgellm.serve.guards import header_timeout_protocol, is_loopback

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    api_key = _api_key(args)
    for name in ("max_tokens_limit", "header_timeout", "body_timeout"):
        value = getattr(args, name)
        if value is not None and not 0 < value < 1e7:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be 0 or more, got {args.max_queue}")
    from edgellm.prepare import runtime_config

    args.model, file_options = runtime_config(args.model)  # an MNN-style config.json: options for its model
    overrides = {**file_options, **parse_overrides(args.overrides), **speculative_overrides(args),
                 **lora_overrides(args)}
    make_options({**overrides, "mode": args.mode})
    model_dir = prepare_model(args.model, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    engine = AsyncEngine(str(model_dir), args.model_lib, args.device, mode=args.mode, **overrides)
    aliases = tuple(a for a in (args.model, str(model_dir), engine.config.model_type) if a)
    origins = tuple(o.strip() for o in (args.allowed_origins or "").split(",") if o.strip())
    app = create_app(engine, api_key=api_key, model_aliases=aliases, max_body_bytes=args.max_body_bytes,
                     public_metrics=args.public_metrics, loopback_only=is_loopback(args.host),
                     body_timeout=args.body_timeout, max_tokens_limit=args.max_tokens_limit,
                     max_queue=args.max_queue, ui=not args.no_ui, allowed_origins=origins,
                     allow_lora_updates=args.allow_lora_updates)
    protocol = header_timeout_protocol(args.header_timeout)
    print(f"Serving {engine.model_id} on http://{args.host}:{args.port}/v1 "
          f"({engine.options.num_sequences} concurrent sequences, context {engine.context_window})",
          file=sys.stderr, flush=True)
    if not args.no_ui:
        print(f"Chat page on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, http=protocol)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    finally:
        engine.terminate()
    return 0


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else --api-key-file, else $EDGELLM_API_KEY."""
    import os

    from edgellm.errors import UserError

    if args.api_key:
        return args.api_key
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as e:
            raise UserError(f"--api-key-file {args.api_key_file}: {e.strerror}") from None
        if not key:
            raise UserError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return os.environ.get("EDGELLM_API_KEY") or None

"""The OpenAI-compatible HTTP API over an AsyncEngine. The server only translates HTTP to requests."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as StarletteRequest

from edgellm.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoraRequest,
    TokenizeRequest,
    UnloadLoraRequest,
    describe_error,
)
from edgellm.errors import BadRequestError, EngineTerminatedError, UserError
from edgellm.models.lora import UnknownAdapterError
from edgellm.serve.guards import AdmissionLimit, ApiKeyAuth, RequestGuard, error_response
from edgellm.serve.metrics import render_prometheus
from edgellm.serve.ui import mount_ui

log = logging.getLogger("edgellm.serve")
MAX_BODY_BYTES = 4 * 1024 * 1024


class _RawReceive:
    """ASGI middleware (outermost): keeps the server's own `receive` in the scope. Starlette's
    BaseHTTPMiddleware (the `@app.middleware` functions) hides the client's disconnect from the
    endpoint's `request.is_disconnected()`; reading the raw channel sees it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope["edgellm.raw_receive"] = receive
        return await self.app(scope, receive, send)


def create_app(engine, api_key: str | None = None, model_aliases: tuple[str, ...] = (),
               max_body_bytes: int = MAX_BODY_BYTES, *, public_metrics: bool = False, loopback_only: bool = False,
               body_timeout: float = 60.0, max_tokens_limit: int | None = None, max_queue: int = 256,
               ui: bool = True, allowed_origins: tuple[str, ...] = (), allow_lora_updates: bool = False) -> FastAPI:
    """A FastAPI app serving `engine` (an AsyncEngine), and the browser chat page at `/` unless `ui` is false.

    With `api_key`, /v1, /metrics and /openapi.json need it (`public_metrics` opens the last two).
    `loopback_only` refuses non-loopback Host headers; `max_queue` waiting requests beyond the engine's
    sequences get 429; `max_tokens_limit` caps a request's max_tokens (400 past it).
    `allow_lora_updates` adds POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's).
    """
    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN.
    app = FastAPI(title="edgellm", version=_version(), description="OpenAI-compatible API served by edgellm",
                  docs_url=None, redoc_url=None)
    names = {engine.model_id, *model_aliases}  # accepted; only model_id is ever shown (no paths)
    engine.model_aliases = tuple(model_aliases)  # "alias:adapter" names an adapter too
    app.add_middleware(AdmissionLimit, limit=engine.options.num_sequences + max_queue)
    guarded = () if public_metrics else ("/metrics", "/openapi.json")
    app.add_middleware(ApiKeyAuth, api_key=api_key, guarded=guarded)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        err = (exc.errors() or [{}])[0]
        msg, param = describe_error(err)
        if err.get("type") == "json_invalid":
            msg, param = "request body is not valid JSON", None
        return error_response(400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_=type_)

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error", type_="server_error")

    def check_model(model: str | None, lora: str | None = None):
        """None when `model` (and `lora`) name the base or a loaded LoRA adapter, else the 404 response."""
        try:
            engine.adapter_for(model, lora, tuple(names), strict=True)
        except UnknownAdapterError as e:
            return error_response(404, str(e), type_="not_found_error", param=e.param, code=e.code)
        except BadRequestError as e:
            return error_response(400, str(e), param=e.param, code=e.code)
        return None

    async def run(kind: str, body, request: Request):
        bad = check_model(body.model, body.lora)
        if bad is not None:
            return bad
        if max_tokens_limit is not None:
            if body.max_tokens is not None and body.max_tokens > max_tokens_limit:
                return error_response(400, f"max_tokens is {body.max_tokens}; this server allows at most "
                                      f"{max_tokens_limit}", param="max_tokens", code="max_tokens_too_large")
            if body.max_tokens is None:
                body.max_tokens = max_tokens_limit
        try:
            result = await _until_disconnect(engine.run_request(kind, body), request, body.stream)
            if result is None:
                return error_response(499, "client closed the request", code="client_closed_request")
        except UnknownAdapterError as e:  # unloaded since check_model
            return error_response(404, str(e), type_="not_found_error", param=e.param, code=e.code)
        except BadRequestError as e:
            return error_response(400, str(e), param=e.param, code=e.code)
        except EngineTerminatedError as e:
            return error_response(503, str(e), type_="server_error")
        except UserError as e:
            return error_response(400, str(e))
        if not body.stream:
            return JSONResponse(result.model_dump(exclude_none=True))
        return StreamingResponse(_sse(result), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await run("chat", body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await run("text", body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        bad = check_model(body.model)
        if bad is not None:
            return bad
        if engine.adapter_for(body.model, None, tuple(names)) is not None:
            return error_response(400, "embeddings come from the base model: name it, not a LoRA adapter",
                                  param="model")
        try:
            return await engine.embed(body)
        except BadRequestError as e:
            return error_response(400, str(e), param=e.param, code=e.code)
        except EngineTerminatedError as e:
            return error_response(503, str(e), type_="server_error")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        tokens = await asyncio.to_thread(engine.tokenize, body.content, body.add_special, body.with_pieces)
        return {"tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        try:
            return {"content": await asyncio.to_thread(engine.detokenize, body.tokens)}
        except BadRequestError as e:
            return error_response(400, str(e), param=e.param)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(engine), *(_lora_card(engine, n) for n in engine.lora_adapters)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        bad = check_model(model_id)
        if bad is not None:
            return bad
        adapter = engine.adapter_for(model_id, None, tuple(names))
        return _model_card(engine) if adapter is None else _lora_card(engine, adapter.name)

    if allow_lora_updates:  # vLLM's endpoints (VLLM_ALLOW_RUNTIME_LORA_UPDATING): they read server paths
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoraRequest):
            try:
                await asyncio.to_thread(engine.load_lora, body.lora_name, body.lora_path)
            except UserError as e:
                return error_response(400, str(e), param="lora_path")
            return {"object": "lora_adapter", "id": body.lora_name, "loaded": True}

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoraRequest):
            try:
                await asyncio.to_thread(engine.unload_lora, body.lora_name)
            except UnknownAdapterError as e:
                return error_response(404, str(e), type_="not_found_error", param="lora_name", code=e.code)
            return {"object": "lora_adapter", "id": body.lora_name, "loaded": False}

    @app.get("/health")
    async def health():
        if engine.failure is not None:  # e.g. a tensor-parallel worker died: not able to serve
            return JSONResponse({"status": "unhealthy", "error": engine.failure}, status_code=503)
        return {"status": "ok" if not engine.terminated else "terminated"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(render_prometheus(engine.metrics()), media_type="text/plain; version=0.0.4")

    def openapi() -> dict:
        # The served model names are the only valid "model" values: say so in the schema.
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                props = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
                if "model" in props:
                    props["model"] = {"anyOf": [{"type": "string", "enum": [engine.model_id]}, {"type": "null"}],
                                      "title": "Model", "description": "a served model id (GET /v1/models)"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    if ui:
        mount_ui(app)
    app.add_middleware(RequestGuard, limit=max_body_bytes, body_timeout=body_timeout, loopback_only=loopback_only)
    app.add_middleware(_RawReceive)
    if allowed_origins:  # outermost: a browser's preflight (no API key) is answered before auth
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    return app


async def _until_disconnect(work, request: Request, stream: bool, poll_s: float = 0.1):
    """Await `work`; a non-streaming request whose client goes away is cancelled (its task aborts the
    engine request, freeing its batch slot and KV cache) and None is returned. Streams notice on write."""
    task = asyncio.ensure_future(work)
    if stream:
        return await task
    raw = StarletteRequest(request.scope, request.scope.get("edgellm.raw_receive", request.receive))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await raw.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return None
    except asyncio.CancelledError:
        task.cancel()
        raise


async def _sse(stream):
    try:
        async for chunk in stream:
            yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"  # pydantic-core: UTF-8, no escapes
    except Exception as e:  # mid-stream failure: tell the client in-band, then end the stream
        log.exception("stream failed")
        err = {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
        yield f"data: {json.dumps(err)}\n\n"
    yield "data: [DONE]\n\n"


def _lora_card(engine, name: str) -> dict[str, Any]:
    """A loaded adapter as a model (vLLM's convention: `parent` is the base; no paths are shown)."""
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "edgellm",
            "root": name, "parent": engine.model_id, "max_model_len": engine.context_window}


def _model_card(engine) -> dict[str, Any]:
    return {"id": engine.model_id, "object": "model", "created": int(time.time()), "owned_by": "edgellm",
            "root": engine.model_id, "max_model_len": engine.context_window,
            "quantization": engine.config.quantization, "model_type": engine.config.model_type}


def _version() -> str:
    from edgellm.config import VERSION

    return VERSION

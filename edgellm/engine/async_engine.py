"""`AsyncEngine`: the same API for asyncio; `create(...)` is awaited, streams are async iterators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from edgellm.engine.engine import EngineBase
from edgellm.engine.request import Request
from edgellm.engine.responses import ResponseBuilder
from edgellm.errors import EngineTerminatedError


class _AsyncCompletions:
    def __init__(self, engine: AsyncEngine, kind: str):
        self.engine, self.kind = engine, kind

    async def create(self, **kwargs: Any):
        """A completion, or (stream=True) an async iterator of chunks."""
        return await self.engine._create(self.kind, kwargs)


class _AsyncChat:
    def __init__(self, engine: AsyncEngine):
        self.completions = _AsyncCompletions(engine, "chat")


class AsyncEngine(EngineBase):
    """Engine for asyncio programs (the HTTP server uses it); requests batch continuously."""

    def __init__(self, model: str | Path | None = None, model_lib: str | Path | None = None,
                 device: str = "auto", **kwargs: Any):
        super().__init__(model, model_lib, device, **kwargs)
        self.chat = _AsyncChat(self)
        self.completions = _AsyncCompletions(self, "text")

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc) -> None:
        self.terminate()

    async def _create(self, kind: str, kwargs: dict[str, Any]):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(_req: Request, outs) -> None:
            loop.call_soon_threadsafe(q.put_nowait, outs)

        # Tokenizing and template rendering are CPU work: keep them off the event loop.
        req, builder, r = await asyncio.to_thread(self._build, kind, kwargs, sink)
        self.core.add(req)
        if r.stream:
            return self._stream(req, builder, q)
        try:
            while not builder.done:
                builder.add(await q.get())
        except asyncio.CancelledError:
            self.core.abort(req.request_id)
            raise
        self._check(req)
        return builder.final(req)

    async def _stream(self, req: Request, builder: ResponseBuilder, q: asyncio.Queue) -> AsyncIterator:
        try:
            for chunk in builder.first_chunks():
                yield chunk
            while not builder.done:
                for chunk in builder.chunks(await q.get()):
                    yield chunk
            self._check(req)
            if builder.include_usage:
                yield builder.usage_chunk(req)
        finally:
            if not builder.done:
                self.core.abort(req.request_id)  # client went away: free its KV cache now

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def _check(self, req: Request) -> None:
        if req.error is not None:
            raise RuntimeError(f"generation failed: {req.error}") from req.error
        if req.cancelled and self.terminated:
            raise EngineTerminatedError()

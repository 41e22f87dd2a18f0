"""`AsyncEngine`: the same API for asyncio; `create(...)` is awaited, streams are async iterators."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgellm.api.batch import is_batch, run_batch
from edgellm.api.engine import EngineBase
from edgellm.api.responses import ResponseBuilder
from edgellm.engine.request import Request
from edgellm.errors import BadRequestError, EngineTerminatedError

PREPARE_TIMEOUT_S = 30.0


class _AsyncCompletions:
    def __init__(self, engine: AsyncEngine, kind: str):
        self.engine, self.kind = engine, kind

    async def create(self, **kwargs: Any):
        """A completion, or (stream=True) an async iterator of chunks."""
        return await self.engine._create(self.kind, kwargs)


class _AsyncChat:
    def __init__(self, engine: AsyncEngine):
        self.completions = _AsyncCompletions(engine, "chat")


class _AsyncEmbeddings:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    async def create(self, **kwargs: Any) -> dict:
        """Embeddings of `input` (a string, strings, or token ids), OpenAI's response shape as a dict."""
        return await self.engine.embed(kwargs)


class _Mailbox:
    """Outputs from the engine thread to one event loop: at most one wake-up of the loop in flight
    (`call_soon_threadsafe` writes to the loop's self-pipe; with 8 streams that was 8 syscalls and 8
    loop wake-ups a step), each request's outputs still in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: deque = deque()
        self.lock = threading.Lock()
        self.pending = False

    def post(self, q: asyncio.Queue, outs) -> None:
        self.items.append((q, outs))
        with self.lock:
            if self.pending:
                return
            self.pending = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is left to read
            pass

    def _drain(self) -> None:
        with self.lock:
            self.pending = False
        while self.items:
            q, outs = self.items.popleft()
            q.put_nowait(outs)


class AsyncEngine(EngineBase):
    """Engine for asyncio programs (the HTTP server uses it); requests batch continuously."""

    def __init__(self, model: str | Path | None = None, model_lib: str | Path | None = None,
                 device: str = "auto", **kwargs: Any):
        super().__init__(model, model_lib, device, **kwargs)
        # Request preparation (template, tokenizer, grammar) runs here, off the event loop and the engine
        # thread, in a pool of its own so slow requests cannot starve asyncio's default executor.
        self._prepare = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgellm-prepare")
        self._mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}  # one per event loop that calls create
        self.chat = _AsyncChat(self)
        self.completions = _AsyncCompletions(self, "text")
        self.embeddings = _AsyncEmbeddings(self)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc) -> None:
        self.terminate()

    def terminate(self) -> None:
        super().terminate()
        self._prepare.shutdown(wait=False, cancel_futures=True)

    async def run_request(self, kind: str, request):
        """A parsed request (the server's `ChatCompletionRequest` / `CompletionRequest`, validated once):
        the completion, or an async iterator of chunks when it streams. `kind` is "chat" or "text"."""
        if kind == "text" and is_batch(request.prompt):
            return await run_batch(self._create, request)
        return await self._create(kind, request)

    async def embed(self, request) -> dict:
        """An embeddings request (the server's `EmbeddingRequest` or a dict) answered off the event loop."""
        if self.terminated:
            raise EngineTerminatedError()
        return await asyncio.to_thread(self.embedder.create, request)

    async def _create(self, kind: str, request):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        box = self._mailboxes.get(loop)
        if box is None:
            self._mailboxes = {lp: b for lp, b in self._mailboxes.items() if not lp.is_closed()}
            box = self._mailboxes[loop] = _Mailbox(loop)

        def sink(outs) -> None:
            box.post(q, outs)

        try:
            req, builder, r = await asyncio.wait_for(
                loop.run_in_executor(self._prepare, self._build, kind, request, sink), PREPARE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise BadRequestError(f"preparing the request took longer than {PREPARE_TIMEOUT_S:.0f} s "
                                  "(template or response_format too large)") from None
        self.loop.add(req)
        if r.stream:
            return self._stream(req, builder, q)
        try:
            while not builder.done:
                builder.add(await q.get())
        except asyncio.CancelledError:
            self.loop.abort(req.request_id)
            raise
        self._raise_if_failed(req)
        return builder.final(req)

    async def _stream(self, req: Request, builder: ResponseBuilder, q: asyncio.Queue) -> AsyncIterator:
        try:
            for chunk in builder.first_chunks():
                yield chunk
            while not builder.done:
                for chunk in builder.chunks(await q.get()):
                    yield chunk
            self._raise_if_failed(req)
            if builder.include_usage:
                yield builder.usage_chunk(req)
        finally:
            if not builder.done:
                self.loop.abort(req.request_id)  # client went away: free its KV cache now

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

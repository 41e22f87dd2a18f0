"""Legacy completions with several prompts in one request (`prompt: ["a", "b"]` or lists of token
ids), as OpenAI serves them: one engine request per prompt, run together; the choices of prompt i
are numbered i * n + k, usage is summed, and a stream interleaves the chunks as they come."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from edgellm.api import protocol as P

MAX_PROMPTS = 16  # each prompt is a full sequence (times n) on a CPU: keep a request bounded


def is_batch(prompt: Any) -> bool:
    return isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], (str, list))


def _sum_usage(usages: list[P.Usage | None]) -> P.Usage:
    us = [u for u in usages if u is not None]
    return P.Usage(prompt_tokens=sum(u.prompt_tokens for u in us),
                   completion_tokens=sum(u.completion_tokens for u in us), total_tokens=sum(u.total_tokens for u in us),
                   prompt_tokens_details=P.PromptTokensDetails(
                       cached_tokens=sum(u.prompt_tokens_details.cached_tokens for u in us)))


async def run_batch(run: Callable[[str, Any], Awaitable[Any]], request) -> Any:
    """`request` (a CompletionRequest whose prompt is a batch) through `run(kind, request)` per prompt:
    the merged response, or a merged async iterator of chunks when it streams."""
    subs = [request.model_copy(update={"prompt": p}) for p in request.prompt]
    tasks = [asyncio.ensure_future(run("text", s)) for s in subs]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:  # one prompt refused (or the client gone): the others stop too
        for t in tasks:
            t.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        for r in done:
            if hasattr(r, "aclose"):
                await r.aclose()
        raise
    if not request.stream:
        first = results[0]
        choices = [c.model_copy(update={"index": i * request.n + c.index})
                   for i, r in enumerate(results) for c in r.choices]
        return first.model_copy(update={"choices": choices, "usage": _sum_usage([r.usage for r in results])})
    return _merge_streams(results, request.n)


async def _merge_streams(streams: list[AsyncIterator], n: int) -> AsyncIterator:
    q: asyncio.Queue = asyncio.Queue()
    usages: list[P.Usage | None] = [None] * len(streams)
    ids: list[str] = []
    template = None

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for chunk in stream:
                if not chunk.choices and chunk.usage is not None:  # the usage chunk: summed at the end
                    usages[i] = chunk.usage
                    continue
                for c in chunk.choices:
                    c.index = i * n + c.index
                await q.put(chunk)
        finally:
            await q.put(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            chunk = await q.get()
            if chunk is None:
                open_streams -= 1
                continue
            if not ids:
                ids.append(chunk.id)
                template = chunk
            chunk.id = ids[0]  # one request, one id
            yield chunk
        for t in tasks:
            t.result()  # a failed prompt fails the stream (the server reports it in-band)
        if any(u is not None for u in usages) and template is not None:
            yield P.CompletionResponse(id=ids[0], model=template.model, choices=[], usage=_sum_usage(usages))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()  # their requests are aborted (KV freed) if still running

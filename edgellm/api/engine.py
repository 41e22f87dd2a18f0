"""`Engine`: the OpenAI-style Python API over the engine loop (thread-safe, blocking calls)."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgellm.api.embeddings import Embedder
from edgellm.api.frontend import Frontend
from edgellm.api.responses import ResponseBuilder
from edgellm.config import load_chat_config
from edgellm.engine.build import build_engine, pick_device
from edgellm.engine.loop import EngineLoop
from edgellm.engine.options import EngineOptions, make_options
from edgellm.engine.request import Request
from edgellm.errors import BadRequestError, EngineTerminatedError, UserError
from edgellm.models.lora import UnknownAdapterError
from edgellm.prepare import prepare_model

__all__ = ["Engine", "EngineBase", "pick_device"]


def _get(q: queue.SimpleQueue):
    """q.get() that a Ctrl-C can interrupt promptly."""
    while True:
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            continue


class EngineBase:
    """Prepares the model, builds the engine core and its loop, and the frontend that feeds them."""

    def __init__(self, model: str | Path | None, model_lib: str | Path | None = None, device: str = "auto",
                 *, mode: str = "local", engine_config: dict | None = None, **options: Any):
        self.options: EngineOptions = make_options({**(engine_config or {}), "mode": mode, **options})
        if model_lib is not None and self.options.kv_cache_dtype != "auto":
            raise UserError(f"kv_cache_dtype={self.options.kv_cache_dtype} applies to the eager engine; a compiled "
                            "model library keeps its own KV cache (drop the option or the --model-lib)")
        self.model_dir = prepare_model(model)  # the public convenience path: a GGUF or HF dir is converted once
        self.options.additional_models = [str(prepare_model(m)) for m in self.options.additional_models]
        self.model_id = Path(self.model_dir).name
        self.model_aliases: tuple[str, ...] = ()  # other names of the base model (the server's aliases)
        self.model_lib = model_lib
        if device in (None, "", "auto") and self.options.backend_type:  # MNN's backend_type
            device = self.options.backend_type
        self.device = pick_device(device)
        self.config = load_chat_config(Path(self.model_dir))
        self.core = build_engine(self.model_dir, self.options, self.device, model_lib, config=self.config)
        self.context_window = self.core.context_window
        model = self.core.model
        self.frontend = Frontend(Path(self.model_dir), self.config, self.context_window, self.options,
                                 vocab_limit=model.cfg.vocab_size if model is not None else None,
                                 fits=self.core.pool.fits)
        self.frontend.prompt_logprobs = model_lib is None
        self.loop = EngineLoop(self.core)
        self.terminated = False
        self.embedder = Embedder(self)

    # What tests and tools look at; the core owns them.
    @property
    def runner(self):
        return self.core.runner

    @property
    def pool(self):
        return self.core.pool

    @property
    def tokenizer(self):
        return self.frontend.tokenizer

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation rendered with the model's template."""
        return self.frontend.chat_prompt(messages)

    def tokenize(self, text: str, add_special: bool = False, with_pieces: bool = False) -> list:
        """Token ids of `text` (llama.cpp's /tokenize); with_pieces: [{"id", "piece"}], a piece being
        its text, or its bytes when they are not complete UTF-8."""
        ids = self.tokenizer.encode(text, add_special_tokens=add_special)
        if not with_pieces:
            return ids
        out = []
        for tid in ids:
            raw = self.frontend.token_bytes(tid)
            try:
                piece: str | list[int] = raw.decode("utf-8")
            except UnicodeDecodeError:
                piece = list(raw)
            out.append({"id": tid, "piece": piece})
        return out

    def detokenize(self, tokens: list[int]) -> str:
        """Text of token ids (special tokens included, as llama.cpp's /detokenize)."""
        bad = [t for t in tokens if not 0 <= t < self.config.vocab_size]
        if bad:
            raise BadRequestError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})",
                                  param="tokens")
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def fit_history(self, messages: list[dict[str, Any]], max_tokens: int | None = None) -> tuple[list, int]:
        """(messages, whole turns dropped) to fit the context window (the chat option truncate_history)."""
        return self.frontend.fit_history(messages, max_tokens)

    def _build(self, kind: str, request, sink) -> tuple[Request, ResponseBuilder, Any]:
        if self.terminated:
            raise EngineTerminatedError()
        return self.frontend.build(kind, request, sink, self.model_id, self.adapter_for)

    # ---- LoRA adapters -------------------------------------------------------------------------
    @property
    def lora_adapters(self) -> list[str]:
        """Names of the loaded LoRA adapters."""
        return self.core.lora.names() if self.core.lora is not None else []

    def load_lora(self, name: str, path: str | Path) -> None:
        """Load a PEFT LoRA adapter (or a `convert_weight --lora-split` one) under `name`; requests pick
        it with model="name" (or "<base>:name") or lora="name"."""
        if self.terminated:
            raise EngineTerminatedError()
        if self.core.lora is None:
            raise UserError("LoRA adapters at run time need the eager engine on one process "
                            "(no model_lib, tensor_parallel_shards=1)")
        adapter = self.core.lora.read(name, path)  # files and checks off the engine thread
        self.loop.call(lambda: self.core.lora.add(adapter))

    def unload_lora(self, name: str) -> None:
        """Forget the adapter `name` (requests running with it finish with it; new ones get an error)."""
        if self.terminated:
            raise EngineTerminatedError()
        if self.core.lora is None:
            raise UnknownAdapterError(name, [])

        def drop() -> None:
            adapter = self.core.lora.remove(name)
            self.core.pool.drop_prefixes(adapter.key)

        self.loop.call(drop)

    def adapter_for(self, model: str | None, lora: str | None, base_names: tuple[str, ...] = (),
                    strict: bool = False):
        """The LoRA adapter a request asks for (None: the base model): `lora`, or `model` as an adapter's
        name or "<base>:<name>" (vLLM's convention). Unknown adapters raise UnknownAdapterError (HTTP 404);
        so does a `model` that is neither the base (`model_id`, `base_names`) nor an adapter, with `strict`
        or once adapters were loaded (without adapters the Python API ignores `model`, as MLC's does)."""
        names = {self.model_id, *self.model_aliases, *base_names}
        loaded = self.lora_adapters
        picked = None
        if model is not None and model not in names:
            base, sep, name = model.rpartition(":")
            if sep and base in names:
                picked = name
            elif model in loaded:
                picked = model
            elif strict or (self.core.lora is not None and self.core.lora.used):
                shown = [n for n in sorted(names) if "/" not in n and "\\" not in n]  # never a local path
                raise UnknownAdapterError(model, loaded, what="model", served=[*shown, *loaded])
        if lora is not None:
            if picked is not None and picked != lora:
                raise BadRequestError(f"model names the LoRA adapter {picked!r} but lora names {lora!r}",
                                      param="lora")
            picked = lora
        if picked is None:
            return None
        if self.core.lora is None:
            raise UnknownAdapterError(picked, [])
        return self.core.lora.get(picked)

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def failure(self) -> str | None:
        """Why the engine cannot run any more (a tensor-parallel worker died), or None."""
        return getattr(self.core.runner, "failure", None)

    def metrics(self) -> dict:
        """Engine metrics: request and token counters, latency histograms, KV-cache use."""
        return self.core.metrics.snapshot(self.core.gauges())

    def reset(self) -> None:
        """Drop every cached conversation prefix."""
        if self.terminated:
            raise EngineTerminatedError()
        self.loop.call(self.core.pool.clear_prefix_cache)

    def terminate(self) -> None:
        """Stop the engine; later requests raise an error."""
        if not self.terminated:
            self.terminated = True
            self.loop.shutdown()
            close = getattr(self.core.runner, "close", None)  # a tensor-parallel runner stops its workers
            if close is not None:
                close()

    def __del__(self) -> None:
        if getattr(self, "terminated", True) is False:
            self.terminate()

    def _raise_if_failed(self, req: Request) -> None:
        if req.error is not None:
            raise RuntimeError(f"generation failed: {req.error}") from req.error
        if req.cancelled and self.terminated:
            raise EngineTerminatedError()


class _SyncCompletions:
    def __init__(self, engine: Engine, kind: str):
        self.engine, self.kind = engine, kind

    def create(self, **kwargs: Any):
        """A completion (non-streaming) or an iterator of chunks (stream=True)."""
        return self.engine._create(self.kind, kwargs)


class _Chat:
    def __init__(self, engine: Engine):
        self.completions = _SyncCompletions(engine, "chat")


class _Embeddings:
    def __init__(self, engine: Engine):
        self.engine = engine

    def create(self, **kwargs: Any) -> dict:
        """Embeddings of `input` (a string, strings, or token ids), OpenAI's response shape as a dict."""
        if self.engine.terminated:
            raise EngineTerminatedError()
        return self.engine.embedder.create(kwargs)


class Engine(EngineBase):
    """Blocking, thread-safe engine: `engine.chat.completions.create(...)` like OpenAI's client.

    Calls from several threads run concurrently (continuously batched).
    """

    def __init__(self, model: str | Path | None = None, model_lib: str | Path | None = None,
                 device: str = "auto", **kwargs: Any):
        super().__init__(model, model_lib, device, **kwargs)
        self.chat = _Chat(self)
        self.completions = _SyncCompletions(self, "text")
        self.embeddings = _Embeddings(self)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()

    def _create(self, kind: str, request):
        q: queue.SimpleQueue = queue.SimpleQueue()
        req, builder, r = self._build(kind, request, q.put)
        self.loop.add(req)
        if r.stream:
            return self._stream(req, builder, q)
        try:
            while not builder.done:
                builder.add(_get(q))
        except BaseException:  # Ctrl-C: free the request's KV cache
            self.loop.abort(req.request_id)
            raise
        self._raise_if_failed(req)
        return builder.final(req)

    def _stream(self, req: Request, builder: ResponseBuilder, q: queue.SimpleQueue) -> Iterator:
        try:
            yield from builder.first_chunks()
            while not builder.done:
                yield from builder.chunks(_get(q))
            self._raise_if_failed(req)
            if builder.include_usage:
                yield builder.usage_chunk(req)
        finally:
            if not builder.done:
                self.loop.abort(req.request_id)  # the consumer stopped early

"""`Engine`: the OpenAI-style Python API over the engine loop (thread-safe, blocking calls)."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from edgellm.config import load_chat_config
from edgellm.engine import protocol as P
from edgellm.engine.core import EngineCore
from edgellm.engine.kv_pool import KVPool
from edgellm.engine.options import EngineOptions, make_options
from edgellm.engine.request import Request, SamplingParams
from edgellm.engine.responses import ResponseBuilder
from edgellm.engine.runner import ModelRunner
from edgellm.engine.sampler import Sampler
from edgellm.engine.scheduler import Scheduler
from edgellm.errors import BadRequestError, ContextWindowError, EngineTerminatedError, UserError
from edgellm.models.loader import arch_config, load_model, runtime_context
from edgellm.prepare import prepare_model
from edgellm.quantization.modes import get_mode
from edgellm.tokenizer.conversation import Conversation, load_template, render
from edgellm.tokenizer.tokenizer import Tokenizer


def pick_device(device: str) -> str:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {device!r}; choose from auto, cpu, cuda, mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device cuda requested but CUDA is not available")
    return device


def _get(q: queue.SimpleQueue):
    """q.get() that a Ctrl-C can interrupt promptly."""
    while True:
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            continue


class EngineBase:
    """Loads the model and turns OpenAI-style requests into engine requests."""

    def __init__(self, model: str | Path | None, model_lib: str | Path | None = None, device: str = "auto",
                 *, mode: str = "local", engine_config: dict | None = None, **options: Any):
        self.options: EngineOptions = make_options({**(engine_config or {}), "mode": mode, **options})
        if model_lib is not None and self.options.kv_cache_dtype != "auto":
            raise UserError(f"kv_cache_dtype={self.options.kv_cache_dtype} applies to the eager engine; a compiled "
                            "model library keeps its own KV cache (drop the option or the --model-lib)")
        self.model_dir = prepare_model(model)
        self.device = pick_device(device)
        opts = self.options
        torch.set_num_threads(opts.thread_count)
        cfg = load_chat_config(Path(self.model_dir))
        ctx = opts.context_window_size or runtime_context(cfg, arch_config(cfg))
        self.model, self.config = load_model(self.model_dir, device=self.device, use_mmap=opts.use_mmap,
                                             max_positions=ctx, verify=opts.verify_weights)
        arch = self.model.cfg
        self.context_window = ctx
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.model_id = Path(self.model_dir).name
        self.conv: Conversation | None = None
        if self.config.conv_template != "auto":
            self.conv = load_template(self.config.conv_template)
        self.stop_ids = set(self.config.eos_ids)
        if self.conv is not None:
            self.stop_ids |= set(self.conv.stop_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.stop_ids.add(self.tokenizer.eos_token_id)
        budget = opts.max_total_seq_length or max(self.context_window, 4 * min(self.context_window, 4096))
        windows = [w if opts.sliding_window_size is None else opts.sliding_window_size for w in arch.windows]
        kv_dtype = opts.kv_dtype(get_mode(self.config.quantization).model_dtype)
        self.pool = KVPool(arch.num_layers, arch.num_kv_heads, arch.head_dim, windows, budget, kv_dtype,
                           self.device)
        chunk = opts.prefill_chunk_size or self.config.prefill_chunk_size or 2048
        self.scheduler = Scheduler(self.pool, opts.num_sequences, chunk, opts.reuse_kv)
        self.model_lib = model_lib
        if model_lib is not None:  # the library's runner keeps its own weights and caches
            from edgellm.compile.runtime import load_library

            self.runner = load_library(model_lib, self)
        else:
            self.runner = ModelRunner(self.model, self.pool, self.device, opt=opts.opt)
        self.core = EngineCore(self.runner, self.pool, self.scheduler, Sampler(), self.tokenizer,
                               self.context_window)
        self.terminated = False

    # ---- request preparation ------------------------------------------------------------
    def _params(self, r: P.SamplingFields, logprobs: bool, top_logprobs: int) -> SamplingParams:
        cfg = self.config
        stops = list(r.stop or [])
        if self.conv is not None:
            stops += [s for s in self.conv.stop_str if s not in stops]
        vocab = self.config.vocab_size
        for tok in list(r.logit_bias or {}) + list(r.stop_token_ids or []):
            if tok >= vocab:
                raise BadRequestError(f"token id {tok} is outside the vocabulary (size {vocab})",
                                      param="logit_bias" if tok in (r.logit_bias or {}) else "stop_token_ids")
        return SamplingParams(
            temperature=cfg.temperature if r.temperature is None else r.temperature,
            top_p=cfg.top_p if r.top_p is None else r.top_p,
            top_k=r.top_k or 0,
            min_p=r.min_p or 0.0,
            frequency_penalty=cfg.frequency_penalty if r.frequency_penalty is None else r.frequency_penalty,
            presence_penalty=cfg.presence_penalty if r.presence_penalty is None else r.presence_penalty,
            repetition_penalty=cfg.repetition_penalty if r.repetition_penalty is None else r.repetition_penalty,
            logit_bias=dict(r.logit_bias or {}),
            seed=r.seed if r.seed is not None else self.options.seed,
            max_tokens=r.max_tokens or self.options.max_tokens,
            stop=stops, stop_token_ids=list(r.stop_token_ids or []), ignore_eos=r.ignore_eos,
            logprobs=logprobs, top_logprobs=top_logprobs or 0,
        )

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation rendered with the model's template."""
        if self.conv is not None:
            return self.tokenizer.encode_prompt(render(self.conv, messages))
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))

    def _check_window(self, prompt: list[int]) -> None:
        if len(prompt) >= self.context_window:
            raise ContextWindowError(len(prompt), self.context_window)

    def _build(self, kind: str, kwargs: dict[str, Any], sink) -> tuple[Request, ResponseBuilder, P.SamplingFields]:
        if self.terminated:
            raise EngineTerminatedError()
        if kind == "chat":
            r = P.parse_request(P.ChatCompletionRequest, kwargs)
            messages = [{"role": m.role, "content": m.text()} for m in r.messages]
            prompt = self.chat_prompt(messages)
            params = self._params(r, r.logprobs, r.top_logprobs or 0)
            echo = ""
        else:
            r = P.parse_request(P.CompletionRequest, kwargs)
            if isinstance(r.prompt, str):
                prompt = self.tokenizer.encode(r.prompt, add_special_tokens=True)
                echo = r.prompt if r.echo else ""
            else:
                prompt = list(r.prompt)
                bad = [t for t in prompt if t >= self.config.vocab_size]
                if bad:
                    raise BadRequestError(f"prompt token id {bad[0]} is outside the vocabulary "
                                          f"(size {self.config.vocab_size})", param="prompt")
                echo = self.tokenizer.decode(prompt) if r.echo else ""
            if not prompt:
                raise BadRequestError("prompt is empty", param="prompt")
            params = self._params(r, r.logprobs is not None, r.logprobs or 0)
        self._check_window(prompt)
        if r.response_format is not None and r.response_format.type != "text":
            from edgellm.engine.grammar import compile_response_format

            params.grammar = compile_response_format(self, r.response_format)
        req = Request(P.new_id("chatcmpl" if kind == "chat" else "cmpl"), prompt, params, r.n, sink,
                      stop_ids=self.stop_ids)
        if params.grammar is not None:
            for seq in req.sequences:
                seq.grammar_matcher = params.grammar.matcher()
        include_usage = bool(r.stream and r.stream_options and r.stream_options.include_usage)
        builder = ResponseBuilder(kind, req.request_id, r.model or self.model_id, r.n, self.tokenizer,
                                  echo_text=echo, include_usage=include_usage,
                                  tokens_as_ids=r.return_tokens_as_token_ids)
        return req, builder, r

    # ---- lifecycle ---------------------------------------------------------------------------
    def metrics(self) -> dict:
        """Engine metrics: request and token counters, latency histograms, KV-cache use."""
        return self.core.metrics.snapshot(self.core.gauges())

    def reset(self) -> None:
        """Drop every cached conversation prefix."""
        self.core.call(self.pool.clear_prefix_cache)

    def terminate(self) -> None:
        """Stop the engine; later requests raise an error."""
        if not self.terminated:
            self.terminated = True
            self.core.shutdown()

    def __del__(self) -> None:
        if getattr(self, "terminated", True) is False:
            self.terminate()


class _SyncCompletions:
    def __init__(self, engine: Engine, kind: str):
        self.engine, self.kind = engine, kind

    def create(self, **kwargs: Any):
        """A completion (non-streaming) or an iterator of chunks (stream=True)."""
        return self.engine._create(self.kind, kwargs)


class _Chat:
    def __init__(self, engine: Engine):
        self.completions = _SyncCompletions(engine, "chat")


class Engine(EngineBase):
    """Blocking, thread-safe engine: `engine.chat.completions.create(...)` like OpenAI's client.

    Calls from several threads run concurrently (continuously batched).
    """

    def __init__(self, model: str | Path | None = None, model_lib: str | Path | None = None,
                 device: str = "auto", **kwargs: Any):
        super().__init__(model, model_lib, device, **kwargs)
        self.chat = _Chat(self)
        self.completions = _SyncCompletions(self, "text")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()

    def _create(self, kind: str, kwargs: dict[str, Any]):
        q: queue.SimpleQueue = queue.SimpleQueue()
        req, builder, r = self._build(kind, kwargs, lambda _req, outs: q.put(outs))
        self.core.add(req)
        if r.stream:
            return self._stream(req, builder, q)
        while not builder.done:
            builder.add(_get(q))
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
                self.core.abort(req.request_id)  # the consumer stopped early

    def _raise_if_failed(self, req: Request) -> None:
        if req.error is not None:
            raise RuntimeError(f"generation failed: {req.error}") from req.error
        if req.cancelled and self.terminated:
            raise EngineTerminatedError()

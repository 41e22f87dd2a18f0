"""Turn one OpenAI-style request into an engine request: validate once, render, tokenize, check.

`Frontend.build` takes a parsed request (the server's pydantic object) or keyword arguments (the
Python API), and returns the engine `Request` with an `OutputProcessor` as its consumer, plus the
`ResponseBuilder` that assembles what the caller sees.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgellm.api import protocol as P
from edgellm.api.batch import is_batch
from edgellm.api.processor import OutputProcessor
from edgellm.api.responses import ResponseBuilder
from edgellm.api.tokens import TokenBytes
from edgellm.api.tools import forced_schema, template_messages
from edgellm.config import ChatConfig
from edgellm.engine.options import EngineOptions
from edgellm.engine.request import Request, SamplingParams
from edgellm.errors import BadRequestError, ContextWindowError
from edgellm.tokenizer.conversation import Conversation, load_template, render
from edgellm.tokenizer.tokenizer import Tokenizer

# Stop strings are matched against every streamed delta: bound how many and how long (OpenAI allows 4).
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


def chat_prompt(tokenizer: Tokenizer, conv: Conversation | None, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of a conversation rendered with the named template `conv` or (None) the model's jinja one."""
    if conv is not None:
        msgs = template_messages(messages, tools, False, "tool" in conv.roles)
        return tokenizer.encode_prompt(render(conv, msgs))
    # The model's jinja template gets `tools` when it renders them; otherwise Hermes instructions.
    renders = "tools" in (tokenizer.chat_template or "")
    msgs = template_messages(messages, tools, renders, True)
    return tokenizer.encode(tokenizer.apply_chat_template(msgs, tools=tools if renders else None))


class Frontend:
    """Everything a request needs to know about the model's text side: tokenizer, template, stops."""

    def __init__(self, model_dir: Path, config: ChatConfig, context_window: int, options: EngineOptions,
                 vocab_limit: int | None = None, fits: Callable[[int], bool] = lambda n: True):
        self.config, self.context_window, self.options = config, context_window, options
        # token ids the model can embed (a config may claim a larger vocabulary than the embedding has)
        self.vocab_limit = min(config.vocab_size, vocab_limit or config.vocab_size)
        self.fits = fits  # whether a sequence of n tokens fits the KV budget alone
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.token_bytes = TokenBytes(self.tokenizer)
        self.conv: Conversation | None = None
        if config.conv_template != "auto":
            self.conv = load_template(config.conv_template)
        self.stop_ids = set(config.eos_ids)
        if self.conv is not None:
            self.stop_ids |= set(self.conv.stop_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.stop_ids.add(self.tokenizer.eos_token_id)
        self._grammar = None  # GrammarCompiler, built on the first response_format
        self.prompt_logprobs = True  # whether the runner can return the prompt rows' logits

    # ---- pieces ---------------------------------------------------------------------------------
    def sampling_params(self, r: P.SamplingFields, logprobs: bool, top_logprobs: int) -> SamplingParams:
        cfg = self.config
        vocab = self.vocab_limit
        for tok in list(r.logit_bias or {}) + list(r.stop_token_ids or []):
            if tok >= vocab:
                raise BadRequestError(f"token id {tok} is outside the vocabulary (size {vocab})",
                                      param="logit_bias" if tok in (r.logit_bias or {}) else "stop_token_ids")
        return SamplingParams(
            temperature=cfg.temperature if r.temperature is None else r.temperature,
            top_p=cfg.top_p if r.top_p is None else r.top_p,
            top_k=cfg.top_k if r.top_k is None else r.top_k,
            min_p=cfg.min_p if r.min_p is None else r.min_p,
            frequency_penalty=cfg.frequency_penalty if r.frequency_penalty is None else r.frequency_penalty,
            presence_penalty=cfg.presence_penalty if r.presence_penalty is None else r.presence_penalty,
            repetition_penalty=cfg.repetition_penalty if r.repetition_penalty is None else r.repetition_penalty,
            logit_bias=dict(r.logit_bias or {}),
            seed=r.seed if r.seed is not None else self.options.seed,
            max_tokens=r.max_tokens or self.options.max_tokens,
            stop_token_ids=list(r.stop_token_ids or []), ignore_eos=r.ignore_eos,
            logprobs=logprobs, top_logprobs=top_logprobs or 0, speculative=r.speculative,
        )

    def stop_strings(self, r: P.SamplingFields) -> list[str]:
        stops = list(r.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise BadRequestError(f"stop: at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_LENGTH} "
                                  "characters each", param="stop")
        if self.conv is not None:
            stops += [s for s in self.conv.stop_str if s not in stops]
        return stops

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation (with the tools offered, if any) rendered with the model's template."""
        return chat_prompt(self.tokenizer, self.conv, messages, tools)

    def fit_history(self, messages: list[dict[str, Any]], max_tokens: int | None = None) -> tuple[list, int]:
        """(messages, turns dropped): the oldest whole turns dropped so the prompt leaves room for a reply
        (max_tokens, else a quarter of the window) in the context window; see tokenizer/history.py."""
        from edgellm.tokenizer.history import fit_history

        reserve = min(max_tokens or self.context_window // 4, self.context_window // 2)
        budget = self.context_window - 1 - reserve
        return fit_history(messages, lambda m: len(self.chat_prompt(m)), budget, target=budget * 3 // 4)

    def _compiler(self):
        if self._grammar is None:
            from edgellm.api.grammar import GrammarCompiler

            self._grammar = GrammarCompiler(self.tokenizer, self.config.vocab_size, self.stop_ids)
        return self._grammar

    def grammar(self, response_format: P.ResponseFormat):
        return self._compiler().compile(response_format)

    # ---- a whole request -------------------------------------------------------------------------
    def parse(self, kind: str, request: P.SamplingFields | dict[str, Any]) -> P.SamplingFields:
        if isinstance(request, P.SamplingFields):
            return request  # already validated (the server's body)
        return P.parse_request(P.ChatCompletionRequest if kind == "chat" else P.CompletionRequest, request)

    def build(self, kind: str, request: P.SamplingFields | dict[str, Any], sink,
              model_id: str, adapter_for: Callable | None = None) -> tuple[Request, ResponseBuilder, P.SamplingFields]:
        """(engine request whose outputs go to `sink(list[TokenOutput])`, response builder, parsed request).
        `adapter_for(model, lora)` resolves the request's LoRA adapter (None: the base model)."""
        r = self.parse(kind, request)
        lora = adapter_for(r.model, r.lora) if adapter_for is not None else None
        tools = None
        if kind == "chat":
            messages = [m.to_dict() for m in r.messages]
            if r.truncate_history:
                messages = self.fit_history(messages, r.max_tokens)[0]
            if r.tools and r.tool_choice != "none":
                tools = r.tool_dicts()
            prompt = self.chat_prompt(messages, tools)
            if not prompt:
                raise BadRequestError("the messages render to an empty prompt", param="messages")
            bad = [t for t in prompt if t >= self.vocab_limit]
            if bad:  # a tokenizer larger than the model's embedding
                raise BadRequestError(f"the prompt has token id {bad[0]}, outside the model's vocabulary "
                                      f"(size {self.vocab_limit})", param="messages")
            params = self.sampling_params(r, r.logprobs, r.top_logprobs or 0)
            echo = ""
            forced, name = r.forced_tool()
            if tools and forced:
                params.grammar = self._compiler().compile_tool_call(forced_schema(tools, name))
        else:
            if is_batch(r.prompt):
                raise BadRequestError("several prompts in one request are served by `edgellm serve` and "
                                      "AsyncEngine; call Engine once per prompt", param="prompt")
            if isinstance(r.prompt, str):
                prompt = self.tokenizer.encode(r.prompt, add_special_tokens=True)
                echo = r.prompt if r.echo else ""
            else:
                prompt = list(r.prompt)
                bad = [t for t in prompt if t >= self.vocab_limit]
                if bad:
                    raise BadRequestError(f"prompt token id {bad[0]} is outside the vocabulary "
                                          f"(size {self.vocab_limit})", param="prompt")
                echo = self.tokenizer.decode(prompt) if r.echo else ""
            if not prompt:
                raise BadRequestError("prompt is empty", param="prompt")
            params = self.sampling_params(r, r.logprobs is not None, r.logprobs or 0)
            if r.echo and r.logprobs is not None:
                if not self.prompt_logprobs:
                    raise BadRequestError("echo with logprobs needs the eager engine (no --model-lib)", param="echo")
                params.prompt_logprobs = True
        if len(prompt) >= self.context_window:
            raise ContextWindowError(len(prompt), self.context_window)
        if not self.fits(len(prompt) + 1):
            raise BadRequestError(f"prompt has {len(prompt)} tokens but the KV cache budget cannot hold "
                                  f"{len(prompt) + 1} positions (raise max_total_seq_length)",
                                  param="messages" if kind == "chat" else "prompt", code="kv_budget_exceeded")
        if r.response_format is not None and r.response_format.type != "text":
            params.grammar = self.grammar(r.response_format)
        processor = OutputProcessor(self.tokenizer, self.stop_strings(r), r.n, sink, buffered=not r.stream)
        req = Request(P.new_id("chatcmpl" if kind == "chat" else "cmpl"), prompt, params, r.n,
                      stop_ids=self.stop_ids, consumer=processor, lora=lora)
        include_usage = bool(r.stream and r.stream_options and r.stream_options.include_usage)
        builder = ResponseBuilder(kind, req.request_id, r.model or model_id, r.n, self.tokenizer,
                                  echo_text=echo, include_usage=include_usage,
                                  tokens_as_ids=r.return_tokens_as_token_ids, token_bytes=self.token_bytes,
                                  tools=tools, parallel_tool_calls=getattr(r, "parallel_tool_calls", None) is not False)
        return req, builder, r

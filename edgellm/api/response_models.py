"""OpenAI-shaped response objects (pydantic): completions, chat completions, their stream chunks, usage
and logprobs. Re-exported by `edgellm.api.protocol` with the request objects."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field, PrivateAttr, model_serializer


def _keep_null(*names: str):
    """A serializer keeping `names` as JSON null under exclude_none (OpenAI sends them as null)."""
    def serialize(self, handler):
        d = handler(self)
        for name in names:
            d.setdefault(name, None)
        return d
    return model_serializer(mode="wrap")(serialize)



class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    # edgellm's extras, as MLC-LLM reports them
    extra: dict[str, float] | None = None


class ChatCompletionMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    _ser = _keep_null("content")


class ChatCompletionResponseChoice(BaseModel):
    _ser = _keep_null("finish_reason", "logprobs")
    index: int
    message: ChatCompletionMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionStreamChoice(BaseModel):
    _ser = _keep_null("finish_reason", "logprobs")
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class _Chunk(BaseModel):
    # With stream_options.include_usage, OpenAI sends "usage": null on every chunk but the last.
    _usage_null: bool = PrivateAttr(default=False)

    @model_serializer(mode="wrap")
    def _ser(self, handler):
        d = handler(self)
        if self._usage_null:
            d.setdefault("usage", None)
        return d


class ChatCompletionStreamResponse(_Chunk):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    _ser = _keep_null("finish_reason", "logprobs")
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Chunk):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None

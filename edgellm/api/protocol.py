"""OpenAI-shaped request and response objects (pydantic), shared by the engine and the server."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# the response objects live in response_models.py; this module names them all (P.ChatCompletionResponse, ...)
from edgellm.api.response_models import (  # noqa: F401
    ChatCompletionMessage,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from edgellm.errors import BadRequestError


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# Request fields accepted and ignored because they change nothing about the answer (docs/api.md).
HARMLESS_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})


def _refuse_unknown(cls: type[BaseModel], data: Any) -> Any:
    """A field the server does not implement is a 400 naming it, never silently dropped."""
    if isinstance(data, dict):
        known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        for key in data:
            if key not in known and key not in HARMLESS_FIELDS:
                raise PydanticCustomError("unsupported_parameter", "unsupported parameter: {name}", {"name": key})
    return data


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None
    # MLC-LLM's spelling: {"type": "json_object", "schema": "..."}
    schema_: dict[str, Any] | str | None = Field(default=None, alias="schema")
    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and not self.json_schema:
            raise ValueError("response_format json_schema needs a 'json_schema' object")
        return self


class SamplingFields(BaseModel):
    """Options shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _unknown(cls, data: Any) -> Any:
        return _refuse_unknown(cls, data)

    model: str | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    logit_bias: dict[int, float] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1, le=16)  # each choice is a full sequence on a CPU: keep it bounded
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    user: str | None = None
    # vLLM's extension: logprob tokens as "token_id:<id>" (exact ids, no decoding ambiguity)
    return_tokens_as_token_ids: bool = False
    # edgellm's extension: false = no speculative decoding for this request (when the engine uses it)
    speculative: bool = True
    # llama-server's / edgellm's extension: the loaded LoRA adapter to run with (as model="name" does)
    lora: str | None = Field(default=None, min_length=1, max_length=256)

    # MLC-LLM's extension, sent by its clients and tests: {"ignore_eos": true} is honoured; its other keys
    # (grammar execution mode, special requests) tune MLC's own engine and change nothing here.
    debug_config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _stream_options(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if self.debug_config and self.debug_config.get("ignore_eos"):
            self.ignore_eos = True
        return self

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        for tok, bias in (v or {}).items():
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias for token {tok} must be in [-100, 100]")
            if tok < 0:
                raise ValueError(f"logit_bias token id {tok} is negative")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _ids(cls, v: list[int] | None) -> list[int] | None:
        if v and any(t < 0 for t in v):
            raise ValueError("stop_token_ids must be non-negative")
        return v


class FunctionDef(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolCallFunction(BaseModel):
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The message for a chat template: role, text content, and the tool-call fields."""
        d: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            d["tool_call_id"] = self.tool_call_id
        if self.name:
            d["name"] = self.name
        return d

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        parts = []
        for item in self.content:
            if item.get("type") != "text" or not isinstance(item.get("text"), str):
                raise BadRequestError("only text content parts are supported", param="messages")
            parts.append(item["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    tools: list[Tool] | None = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def tool_dicts(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def forced_tool(self) -> tuple[bool, str | None]:
        """(whether a call is required, the function it must be or None for any)."""
        choice = self.tool_choice
        if isinstance(choice, dict):
            return True, (choice.get("function") or {}).get("name")
        return choice == "required", None
    # edgellm/MNN extension: drop the oldest whole turns (never the system prompt) to fit the window
    truncate_history: bool = False

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, dict):
            fn = self.tool_choice.get("function")
            if self.tool_choice.get("type") != "function" or not isinstance(fn, dict) or "name" not in fn:
                raise ValueError('tool_choice must be "none", "auto", "required" or '
                                 '{"type": "function", "function": {"name": ...}}')
        if self.tools and self.response_format is not None and self.response_format.type != "text" \
                and self.forced_tool()[0]:
            raise ValueError("response_format cannot be combined with a required tool call")
        if not self.messages:
            raise ValueError("messages must not be empty")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    max_tokens: int | None = Field(default=16, gt=0)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if len(v) == 1 and isinstance(v[0], (str, list)):
                v = v[0]
            elif isinstance(v[0], (str, list)):  # several prompts: one engine request each (api/batch.py)
                if len(v) > 16:
                    raise ValueError(f"at most 16 prompts in one request, got {len(v)}")
                if any(isinstance(p, list) and (not p or any(t < 0 for t in p)) for p in v):
                    raise ValueError("each prompt of token ids must be non-empty and non-negative")
                return v
        if isinstance(v, list) and any(t < 0 for t in v):
            raise ValueError("prompt token ids must be non-negative")
        return v


class EmbeddingRequest(BaseModel):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _unknown(cls, data: Any) -> Any:
        return _refuse_unknown(cls, data)

    @field_validator("input")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("input must not be empty")
        if isinstance(v, list) and len(v) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return v


class LoadLoraRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter body."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)


class TokenizeRequest(BaseModel):
    """llama.cpp's /tokenize body."""

    content: str
    add_special: bool = False
    with_pieces: bool = False

    @model_validator(mode="before")
    @classmethod
    def _unknown(cls, data: Any) -> Any:
        return _refuse_unknown(cls, data)


class DetokenizeRequest(BaseModel):
    """llama.cpp's /detokenize body."""

    tokens: list[int]

    @model_validator(mode="before")
    @classmethod
    def _unknown(cls, data: Any) -> Any:
        return _refuse_unknown(cls, data)


def parse_request(cls: type[BaseModel], kwargs: dict[str, Any]) -> Any:
    """Validate request kwargs; errors become BadRequestError naming the parameter."""
    try:
        return cls.model_validate(kwargs)
    except ValidationError as e:
        msg, param = describe_error(e.errors()[0])
        raise BadRequestError(msg, param=param) from None


def describe_error(err: dict) -> tuple[str, str | None]:
    """(one-line message, parameter) for a pydantic validation error entry."""
    msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    if err.get("type") == "unsupported_parameter":
        return msg, (err.get("ctx") or {}).get("name")
    param = ".".join(str(p) for p in err.get("loc", ()) if p != "body" and not isinstance(p, int)) or None
    return (f"{param}: {msg}" if param else msg), param

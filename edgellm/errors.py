"""Errors a user can cause. Each carries one clear line; the CLI prints it and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for (bad path, bad option, bad file)."""


class BadRequestError(UserError, ValueError):
    """An invalid request to the engine (OpenAI's invalid_request_error, HTTP 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ContextWindowError(BadRequestError):
    """A prompt that does not fit the context window (HTTP 400, code context_length_exceeded)."""

    def __init__(self, prompt_tokens: int, window: int, max_tokens: int | None = None):
        msg = (
            f"prompt has {prompt_tokens} tokens but the context window is {window} tokens"
            if max_tokens is None
            else f"prompt has {prompt_tokens} tokens; with max_tokens={max_tokens} "
            f"it exceeds the context window of {window} tokens"
        )
        super().__init__(msg, param="messages", code="context_length_exceeded")
        self.prompt_tokens = prompt_tokens
        self.window = window


class EngineTerminatedError(BadRequestError):
    """A request made after `terminate()`."""

    def __init__(self) -> None:
        super().__init__("the engine has been terminated", code="engine_terminated")


class CorruptWeightsError(UserError):
    """A shard whose bytes do not match its manifest."""

"""Conversation templates as data, compatible with MLC-LLM's "conv_template" JSON.

A template is a `Conversation`; `render` turns OpenAI-style chat messages into the prompt the same
way MLC-LLM's `Conversation.as_prompt` does after its engine has copied the request in.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from edgellm.errors import BadRequestError, UserError
from edgellm.tokenizer.templates import BUILTIN_TEMPLATES

TEMPLATE_NAMES: tuple[str, ...] = tuple(BUILTIN_TEMPLATES)

SYSTEM_PLACEHOLDER = "{system_message}"
FUNCTION_PLACEHOLDER = "{function_string}"
_DEFAULT_ROLE_TEMPLATES = {
    "user": "{user_message}",
    "assistant": "{assistant_message}",
    "tool": "{tool_message}",
}

PromptPart = str | list[int]


def _placeholder(role: str) -> str:
    return "{" + role + "_message}"


@dataclass
class Conversation:
    """A conversation template with MLC-LLM's fields (see `to_dict` for the JSON layout)."""

    roles: dict[str, str]
    seps: list[str]
    name: str | None = None
    system_template: str = SYSTEM_PLACEHOLDER
    system_message: str = ""
    system_prefix_token_ids: list[int] | None = None
    add_role_after_system_message: bool = True
    role_templates: dict[str, str] = field(default_factory=lambda: dict(_DEFAULT_ROLE_TEMPLATES))
    messages: list[list[Any]] = field(default_factory=list)
    role_content_sep: str = ""
    role_empty_sep: str = ""
    stop_str: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    strip_reasoning_in_history: bool = False
    function_string: str = ""
    use_function_calling: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON object MLC-LLM writes as "conv_template" (keys in its order; None values left out)."""
        out: dict[str, Any] = {}
        for key in _JSON_ORDER:
            value = getattr(self, key)
            if value is None:
                continue
            if key == "messages":
                value = [[role, content] for role, content in value]
            out[key] = copy.deepcopy(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Conversation:
        """Build a template from a "conv_template" JSON object (unknown keys are ignored)."""
        if not isinstance(data, Mapping):
            raise UserError(f"conv_template must be a JSON object, got {type(data).__name__}")
        for key in ("roles", "seps"):
            if key not in data:
                raise UserError(f"conv_template is missing the field {key!r}")
        known = {f.name for f in fields(cls)}
        kwargs = {k: copy.deepcopy(v) for k, v in data.items() if k in known}
        role_templates = dict(_DEFAULT_ROLE_TEMPLATES)
        role_templates.update(kwargs.get("role_templates") or {})
        kwargs["role_templates"] = role_templates
        kwargs["messages"] = [list(m) for m in kwargs.get("messages") or []]
        conv = cls(**kwargs)
        conv._check()
        return conv

    def _check(self) -> None:
        if not isinstance(self.roles, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.roles.items()
        ):
            raise UserError("conv_template field 'roles' must map role names to strings")
        if not isinstance(self.seps, list) or not 1 <= len(self.seps) <= 2:
            raise UserError("conv_template field 'seps' must be a list of 1 or 2 strings")
        for key in ("system_template", "system_message", "role_content_sep", "role_empty_sep"):
            if not isinstance(getattr(self, key), str):
                raise UserError(f"conv_template field {key!r} must be a string")

    def copy(self) -> Conversation:
        """A deep copy."""
        return copy.deepcopy(self)


_JSON_ORDER = (
    "name",
    "system_template",
    "system_message",
    "system_prefix_token_ids",
    "add_role_after_system_message",
    "roles",
    "role_templates",
    "messages",
    "seps",
    "role_content_sep",
    "role_empty_sep",
    "stop_str",
    "stop_token_ids",
    "strip_reasoning_in_history",
    "function_string",
    "use_function_calling",
)


def get_template(name: str) -> Conversation:
    """A fresh copy of the built-in template `name`; unknown names raise UserError listing the known ones."""
    if name not in BUILTIN_TEMPLATES:
        raise UserError(
            f"unknown conversation template {name!r}; known templates: {', '.join(TEMPLATE_NAMES)}"
        )
    return Conversation.from_dict({"name": name, **BUILTIN_TEMPLATES[name]})


def load_template(value: str | Mapping[str, Any]) -> Conversation:
    """The "conv_template" of mlc-chat-config.json: a template name (older files) or a JSON object."""
    if isinstance(value, str):
        return get_template(value)
    return Conversation.from_dict(value)


def _field(message: Any, key: str) -> Any:
    if isinstance(message, Mapping):
        return message.get(key)
    return getattr(message, key, None)


def _check_content(content: Any, index: int) -> str | list[str]:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for item in content:
            if _field(item, "type") != "text" or not isinstance(_field(item, "text"), str):
                raise BadRequestError(
                    f"messages[{index}].content: only text content parts are supported", param="messages"
                )
            texts.append(_field(item, "text"))
        return texts
    raise BadRequestError(
        f"messages[{index}].content must be a string, got {type(content).__name__}", param="messages"
    )


def split_messages(
    conv: Conversation, messages: Sequence[Any]
) -> tuple[str | None, list[tuple[str, str | list[str]]]]:
    """Validate OpenAI-style messages; return (system message or None, [(role, content), ...]).

    Content is a string, or a list of strings for a message given as text content parts.
    Raises BadRequestError(param="messages") for an empty list, an unknown role, content that is not
    text, or a system message anywhere but first.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise BadRequestError("messages must be a non-empty list of messages", param="messages")
    system: str | None = None
    turns: list[tuple[str, str | list[str]]] = []
    allowed = ["system", *conv.roles]
    for i, message in enumerate(messages):
        role = _field(message, "role")
        if role == "system":
            if i != 0:
                raise BadRequestError(
                    f"messages[{i}]: a system message is only allowed as the first message", param="messages"
                )
            content = _check_content(_field(message, "content"), i)
            system = content if isinstance(content, str) else "".join(content)
        elif isinstance(role, str) and role in conv.roles:
            turns.append((role, _check_content(_field(message, "content"), i)))
        else:
            raise BadRequestError(
                f"messages[{i}]: unknown role {role!r}; expected one of {', '.join(allowed)}",
                param="messages",
            )
    return system, turns


def _strip_reasoning(history: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    last_user = max((i for i, (role, _) in enumerate(history) if role == "user"), default=-1)
    out = []
    for i, (role, content) in enumerate(history):
        if role == "assistant" and i < last_user and isinstance(content, str) and "</think>" in content:
            content = content.split("</think>")[-1].lstrip("\n")
        out.append((role, content))
    return out


def render(
    conv: Conversation, messages: Sequence[Any], add_generation_prompt: bool = True
) -> list[PromptPart]:
    """Render chat messages with a template into prompt parts, as MLC-LLM does.

    Returns ``[prompt]`` or, when the template has ``system_prefix_token_ids`` (e.g. BOS for
    llama-2/llama-3/phi-3/gemma), ``[prefix_token_ids, prompt]``: the token ids go in front of the
    encoded prompt string (encode the string without adding special tokens; see
    `Tokenizer.encode_prompt`). A request's system message replaces the template's; consecutive
    messages of the same role are rendered one after another, each with its role prefix. With
    `add_generation_prompt`, the assistant's empty turn (role + role_empty_sep) ends the prompt.
    The template itself is not modified.
    """
    system, turns = split_messages(conv, messages)
    system_message = conv.system_message if system is None else system
    system_text = conv.system_template.replace(SYSTEM_PLACEHOLDER, system_message)
    seps = list(conv.seps) if len(conv.seps) == 2 else [conv.seps[0], conv.seps[0]]

    history: list[tuple[str, Any]] = [(role, content) for role, content in conv.messages]
    history.extend(turns)
    if add_generation_prompt:
        history.append(("assistant", None))
    if conv.strip_reasoning_in_history:
        history = _strip_reasoning(history)

    pieces: list[str] = [system_text]
    for i, (role, content) in enumerate(history):
        if role not in conv.roles:
            raise BadRequestError(f"role {role!r} is not in template {conv.name!r}", param="messages")
        sep = seps[1] if role == "assistant" else seps[0]
        if content is None:
            pieces.append(conv.roles[role] + conv.role_empty_sep)
            continue
        if not conv.add_role_after_system_message and system_text and i == 0:
            pieces.append("")
        else:
            pieces.append(conv.roles[role] + conv.role_content_sep)
        template = conv.role_templates.get(role, _placeholder(role))
        for text in [content] if isinstance(content, str) else content:
            pieces.append(template.replace(_placeholder(role), text))
        pieces.append(sep)

    prompt = "".join(pieces)
    head, found, tail = prompt.rpartition(FUNCTION_PLACEHOLDER)
    if found:
        prompt = head.replace(FUNCTION_PLACEHOLDER, "") + conv.function_string + tail
    parts: list[PromptPart] = []
    if conv.system_prefix_token_ids:
        parts.append(list(conv.system_prefix_token_ids))
    parts.append(prompt)
    return parts


def prompt_text(parts: Sequence[PromptPart]) -> str:
    """The string parts of a rendered prompt joined (token-id parts left out), for logs and tests."""
    return "".join(p for p in parts if isinstance(p, str))

"""A model's own Hugging Face chat template (jinja), rendered like transformers' apply_chat_template.

This is `--conv-template auto`: the template comes from tokenizer_config.json ("chat_template") or a
chat_template.jinja file next to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgellm.errors import BadRequestError, UserError


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Like transformers: no HTML escaping, non-ASCII kept as is.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# Accepts transformers' `{% generation %}...{% endgeneration %}` blocks and renders their body.
class _GenerationTag(jinja2.ext.Extension):
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


# `namespace()` that refuses underscore names, so templates cannot reach Python internals.
class _Namespace(jinja2.utils.Namespace):
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the attribute {name!r}")


# A template renders per request: bound its work so a hostile or broken one cannot hold a worker.
MAX_RENDER_SECONDS = 5.0
MAX_RANGE_ITEMS = 100_000  # over all range() calls of one render
MAX_OUTPUT_CHARS = 16 * 1024 * 1024


class _Budget:
    """One render's allowance of loop items and time (reached through the render's variables)."""

    def __init__(self) -> None:
        self._deadline = time.monotonic() + MAX_RENDER_SECONDS
        self._items = 0

    def _spend(self, items: int = 0) -> None:
        self._items += items
        if self._items > MAX_RANGE_ITEMS:
            raise jinja2.exceptions.SecurityError(f"loops over more than {MAX_RANGE_ITEMS} items")
        if time.monotonic() > self._deadline:
            raise jinja2.exceptions.SecurityError(f"rendering took longer than {MAX_RENDER_SECONDS:.0f} s")

    def _range(self, *args: int) -> range:
        r = range(*args)
        self._spend(len(r))
        return r


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**"])

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        budget = __context.get("__budget")
        if isinstance(budget, _Budget):
            budget._spend()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise jinja2.exceptions.SecurityError("exponent too large")
        if operator == "*":
            n = right if isinstance(left, (str, list, tuple)) else left
            seq = left if isinstance(left, (str, list, tuple)) else right
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT_CHARS:
                raise jinja2.exceptions.SecurityError("repetition too large")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


# Rebuild request data out of plain JSON types so the sandbox only ever sees those.
def _plain(value: Any) -> Any:
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump(exclude_none=True))
    for plain_type in (bool, str, int, float):  # subclasses (enums, numpy scalars) lose their methods
        if isinstance(value, plain_type):
            return plain_type(value) if plain_type is not str else str.__str__(value)
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """A compiled Hugging Face chat template plus the special-token strings it may use."""

    def __init__(self, source: str, special_tokens: Mapping[str, str | None] | None = None):
        if not isinstance(source, str) or not source.strip():
            raise UserError("the chat template is empty")
        try:
            self.template = _compile(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise UserError(f"the chat template is not valid jinja (line {e.lineno}): {e.message}") from e
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}

    def render(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render messages to the prompt string (special tokens appear as text, e.g. "<|im_start|>").

        Encode the result without adding special tokens. A template that calls raise_exception, or
        messages that are not a non-empty list of {"role": str, "content": ...} objects, raise
        BadRequestError(param="messages").
        """
        return render_chat_template(
            self, messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs
        )


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise BadRequestError("messages must be a non-empty list of messages", param="messages")
    plain = _plain(list(messages))
    for i, message in enumerate(plain):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise BadRequestError(f"messages[{i}].content must be a string", param="messages")
    return plain


def render_chat_template(
    template: ChatTemplate | str,
    messages: Sequence[Any],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` with a chat template (a ChatTemplate, or template source text).

    Variables given to the template: messages, add_generation_prompt, tools, documents (None), the
    special-token strings (bos_token, eos_token, unk_token, pad_token, ...) and any extra `kwargs`
    (e.g. enable_thinking=False), as transformers' apply_chat_template does.
    """
    if isinstance(template, str):
        template = ChatTemplate(template)
    variables: dict[str, Any] = dict(template.special_tokens)
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    variables.update(_plain(kwargs))
    budget = _Budget()
    try:
        pieces, size = [], 0
        for piece in template.template.generate(
            messages=_check_messages(messages),
            tools=_plain(tools),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            range=budget._range,
            __budget=budget,
            **variables,
        ):
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise jinja2.exceptions.SecurityError(f"the output exceeds {MAX_OUTPUT_CHARS} characters")
            budget._spend()
            pieces.append(piece)
        return "".join(pieces)
    except jinja2.exceptions.SecurityError as e:
        raise BadRequestError(f"the model's chat template did something unsafe: {e}", param="messages") from e
    except (jinja2.exceptions.TemplateError, TypeError) as e:
        raise BadRequestError(f"the chat template rejected the messages: {e}", param="messages") from e

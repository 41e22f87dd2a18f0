"""One line for a pydantic validation error: the file, the field and what is allowed."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError

from edgellm.errors import UserError


def field_name(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def one_line(source: str | Path, e: ValidationError) -> UserError:
    """A UserError naming `source`, the first bad field, its value and the allowed range."""
    err = e.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    value = err.get("input")
    shown = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    if len(shown) > 60:
        shown = shown[:57] + "..."
    msg = err["msg"].replace("Value error, ", "").replace("\n", " ")
    return UserError(f"{source}: {field_name(loc)}: {msg} (got {shown})")


def validate(model: type[BaseModel], data: object, source: str | Path) -> BaseModel:
    """`model` validated from `data`, or a one-line UserError naming `source`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise one_line(source, e) from None

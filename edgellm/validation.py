"""One line for a pydantic validation error: the file, the field and what is allowed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from edgellm.errors import UserError


def field_name(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _allowed(model: type[BaseModel] | None, loc: tuple) -> str:
    """'allowed: integer in 1..4096' from the model's JSON schema for the field at `loc`, or ''."""
    if model is None:
        return ""
    try:
        schema = model.model_json_schema()
    except Exception:  # a schema pydantic cannot express: no hint, the message still names the field
        return ""
    defs, node = schema.get("$defs", {}), schema
    for part in loc:
        if isinstance(part, int):
            node = node.get("items", {})
            continue
        options = [defs.get(o["$ref"].rsplit("/", 1)[1], o) if "$ref" in o else o
                   for o in [node] + node.get("anyOf", [])]
        node = next((o["properties"][part] for o in options if part in o.get("properties", {})), None)
        if node is None:
            return ""
    hints = []
    for o in [node] + node.get("anyOf", []):
        if "enum" in o or "const" in o:
            hints.append("one of " + ", ".join(map(str, o.get("enum", [o.get("const")]))))
        # pydantic writes ge/le for constraints behind a BeforeValidator, minimum/maximum otherwise
        lo = next((o[k] for k in ("minimum", "ge", "exclusiveMinimum", "gt") if k in o), None)
        hi = next((o[k] for k in ("maximum", "le", "exclusiveMaximum", "lt") if k in o), None)
        if lo is not None or hi is not None:
            left = "(" if "exclusiveMinimum" in o or "gt" in o else "["
            right = ")" if "exclusiveMaximum" in o or "lt" in o else "]"
            kind = "an integer" if o.get("type") == "integer" else "a number"
            lo, hi = ("-inf" if lo is None else lo), ("inf" if hi is None else hi)
            hints.append(f"{kind} in {left}{lo}, {hi}{right}")
    return f"; allowed: {' or '.join(hints)}" if hints else ""


def one_line(source: str | Path, e: ValidationError, model: type[BaseModel] | None = None) -> UserError:
    """A UserError naming `source`, the first bad field, its value and the allowed range."""
    err = e.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    value = err.get("input")
    shown = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    if len(shown) > 60:
        shown = shown[:57] + "..."
    msg = err["msg"].replace("Value error, ", "").replace("\n", " ")
    if not loc:  # a check across fields: its message says it all
        return UserError(f"{source}: {msg}")
    return UserError(f"{source}: {field_name(loc)}: {msg} (got {shown}{_allowed(model, loc)})")


def validate(model: type[BaseModel], data: object, source: str | Path) -> BaseModel:
    """`model` validated from `data`, or a one-line UserError naming `source`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise one_line(source, e, model) from None


def _integer(v: Any) -> Any:
    if isinstance(v, (bool, str)) or v is None:
        raise ValueError(f"must be an integer, not {type(v).__name__}")
    if isinstance(v, float):
        if not (math.isfinite(v) and v.is_integer()):
            raise ValueError("must be a whole number")
        return int(v) if abs(v) < 2**62 else v
    return int(v) if hasattr(v, "__index__") else v  # numpy integers from GGUF metadata


def _number(v: Any) -> Any:
    if isinstance(v, (bool, str)) or v is None:
        raise ValueError(f"must be a number, not {type(v).__name__}")
    if hasattr(v, "__float__") and not isinstance(v, (int, float)):
        v = float(v)
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


def Int(lo: int, hi: int):  # noqa: N802 - a type factory
    """An integer (never a string, a bool or a fraction) in lo..hi."""
    return Annotated[int, BeforeValidator(_integer), Field(ge=lo, le=hi)]


def Num(gt: float | None = 0.0, le: float = 1e12, ge: float | None = None):  # noqa: N802
    """A finite number (never a string) in (gt, le] or [ge, le]."""
    return Annotated[float, BeforeValidator(_number), Field(gt=None if ge is not None else gt, ge=ge, le=le)]

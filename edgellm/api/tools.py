"""Tool calling: tools into the prompt, the model's tool calls out of its text, and the JSON schema
that constrains them when a call is required.

Output formats parsed: Hermes/Qwen `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (any
number), Mistral `[TOOL_CALLS][{...}, ...]`, and Llama-3 style bare JSON (`{"name": ...,
"parameters": {...}}`, optionally after `<|python_tag|>`), which is also what constrained decoding
produces.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from edgellm.errors import BadRequestError

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def system_prompt(tools: list[dict[str, Any]]) -> str:
    """The Hermes function-calling instructions, for templates that do not render `tools` themselves."""
    sigs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You are a function calling AI model. You are provided with function signatures within <tools></tools> "
            "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
            f"about what values to plug into functions.\n<tools>\n{sigs}\n</tools>\nFor each function call return "
            "a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-dict>}\n</tool_call>')


def _arguments(call: dict[str, Any]) -> Any:
    args = (call.get("function") or {}).get("arguments", {})
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


def template_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                      template_renders_tools: bool, tool_role: bool) -> list[dict[str, Any]]:
    """Messages as a template renders them: assistant tool calls as Hermes text (unless the template
    renders `tool_calls` itself), tool results as `tool` turns or <tool_response> user turns, and the
    tools' instructions in the system message when the template does not render `tools`."""
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls") and not template_renders_tools:
            calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                            "arguments": _arguments(c)}, ensure_ascii=False)
                              + "\n</tool_call>" for c in m.pop("tool_calls"))
            m["content"] = ((m.get("content") or "") + ("\n" if m.get("content") else "") + calls)
        elif m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments(c)}}
                               for c in m["tool_calls"]]
        if m["role"] == "tool" and not (template_renders_tools or tool_role):
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    if tools and not template_renders_tools:
        prompt = system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": (out[0]["content"] or "") + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def forced_schema(tools: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """JSON schema of one call {"name", "arguments"} to the named function (or any of `tools`)."""
    options = []
    for t in tools:
        fn = t["function"]
        if name is None or fn["name"] == name:
            params = fn.get("parameters") or {"type": "object"}
            options.append({"type": "object", "properties": {"name": {"enum": [fn["name"]]}, "arguments": params},
                            "required": ["name", "arguments"], "additionalProperties": False})
    if not options:
        raise BadRequestError(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
    return options[0] if len(options) == 1 else {"anyOf": options}


def _call(obj: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": obj["name"], "arguments": text}}


def _json_values(text: str) -> list[Any] | None:
    """One JSON value, or several separated by whitespace or ';' (Llama-3's parallel calls)."""
    dec, values, i = json.JSONDecoder(), [], 0
    while i < len(text):
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i >= len(text):
            break
        try:
            value, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)
    return values or None


def parse_tool_calls(text: str, tools: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """(content left over or None, tool calls) from a reply; no calls -> (text, [])."""
    names = {t["function"]["name"] for t in tools}
    stripped = text.strip()
    if "<tool_call>" in stripped:
        calls = []
        for body in _HERMES.findall(stripped):
            values = _json_values(body)
            call = _call(values[0], names) if values else None
            if call is None:
                return text, []
            calls.append(call)
        content = stripped[:stripped.index("<tool_call>")].strip()
        return content or None, calls
    body = stripped.removeprefix("[TOOL_CALLS]").removeprefix("<|python_tag|>").strip()
    values = _json_values(body)
    if values is None:
        return text, []
    flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
    calls = [_call(v, names) for v in flat]
    if not calls or any(c is None for c in calls):
        return text, []
    return None, calls

"""Streaming tool calls: a reply's tool calls sent as they are generated, as OpenAI streams them.

The first `delta.tool_calls` entry of a call carries its index, id, type and name (with empty
arguments) as soon as the name is complete; then the `function.arguments` string follows in the
pieces the model writes it. `scan` parses the text so far (it is re-run on the whole reply at each
step: replies are short next to a step's cost) into what is already certain: leading content,
and calls whose argument text only ever grows, so what was sent is always a prefix of what follows.

Streamable shapes are those of `tools.parse_tool_calls` with `name` before `arguments`/`parameters`
and an object as the arguments (what models and the constrained grammar write); anything else is
held to the end and parsed whole there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edgellm.api.tools import new_call_id, parse_tool_calls

_WS = " \t\r\n"
_TAG, _END_TAG = "<tool_call>", "</tool_call>"
_JSON_PREFIXES = ("[TOOL_CALLS]", "<|python_tag|>")


class _Partial(Exception):
    """The text ends inside the expected structure: wait for more."""


class _Mismatch(Exception):
    """The text is not a tool call of a streamable shape."""


@dataclass
class Scan:
    status: str  # "maybe" (undecided), "plain" (text), "calls", "held" (hold to the end)
    content: str = ""  # leading content that is certain
    calls: list[tuple[str, str, bool]] = field(default_factory=list)  # (name, argument text so far, complete)


def _ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _lit(text: str, i: int, *lits: str) -> int:
    """Index after whichever of `lits` follows (after whitespace)."""
    i = _ws(text, i)
    for lit in lits:
        if text.startswith(lit, i):
            return i + len(lit)
    if any(lit.startswith(text[i:]) for lit in lits):
        raise _Partial
    raise _Mismatch


def _string(text: str, i: int) -> tuple[str, int]:
    i = _lit(text, i, '"')
    j = i
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            try:
                return json.loads(text[i - 1:j + 1]), j + 1
            except json.JSONDecodeError:
                raise _Mismatch from None
        j += 1
    raise _Partial


def _object_end(text: str, i: int) -> int | None:
    """Index after the JSON object starting at text[i] == '{', or None if it is not complete yet."""
    depth, in_str, j = 0, False, i
    while j < len(text):
        ch = text[j]
        if in_str:
            if ch == "\\":
                j += 1
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


def _call(text: str, i: int, names: set[str], calls: list) -> int:
    """Parse one call object at i into `calls` (partial ones too, once the name is known); index after it."""
    i = _lit(text, i, "{")
    i = _lit(text, i, '"name"')
    i = _lit(text, i, ":")
    name, i = _string(text, i)
    if names and name not in names:
        raise _Mismatch
    try:
        i = _lit(text, i, ",")
        i = _lit(text, i, '"arguments"', '"parameters"')
        i = _lit(text, i, ":")
    except _Partial:
        calls.append((name, "", False))
        raise
    i = _ws(text, i)
    if i == len(text):
        calls.append((name, "", False))
        raise _Partial
    if text[i] != "{":
        raise _Mismatch
    end = _object_end(text, i)
    if end is None:
        calls.append((name, text[i:], False))
        raise _Partial
    calls.append((name, text[i:end], True))
    return _lit(text, end, "}")


def _json_calls(text: str, i: int, names: set[str]) -> Scan:
    calls: list = []
    try:
        i = _ws(text, i)
        rest = text[i:]
        for prefix in _JSON_PREFIXES:
            if rest.startswith(prefix):
                i += len(prefix)
                break
            if prefix.startswith(rest):
                raise _Partial
        i = _ws(text, i)
        if i < len(text) and text[i] == "[":
            i += 1
        while True:
            i = _call(text, i, names, calls)
            i = _ws(text, i)
            while i < len(text) and text[i] in ",;" + _WS:
                i += 1
            if i == len(text) or text[i] != "{":
                return Scan("calls", calls=calls)
    except _Partial:
        return Scan("calls" if calls else "maybe", calls=calls)
    except _Mismatch:
        return Scan("calls" if calls else "held", calls=calls)


def _tail_tag_prefix(text: str) -> int:
    """Length of the longest end of `text` that may be the start of a <tool_call> tag."""
    for k in range(min(len(_TAG) - 1, len(text)), 0, -1):
        if _TAG.startswith(text[-k:]):
            return k
    return 0


def scan(text: str, names: set[str]) -> Scan:
    """What is certain about a reply's text so far (see the module doc)."""
    head = text.lstrip(_WS)
    if not head:
        return Scan("maybe")
    if head[0] in "{[" or any(p.startswith(head[:len(p)]) for p in _JSON_PREFIXES):
        s = _json_calls(text, 0, names)
        if s.status != "held" or s.calls:
            return s
        if head[0] in "{[" and (_object_end(head, 0) is None
                                or parse_tool_calls(text, [{"function": {"name": n}} for n in names])[1]):
            return s  # maybe calls in another order: held, parsed whole at the end
        if not head.startswith(_TAG[:len(head)]):
            return Scan("plain", content=text)
    at = text.find(_TAG)
    if at < 0:  # content, maybe followed by calls: hold back what may start a tag, and trailing blanks
        return Scan("plain", content=text[:len(text) - _tail_tag_prefix(text)].rstrip(_WS))
    s = Scan("calls", content=text[:at].rstrip(_WS))
    i = at + len(_TAG)
    try:
        while True:
            i = _call(text, i, names, s.calls)
            i = _lit(text, i, _END_TAG)
            i = _ws(text, i)
            if not text.startswith(_TAG, i):
                if _TAG.startswith(text[i:]):
                    raise _Partial
                return s
            i += len(_TAG)
    except _Partial:
        return s
    except _Mismatch:
        s.status = "held"
        return s


class ToolCallStream:
    """One choice's streamed reply when tools are offered: feed text, get deltas to send."""

    def __init__(self, tools: list[dict[str, Any]], parallel: bool = True):
        self.tools = tools
        self.names = {t["function"]["name"] for t in tools}
        self.parallel = parallel
        self.text = ""
        self.sent_content = ""  # content sent so far
        self.sent: list[list] = []  # per call streamed: [id, name, argument text sent]

    @property
    def called(self) -> bool:
        return bool(self.sent)

    def _deltas(self, s: Scan) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if s.content.startswith(self.sent_content) and len(s.content) > len(self.sent_content) and not self.sent:
            out.append({"content": s.content[len(self.sent_content):]})
            self.sent_content = s.content
        for k, (name, args, _complete) in enumerate(s.calls if self.parallel else s.calls[:1]):
            if k == len(self.sent):
                self.sent.append([new_call_id(), name, ""])
                out.append({"tool_calls": [{"index": k, "id": self.sent[k][0], "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
            done = self.sent[k][2]
            if len(args) > len(done) and args.startswith(done):
                out.append({"tool_calls": [{"index": k, "function": {"arguments": args[len(done):]}}]})
                self.sent[k][2] = args
        return out

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas ({"content"} or {"tool_calls"}) that the new text makes certain."""
        self.text += text
        return self._deltas(scan(self.text, self.names))

    def finish(self) -> list[dict[str, Any]]:
        """The remaining deltas at the end of the choice: held text parsed whole."""
        s = scan(self.text, self.names)
        out = self._deltas(s)
        content, calls = parse_tool_calls(self.text, self.tools)
        if not self.parallel:
            calls = calls[:1]
        if not self.sent and not calls:  # plain text after all: whatever was held back
            if self.text.startswith(self.sent_content) and len(self.text) > len(self.sent_content):
                out.append({"content": self.text[len(self.sent_content):]})
            return out
        if not self.sent and content and content.startswith(self.sent_content) and content != self.sent_content:
            out.append({"content": content[len(self.sent_content):]})
        for k in range(len(self.sent), len(calls)):  # calls only the whole text revealed
            fn = calls[k]["function"]
            self.sent.append([calls[k]["id"], fn["name"], fn["arguments"]])
            out.append({"tool_calls": [{"index": k, "id": calls[k]["id"], "type": "function",
                                        "function": {"name": fn["name"], "arguments": ""}}]})
            out.append({"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]})
        return out

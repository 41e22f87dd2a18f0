"""Tool calling (issue 12) through the official openai client against a real `edgellm serve`, and
tool conversations rendered through the real SmolLM2 chat template."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from edgellm.api.frontend import chat_prompt
from edgellm.tokenizer.conversation import load_template
from edgellm.tokenizer.tokenizer import Tokenizer
from tests.test_serve import Server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                    "celsius": {"type": "boolean"}},
                   "required": ["city", "celsius"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_model):
    s = Server(tiny_model, "--overrides", "max_num_sequence=8;max_tokens=256;context_window_size=1024")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def _valid(call, name="get_weather") -> dict:
    assert call.type == "function" and call.function.name == name and call.id
    args = json.loads(call.function.arguments)
    if name == "get_weather":
        assert args["city"] in ("Paris", "Rome") and isinstance(args["celsius"], bool) and len(args) == 2
    else:
        assert args == {"zone": args["zone"]} and args["zone"] in ("UTC", "CET")
    return args


def test_named_tool_choice_non_streaming(client):
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK,
                                       tools=[WEATHER, TIME], temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    _valid(choice.message.tool_calls[0], "get_time")


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_call_streams_as_delta_tool_calls(client, choice):
    mid = client.models.list().data[0].id
    stream = client.chat.completions.create(model=mid, messages=ASK, tools=[WEATHER], tool_choice=choice,
                                            stream=True, temperature=0.7, seed=3)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls and calls[0].id and calls[0].function.name == "get_weather"
    assert len([tc for tc in calls if tc.function and tc.function.arguments]) > 1  # arguments in pieces
    arguments = "".join(tc.function.arguments or "" for tc in calls if tc.index == 0)
    args = json.loads(arguments)
    assert args["city"] in ("Paris", "Rome") and isinstance(args["celsius"], bool)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(d.content for d in deltas)


def test_tool_result_turn_and_bad_tool_requests(server, client):
    mid = client.models.list().data[0].id
    msgs = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "celsius": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    r = client.chat.completions.create(model=mid, messages=msgs, tools=[WEATHER], max_tokens=8, tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    url = server.base + "/v1/chat/completions"
    for body, param in (({"tool_choice": "required"}, None),  # no tools
                        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.function.name")):
        err = httpx.post(url, json={"messages": ASK, **body}, timeout=30)
        assert err.status_code == 400, err.text
        assert err.json()["error"]["param"] == param
    tool_no_id = httpx.post(url, json={"messages": ASK + [{"role": "tool", "content": "x"}]}, timeout=30)
    assert tool_no_id.status_code == 400 and "tool_call_id" in tool_no_id.json()["error"]["message"]


def test_two_turn_tool_conversation_renders_through_smollm2_template(smollm2_tokenizer_dir):
    tok = Tokenizer.from_dir(smollm2_tokenizer_dir)
    msgs = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "celsius": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    text = tok.decode(chat_prompt(tok, None, msgs, [WEATHER]), skip_special_tokens=False)
    assert '"name": "get_weather"' in text and "18 degrees, sunny" in text
    assert text.index("<tools>") < text.index("What is the weather") < text.index('"arguments": {"city": "Paris"') \
        < text.index("<|im_start|>tool\n18 degrees")
    assert text.endswith("<|im_start|>assistant\n")
    # the same conversation through a named template
    chatml = tok.decode(chat_prompt(tok, load_template("chatml"), msgs, [WEATHER]), skip_special_tokens=False)
    assert "<tool_call>" in chatml and "18 degrees, sunny" in chatml and "<tools>" in chatml


def test_parsers_for_hermes_mistral_llama3():
    from edgellm.api.tools import parse_tool_calls

    tools = [WEATHER, TIME]
    hermes = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "celsius": false}}'
              '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')
    content, calls = parse_tool_calls(hermes, tools)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    _, calls = parse_tool_calls('[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]', tools)
    assert json.loads(calls[0]["function"]["arguments"]) == {"zone": "UTC"}
    _, calls = parse_tool_calls('<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}', tools)
    assert calls[0]["function"]["name"] == "get_time"
    unknown = '{"name": "unknown", "arguments": {}}'
    assert parse_tool_calls(unknown, tools) == (unknown, [])
    assert parse_tool_calls("Paris is sunny.", tools) == ("Paris is sunny.", [])


def test_streamed_tool_call_arguments_are_incremental(client):
    """The official client's own stream accumulation: the first tool-call delta carries index, id, type and
    name with empty arguments; then `function.arguments` arrives in one piece per generated token or so,
    not at the end."""
    from openai.lib.streaming.chat import ChatCompletionStreamState

    mid = client.models.list().data[0].id
    state = ChatCompletionStreamState()
    stream = client.chat.completions.create(model=mid, messages=ASK, tools=[WEATHER], stream=True, temperature=0,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            stream_options={"include_usage": True})
    pieces, events, usage = [], [], None
    for chunk in stream:
        events += [e.type for e in state.handle_chunk(chunk)]
        usage = chunk.usage or usage
        for d in [c.delta for c in chunk.choices]:
            for tc in d.tool_calls or []:
                if tc.id:
                    assert not pieces and tc.type == "function" and tc.function.name == "get_weather"
                    assert tc.function.arguments == ""
                elif tc.function.arguments:
                    pieces.append(tc.function.arguments)
    final = state.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls" and call.function.arguments == "".join(pieces)
    _valid(call)
    assert events.count("tool_calls.function.arguments.delta") >= len(pieces)
    # one piece per token of the arguments (a few tokens go to the name): never held and sent at the end
    assert usage.completion_tokens and len(pieces) >= len(call.function.arguments) // 4


def test_tool_call_stream_parser_sends_what_is_certain():
    from edgellm.api.tool_stream import ToolCallStream

    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "celsius": false}}'
            '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')
    s = ToolCallStream([WEATHER, TIME])
    deltas = [d for ch in text for d in s.feed(ch)] + s.finish()
    assert "".join(d.get("content", "") for d in deltas) == "Let me check."
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"]) for c in calls if "id" in c] == [(0, "get_weather"), (1, "get_time")]
    args = ["".join(c["function"]["arguments"] for c in calls if c["index"] == k) for k in (0, 1)]
    assert args == ['{"city": "Rome", "celsius": false}', '{"zone": "CET"}']
    assert len(calls) > 20  # streamed character by character, not at the end
    for plain in ("Paris is sunny.", '{"city": "Paris"}', "[1, 2]", '{"name": "unknown", "arguments": {}}'):
        s = ToolCallStream([WEATHER, TIME])
        deltas = [d for ch in plain for d in s.feed(ch)] + s.finish()
        assert "".join(d.get("content", "") for d in deltas) == plain and not s.called
    # a shape that cannot stream (arguments before name) is held and parsed whole at the end
    s = ToolCallStream([WEATHER, TIME])
    held = '{"arguments": {"zone": "UTC"}, "name": "get_time"}'
    assert not [d for ch in held for d in s.feed(ch)] and s.finish()[0]["tool_calls"][0]["function"]["name"] \
        == "get_time"

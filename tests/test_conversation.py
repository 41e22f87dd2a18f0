import json

import pytest

from edgellm.errors import BadRequestError, UserError
from edgellm.tokenizer.conversation import (
    TEMPLATE_NAMES,
    Conversation,
    get_template,
    load_template,
    prompt_text,
    render,
)

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]

_CHATML = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\nHow are you?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
_LLAMA3 = (
    "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

# Written out by hand from MLC-LLM's template fields and its as_prompt algorithm.
EXPECTED = {
    "chatml": (None, _CHATML),
    "qwen2": (None, _CHATML),
    "internlm2": ([1], _CHATML),
    "llama-2": (
        [1],
        "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] How are you? [/INST] ",
    ),
    "llama-3": ([128000], _LLAMA3),
    "llama-3_1": ([128000], _LLAMA3),
    "mistral_default": ([1], "[INST] You are terse.Hi [/INST] Hello! [INST] How are you? [/INST]"),
    "phi-3": (
        [1],
        "<|system|>\nYou are terse.<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
        "<|user|>\nHow are you?<|end|>\n<|assistant|>\n",
    ),
    "gemma_instruction": (
        [2],
        "You are terse.<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\n",
    ),
    "redpajama_chat": (None, "You are terse.<human>: Hi\n<bot>: Hello!\n<human>: How are you?\n<bot>:"),
    "LM": ([1], "You are terse.HiHello!How are you?"),
}


def test_all_spec_templates_exist():
    assert set(TEMPLATE_NAMES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_multi_turn(name):
    prefix, text = EXPECTED[name]
    parts = render(get_template(name), CHAT)
    assert parts == ([prefix, text] if prefix else [text])


def test_default_system_messages():
    user = [{"role": "user", "content": "Hi"}]
    assert render(get_template("llama-2"), user) == [
        [1],
        "[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.\n<</SYS>>\n\nHi [/INST] ",
    ]
    assert render(get_template("qwen2"), user) == [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ]
    assert render(get_template("gemma_instruction"), user) == [
        [2],
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    ]
    assert render(get_template("LM"), [{"role": "user", "content": "Once upon a time"}]) == [
        [1],
        "Once upon a time",
    ]


def test_consecutive_roles_and_no_generation_prompt():
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    assert prompt_text(render(get_template("redpajama_chat"), msgs, add_generation_prompt=False)) == (
        "<human>: a\n<human>: b\n<bot>: c\n"
    )
    # llama-2: the first message after the system prompt has no role prefix, later ones do.
    assert render(get_template("llama-2"), msgs)[1] == (
        "[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.\n<</SYS>>\n\n"
        "a <s>[INST] b [/INST] c </s>[/INST] "
    )


def test_text_content_parts_and_pydantic_like_messages():
    class Msg:
        def __init__(self, role, content):
            self.role, self.content = role, content

    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    a = render(get_template("chatml"), [Msg("user", parts)])
    b = render(get_template("chatml"), [{"role": "user", "content": "Hello"}])
    assert a == b


def test_render_does_not_modify_template():
    conv = get_template("llama-2")
    before = conv.to_dict()
    render(conv, CHAT)
    assert conv.to_dict() == before
    assert conv.system_message == "You are a helpful, respectful and honest assistant."


def test_get_template_returns_fresh_copies():
    a = get_template("chatml")
    a.system_message = "changed"
    a.stop_str.append("x")
    b = get_template("chatml")
    assert b.system_message.startswith("A conversation between a user")
    assert b.stop_str == ["<|im_end|>"]


def test_unknown_template_lists_names():
    with pytest.raises(UserError) as e:
        get_template("vicuna-9000")
    msg = str(e.value)
    assert "vicuna-9000" in msg
    for name in TEMPLATE_NAMES:
        assert name in msg


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_to_dict_from_dict_round_trip(name):
    conv = get_template(name)
    data = json.loads(json.dumps(conv.to_dict()))
    again = Conversation.from_dict(data)
    assert again == conv
    assert again.to_dict() == data
    assert render(again, CHAT) == render(conv, CHAT)


def test_to_dict_layout_matches_mlc():
    assert get_template("llama-2").to_dict() == {
        "name": "llama-2",
        "system_template": "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
        "system_message": "You are a helpful, respectful and honest assistant.",
        "system_prefix_token_ids": [1],
        "add_role_after_system_message": False,
        "roles": {"user": "<s>[INST]", "assistant": "[/INST]", "tool": "[INST]"},
        "role_templates": {
            "user": "{user_message}",
            "assistant": "{assistant_message}",
            "tool": "{tool_message}",
        },
        "messages": [],
        "seps": [" ", " </s>"],
        "role_content_sep": " ",
        "role_empty_sep": " ",
        "stop_str": ["[INST]"],
        "stop_token_ids": [2],
        "strip_reasoning_in_history": False,
        "function_string": "",
        "use_function_calling": False,
    }
    assert list(get_template("chatml").to_dict())[:4] == [
        "name",
        "system_template",
        "system_message",
        "add_role_after_system_message",
    ]


def test_loads_older_mlc_json_and_legacy_name():
    # An older mlc-chat-config.json "conv_template": one separator, no strip_reasoning_in_history,
    # partial role_templates and an unknown extra key.
    data = {
        "name": "custom",
        "system_template": "<<{system_message}>>",
        "system_message": "sys",
        "roles": {"user": "U", "assistant": "A"},
        "role_templates": {"user": "[{user_message}]"},
        "messages": [["user", "earlier"], ["assistant", "reply"]],
        "seps": ["|"],
        "role_content_sep": ": ",
        "role_empty_sep": ":",
        "stop_str": ["U:"],
        "stop_token_ids": [7],
        "some_future_field": 1,
    }
    conv = load_template(data)
    assert conv.role_templates["assistant"] == "{assistant_message}"
    assert render(conv, [{"role": "user", "content": "now"}]) == ["<<sys>>U: [earlier]|A: reply|U: [now]|A:"]
    assert load_template("qwen2") == get_template("qwen2")


def test_function_string_placeholder():
    conv = Conversation.from_dict(
        {"roles": {"user": "U", "assistant": "A"}, "seps": ["\n"], "system_template": "{function_string}S"}
    )
    conv.function_string = "TOOLS"
    msgs = [{"role": "user", "content": "x{function_string}y"}]
    # MLC fills the last placeholder with function_string and empties the others.
    assert render(conv, msgs, add_generation_prompt=False) == ["SUxTOOLSy\n"]


@pytest.mark.parametrize(
    "data",
    [
        {"seps": ["a"]},
        {"roles": {"user": "U", "assistant": "A"}, "seps": []},
        {"roles": {"user": "U", "assistant": "A"}, "seps": ["a", "b", "c"]},
        {"roles": ["user"], "seps": ["a"]},
        "not a dict",
    ],
)
def test_from_dict_rejects_bad_json(data):
    with pytest.raises(UserError):
        Conversation.from_dict(data)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        None,
        "hello",
        [{"role": "wizard", "content": "hi"}],
        [{"content": "hi"}],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]}],
        [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}],
        [{"role": "system", "content": {"text": "x"}}, {"role": "user", "content": "hi"}],
    ],
)
def test_bad_messages(messages):
    with pytest.raises(BadRequestError) as e:
        render(get_template("chatml"), messages)
    assert e.value.param == "messages"


def test_tool_role_only_where_template_has_it():
    msg = [{"role": "tool", "content": "42"}]
    assert render(get_template("llama-2"), msg)[1].startswith("[INST] <<SYS>>")
    with pytest.raises(BadRequestError, match="unknown role 'tool'"):
        render(get_template("chatml"), msg)


def test_strip_reasoning_in_history():
    conv = get_template("chatml")
    conv.strip_reasoning_in_history = True
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>hmm</think>\n\nA1"},
        {"role": "user", "content": "q2"},
    ]
    text = prompt_text(render(conv, msgs))
    assert "hmm" not in text and "<|im_start|>assistant\nA1<|im_end|>" in text

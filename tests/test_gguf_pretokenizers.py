"""The GGUF pre-tokenizers (llama.cpp's names, expressed with the `tokenizers` library) split text as
llama.cpp does: each pattern applied in turn to the pieces the previous one left, matches and the
text between them both kept. Checked against the same patterns run by the `regex` module."""

from __future__ import annotations

import pytest
import regex

from edgellm.errors import UserError
from edgellm.weights.gguf_tokenizer import _PRE, build_tokenizer

TEXTS = [
    "Hello World! It's 2024: we'll pay $1,234,567.89 (USD) for 12 apples, DON'T we? I'M sure.",
    "  leading spaces\tand tabs\r\n\r\nwindows lines\n\n\ntrailing   ",
    "def f(x):\n    return x**2 // 3  # comment `code` <|im_end|>",
    "我爱自然语言处理。今天天气很好！ 안녕하세요 세계 こんにちは、世界。カタカナ ｱｲｳ",
    "café naïve ünïcödé Ελληνικά русский язык नमस्ते दुनिया e\u0301 Ωmega K",
    "CamelCaseWord HTTPServer iPhone ABCdef 'S 'LL µ ǅ ﬁ",
    "emoji 😀🎉👍🏽 /path/to?q=1&r=two#frag ... !!! ??? --- 1234567 <sentinel:12> IMGIMGABZ",
]


def llama_cpp_split(patterns: list[str], text: str) -> list[str]:
    pieces = [text]
    for pattern in patterns:
        compiled, out = regex.compile(pattern), []
        for piece in pieces:
            start = 0
            for m in compiled.finditer(piece):
                out += [piece[start:m.start()], m.group()]
                start = m.end()
            out.append(piece[start:])
        pieces = [p for p in out if p]
    return pieces


@pytest.mark.parametrize("name", sorted(_PRE))
def test_pre_tokenizer_splits_like_llama_cpp(name):
    from tokenizers import Regex, pre_tokenizers

    splits, _ = _PRE[name]
    ours = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits])
    for text in TEXTS:
        assert [p for p, _ in ours.pre_tokenize_str(text)] == llama_cpp_split(splits, text), text


@pytest.mark.parametrize("name", ["qwen35", "falcon", "deepseek-coder", "deepseek-llm"])
def test_new_pre_tokenizers_build(name):
    tokens = ["a", "b", "ab", "Ġ", "<|endoftext|>"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": name, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1, 1, 1, 1, 3], "tokenizer.ggml.merges": ["a b"]}
    text, config = build_tokenizer(meta, "test.gguf")
    assert '"Split"' in text and config["add_bos_token"] is False


def test_unknown_pre_tokenizer_is_refused_with_the_list():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "kimi-k2", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(UserError, match=r"pre-tokenizer 'kimi-k2' is not supported \(supported: .*deepseek-llm.*"
                                        r"qwen35"):
        build_tokenizer(meta, "test.gguf")


def _spm_meta(name: str) -> dict:
    tokens = ["<unk>", "<s>", "</s>", "<|user|>", "<|end|>", "▁", "▁h", "▁hi", "h", "i", "\n", "<0x0A>"]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, 0.0],
            "tokenizer.ggml.token_type": [2, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 6],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "general.name": name}


def test_phi3_special_tokens_strip_the_whitespace_after_them():
    # llama.cpp keys this on the model name: Phi-3's control tokens swallow the whitespace that
    # follows them (so "<|user|>\nhi" is "<|user|>", "▁hi"); other models keep it.
    from tokenizers import Tokenizer

    phi3 = Tokenizer.from_str(build_tokenizer(_spm_meta("Phi-3 Mini 4k Instruct"), "phi3.gguf")[0])
    other = Tokenizer.from_str(build_tokenizer(_spm_meta("Llama 2"), "llama.gguf")[0])
    text = "<|user|>\n hi<|end|>\n"
    assert phi3.encode(text, add_special_tokens=False).ids == [3, 7, 4]
    assert other.encode(text, add_special_tokens=False).ids[:2] == [3, 5]

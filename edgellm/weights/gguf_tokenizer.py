"""Rebuild a Hugging Face `tokenizers` tokenizer from the vocabulary a GGUF file carries."""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from edgellm.errors import UserError

# Split patterns as the original tokenizer.json files write them (llama.cpp's llama-vocab.cpp
# spells the same patterns without inline flags or with lookahead workarounds). Applied one after
# another, each splitting the pieces the previous one left, as llama.cpp does.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_MINICPM5 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_JAIS2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          + "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4)) + r"|\s{1,2}(?!\S)|\s{1}")
_WORD_UP = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_WORD_LO = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_REST = r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LOWER_WORD, _UPPER_WORD = _WORD_UP + "*" + _WORD_LO + "+", _WORD_UP + "+" + _WORD_LO + "*"
_TEKKEN = _LOWER_WORD + "|" + _UPPER_WORD + r"|\p{N}|" + _REST
_GPT4O = (_LOWER_WORD + _CONTRACTIONS + "?|" + _UPPER_WORD + _CONTRACTIONS + r"?|\p{N}{1,3}|" + _REST)
_CJK = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_YOUTU = ["[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f"
          "\ufe30-\ufe4f]+|[\u3105-\u312f]+|" + _CJK[:-1] + "+",
          _LOWER_WORD + _CONTRACTIONS + "?|" + _UPPER_WORD + _CONTRACTIONS + r"?|\p{N}|" + _REST]
_DEEPSEEK3_WORDS = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPARK_WORDS = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+")
# DeepSeek LLM's letters: the cased letters (Lu, Ll, Lt) of its tokenizer's Unicode version, as ranges.
_DEEPSEEK_LETTERS = "".join(
    chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in (
        (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF),
        (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377), (0x37B, 0x37D), (0x37F, 0x37F),
        (0x386, 0x386), (0x388, 0x38A), (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481),
        (0x48A, 0x52F), (0x531, 0x556), (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD),
        (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A),
        (0x1E00, 0x1F15), (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57),
        (0x1F59, 0x1F59), (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4),
        (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3),
        (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102),
        (0x2107, 0x2107), (0x210A, 0x2113), (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124),
        (0x2126, 0x2126), (0x2128, 0x2128), (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139),
        (0x213C, 0x213F), (0x2145, 0x2149), (0x214E, 0x214E), (0x2183, 0x2184), (0x2C00, 0x2C7B),
        (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B),
        (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF), (0xFB00, 0xFB06),
        (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3),
        (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF), (0x1E900, 0x1E943)))
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

# tokenizer.ggml.pre -> (split patterns, ignore_merges), grouped as llama.cpp groups them. Not here:
# names llama.cpp splits with hand-written code (kimi-k2, afmoe), and the SentencePiece-style BPE
# ones that skip byte encoding (gemma4, granite-embed-multi-311m, sarvam-moe, whitespace).
_PRE: dict[str, tuple[list[str], bool]] = {}
for _names, _splits, _ignore in (
    ("default", _DEFAULT, False),
    ("gpt-2 phi-2 mpt olmo jais exaone4 jina-es jina-de jina-v2-es jina-v2-de gigachat a.x-4.0 mellum "
     "trillion granite-docling modern-bert jina-v1-en jina-v2-code roberta-bpe", [_GPT2], False),
    ("smollm starcoder refact command-r codeshell exaone minerva-7b mellum2", [r"\p{N}", _GPT2], False),
    ("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", [_LLAMA3], True),
    ("dbrx smaug-bpe glm4 chatglm-bpe", [_LLAMA3], False),
    ("jais-2", [_JAIS2], False),
    ("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2", [_QWEN2], False),
    ("qwen35", [_QWEN35], False),
    ("minicpm5", [r"\p{N}{1,3}", _MINICPM5], True),
    ("tekken", [_TEKKEN], True),
    ("gpt-4o llama4 kanana2 talkie minimax-m2", [_GPT4O], False),
    ("granite-embed-multi-97m", [_GPT4O], True),
    ("tiny_aya cohere2moe", [r"\d{1,3}(?=(?:\d{3})*\b)", _GPT4O], False),
    ("falcon", [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"], False),
    ("deepseek-llm", ["[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+", "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f"
                      "\u3000-\u3002]+", r"\s+$", _DEEPSEEK_CJK, r"\p{N}+"], False),
    ("deepseek-coder", ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"], False),
    ("deepseek-v3 hunyuan-dense joyai-llm hy_v4", [r"\p{N}{1,3}", _CJK, _DEEPSEEK3_WORDS], False),
    ("spark2_5", [r"\p{N}{1,3}", _CJK, _SPARK_WORDS, r"\p{N}"], False),
    ("youtu", _YOUTU, True),
    ("poro-chat bloom gpt3-finnish", [_PORO], False),
    ("viking", [_PORO, r"\p{N}"], False),
    ("chameleon", [r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
                   r"[\p{P}!-/:-@\[-`{-~]", _GPT2], False),
    ("bailingmoe bailingmoe2 llada-moe", [r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                                         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"], False),
    ("seed-coder", [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                    r"|\s+(?!\S)|\s+"], False),
    ("ufakzeka", [r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"], False),
    ("laguna", [r"[^\n]+|[\n]+", _QWEN2], False),
    ("exaone-moe", [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"], False),
    ("superbpe", [r"\p{N}+", r"(?=(\d{3})+(?!\d))"], False),
):
    for _name in _names.split():
        _PRE[_name] = (_splits, _ignore)

# llama.cpp adds BOS for these even when the file does not say (llama-vocab.cpp).
_ADD_BOS_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                "jina-v5-nano", "tekken", "chameleon"}
# Pre-tokenizer names whose original tokenizer.json normalizes to NFC first (Qwen's).
_NFC_PRE = {"qwen2", "deepseek-r1-qwen", "qwen35"}
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


def _bpe(source: str, **kwargs: Any) -> Tokenizer:
    try:
        return Tokenizer(models.BPE(**kwargs))
    except Exception as e:  # tokenizers raises plain Exception for e.g. a merge naming no token
        raise UserError(f"{source}: cannot rebuild the tokenizer from the GGUF vocabulary ({e})") from None


def _add_special_tokens(tok: Tokenizer, meta: dict[str, Any], tokens: list[str]) -> None:
    # Control (and unknown) tokens become special added tokens, user-defined ones plain added
    # tokens: llama.cpp matches all of them whole in the text, and the original tokenizer.json
    # marks only the former special, so skip_special_tokens keeps e.g. <tool_call> or <think>.
    types = meta.get("tokenizer.ggml.token_type") or []
    # llama.cpp (llama-vocab.cpp) strips the whitespace after Phi-3's special tokens, keyed on the
    # model's name: every control/user-defined/unknown token and </s>, but not <unk>, <s>, <|endoftext|>.
    name = str(meta.get("general.name") or "").lower()
    phi3 = "phi-3" in name or "phi3" in name

    def rstrip(text: str) -> bool:
        return phi3 and text not in ("<unk>", "<s>", "<|endoftext|>")

    for wanted, add in (((_CONTROL, _UNKNOWN), tok.add_special_tokens), ((_USER_DEFINED,), tok.add_tokens)):
        add([AddedToken(tokens[i], special=wanted[0] == _CONTROL, normalized=False, rstrip=rstrip(tokens[i]))
             for i, t in enumerate(types) if t in wanted])
    if phi3 and "</s>" in tokens and types and types[tokens.index("</s>")] not in (_CONTROL, _UNKNOWN, _USER_DEFINED):
        tok.add_special_tokens([AddedToken("</s>", special=True, normalized=False, rstrip=True)])


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    # A SentencePiece vocabulary has no merges: llama.cpp merges the adjacent pair whose union
    # scores highest. BPE merges ranked by the merged piece's score reproduce that order.
    normal = {tok: i for i, tok in enumerate(tokens) if not types or types[i] == _NORMAL}
    merges = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-scores[i], normal[left], normal[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def _post_processor(meta: dict[str, Any], tokens: list[str], add_bos: bool, add_eos: bool):
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    before = [(tokens[bos_id], bos_id)] if add_bos and bos_id is not None else []
    after = [(tokens[eos_id], eos_id)] if add_eos and eos_id is not None else []
    if not before and not after:
        return None

    def seq(part: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t, _ in [*before, (part, None), *after]]

    return processors.TemplateProcessing(single=seq("$A", 0), pair=seq("$A", 0) + seq("$B", 1),
                                         special_tokens=list(dict.fromkeys(before + after)))


def _merges(raw: list, vocab: dict[str, int], source: str) -> list[tuple[str, str]]:
    """'left right' strings -> pairs; each part and their join must be in the vocabulary."""
    out = []
    for i, m in enumerate(raw):
        pair = m.split(" ", 1) if isinstance(m, str) else []
        if len(pair) != 2 or not all(pair) or any(p not in vocab for p in pair) or pair[0] + pair[1] not in vocab:
            raise UserError(f"{source}: tokenizer.ggml.merges[{i}] = {m!r} is not two vocabulary tokens "
                            "separated by one space whose join is also a token")
        out.append((pair[0], pair[1]))
    return out


def build_tokenizer(meta: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config dict) from a GGUF's `tokenizer.*` metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{source}: the GGUF file carries no tokenizer vocabulary")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a few vocabularies repeat a string; the first id wins
    merges = _merges(meta.get("tokenizer.ggml.merges") or [], vocab, source)
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if pre not in _PRE:
            raise UserError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported "
                            f"(supported: {', '.join(sorted(_PRE))})")
        splits, ignore_merges = _PRE[pre]
        tok = _bpe(source, vocab=vocab, merges=merges, ignore_merges=ignore_merges)
        if pre in _NFC_PRE:
            tok.normalizer = normalizers.NFC()  # as Qwen's own tokenizer.json; llama.cpp skips it
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        add_bos = pre in _ADD_BOS_PRE if add_bos is None else bool(add_bos)
    elif kind == "llama":
        types = meta.get("tokenizer.ggml.token_type") or []
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
        tok = _bpe(source, vocab=vocab, merges=merges or _spm_merges(tokens, scores, types), unk_token=unk,
                   fuse_unk=True, byte_fallback=True)
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        # As SentencePiece, llama.cpp and Llama-2's tokenizer.json: "▁" goes before every text
        # stretch, even one that starts with a space or follows a special token (Metaspace would not).
        spaces = normalizers.Replace(" ", "\u2581")
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if prefix else spaces
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        add_bos = True if add_bos is None else bool(add_bos)  # llama.cpp's default for SentencePiece
    else:
        raise UserError(f"{source}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    _add_special_tokens(tok, meta, tokens)
    post = _post_processor(meta, tokens, add_bos, add_eos)
    if post is not None:
        tok.post_processor = post
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok.to_str(), config

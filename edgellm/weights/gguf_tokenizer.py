"""Rebuild a Hugging Face `tokenizers` tokenizer from the vocabulary a GGUF file carries."""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from edgellm.errors import UserError

# Split patterns as the original tokenizer.json files write them; llama.cpp's llama-vocab.cpp
# spells the same patterns without inline flags. Applied one after another, each splitting
# the pieces the previous one left, as llama.cpp does.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_WORD_UP = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_WORD_LO = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_REST = r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LOWER_WORD, _UPPER_WORD = _WORD_UP + "*" + _WORD_LO + "+", _WORD_UP + "+" + _WORD_LO + "*"
_TEKKEN = _LOWER_WORD + "|" + _UPPER_WORD + r"|\p{N}|" + _REST
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = _LOWER_WORD + _CONTRACTION + "|" + _UPPER_WORD + _CONTRACTION + r"|\p{N}{1,3}|" + _REST
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

# tokenizer.ggml.pre -> (split patterns, ignore_merges), grouped as llama.cpp groups them.
_PRE: dict[str, tuple[list[str], bool]] = {}
for _names, _splits, _ignore in (
    ("default", _DEFAULT, False),
    ("gpt-2 phi-2 mpt olmo jais exaone4 jina-es jina-de jina-v2-es jina-v2-de gigachat a.x-4.0 mellum "
     "trillion granite-docling", [_GPT2], False),
    ("smollm starcoder refact command-r codeshell exaone minerva-7b", [r"\p{N}", _GPT2], False),
    ("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", [_LLAMA3], True),
    ("dbrx smaug-bpe glm4 chatglm-bpe", [_LLAMA3], False),
    ("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan", [_QWEN2], False),
    ("tekken", [_TEKKEN], True),
    ("gpt-4o llama4 kanana2 talkie minimax-m2", [_GPT4O], False),
):
    for _name in _names.split():
        _PRE[_name] = (_splits, _ignore)

# llama.cpp adds BOS for these even when the file does not say (llama-vocab.cpp).
_ADD_BOS_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                "jina-v5-nano", "tekken"}
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
    for wanted, add in (((_CONTROL, _UNKNOWN), tok.add_special_tokens), ((_USER_DEFINED,), tok.add_tokens)):
        add([AddedToken(tokens[i], special=wanted[0] == _CONTROL, normalized=False)
             for i, t in enumerate(types) if t in wanted])


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
        if pre in ("qwen2", "deepseek-r1-qwen"):
            tok.normalizer = normalizers.NFC()  # as Qwen2's own tokenizer.json; llama.cpp skips it
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

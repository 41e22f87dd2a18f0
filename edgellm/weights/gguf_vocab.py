"""A model directory's tokenizer.json as GGUF `tokenizer.*` metadata (the reverse of gguf_tokenizer).

Byte-level BPE vocabularies become llama.cpp's "gpt2" model with the pre-tokenizer name whose
split patterns reproduce the tokenizer's own pre-tokenization; SentencePiece-style BPE (byte
fallback, "▁" for spaces) becomes its "llama" model, with merge ranks turned into scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import TokenType
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

from edgellm.config import ChatConfig
from edgellm.errors import UserError
from edgellm.weights.gguf_tokenizer import _NFC_PRE, _PRE, build_tokenizer

# Texts that tell llama.cpp's pre-tokenizers apart: digits in runs, contractions, case changes,
# whitespace runs and line ends, CJK, Hangul, combining marks, punctuation runs, emoji.
PROBES = [
    "Hello World! It's 2024: we'll pay $1,234,567.89 (USD) for 12 apples, don't we? I'M sure.",
    "  leading spaces\tand tabs\r\n\r\nwindows lines\n\n\ntrailing   ",
    "def f(x):\n    return x**2 // 3  # comment\n",
    "我爱自然语言处理。今天天气很好！ 안녕하세요 세계 こんにちは、世界。カタカナ",
    "café naïve ünïcödé Ελληνικά русский язык नमस्ते दुनिया à̀ e\u0301",
    "CamelCaseWord HTTPServer iPhone ABCdef 'S 'LL ''quoted''",
    "emoji 😀🎉👍🏽 <tag>/path/to?q=1&r=two#frag ... !!! ??? ---",
]
_NAMES_PREFERRED = ("gpt-2", "smollm", "llama-bpe", "qwen2", "qwen35", "gpt-4o", "tekken", "dbrx")


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _load(model_dir: Path) -> tuple[Tokenizer, dict, dict]:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json; GGUF export needs it")
    data = json.loads(path.read_text(encoding="utf-8"))
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    return Tokenizer.from_str(json.dumps(data)), data, config


def _is_byte_level(data: dict) -> bool:
    text = json.dumps({k: data.get(k) for k in ("pre_tokenizer", "decoder")})
    return '"ByteLevel"' in text


def _pieces(pre: Any, norm: Any, text: str) -> list[str]:
    if norm is not None:
        text = norm.normalize_str(text)
    return [p for p, _ in pre.pre_tokenize_str(text)] if pre is not None else [text]


def _detect_pre(tok: Tokenizer, data: dict) -> str:
    """The llama.cpp pre-tokenizer name whose patterns split the probes as this tokenizer does."""
    ignore = bool(data["model"].get("ignore_merges", False))
    want = [_pieces(tok.pre_tokenizer, tok.normalizer, t) for t in PROBES]
    seen: set[tuple] = set()
    names = list(_NAMES_PREFERRED) + [n for n in _PRE if n not in _NAMES_PREFERRED and n != "default"] + ["default"]
    for name in names:
        splits, ignore_merges = _PRE[name]
        key = (tuple(splits), ignore_merges, name in _NFC_PRE)
        if key in seen or ignore_merges != ignore:
            continue
        seen.add(key)
        try:
            pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
                                          + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        except Exception:  # a pattern this build of tokenizers' regex engine cannot compile
            continue
        norm = normalizers.NFC() if name in _NFC_PRE else None
        if all(_pieces(pre, norm, t) == w for t, w in zip(PROBES, want)):
            return name
    raise UserError("the tokenizer's pre-tokenizer splits text like none of llama.cpp's, so llama.cpp would "
                    f"tokenize differently (supported pre-tokenizers: {', '.join(sorted(_PRE))})")


def tokenizer_metadata(model_dir: Path, cfg: ChatConfig, vocab_size: int) -> dict[str, Any]:
    """GGUF `tokenizer.*` keys -> values for the directory's tokenizer, padded to `vocab_size` ids."""
    tok, data, config = _load(model_dir)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer model {model.get('type')!r} cannot be written to GGUF "
                        "(supported: byte-level BPE, SentencePiece-style BPE with byte fallback)")
    vocab = tok.get_vocab(with_added_tokens=True)
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [int(TokenType.UNUSED)] * n
    for text, i in vocab.items():
        tokens[i], types[i] = text, int(TokenType.NORMAL)
    for added in data.get("added_tokens") or []:
        types[added["id"]] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)

    def token_id(key: str) -> int | None:
        text = _token_text(config.get(key))
        return tok.token_to_id(text) if text else None

    meta: dict[str, Any] = {"tokenizer.ggml.tokens": tokens}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    byte_level = _is_byte_level(data)
    if byte_level:
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = _detect_pre(tok, data)
        meta["tokenizer.ggml.merges"] = merges
    elif model.get("byte_fallback"):
        meta["tokenizer.ggml.model"] = "llama"
        # llama.cpp merges the adjacent pair whose union scores highest: a merge's rank, negated,
        # keeps the tokenizer's merge order. Pieces no merge makes score below every merge.
        scores = [-float(len(merges) + 1)] * n
        for rank, merge in enumerate(merges):
            i = vocab.get(merge.replace(" ", ""))
            if i is not None and scores[i] < -float(rank):
                scores[i] = -float(rank)
        for text, i in vocab.items():
            if types[i] == TokenType.NORMAL and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[i] = int(TokenType.BYTE)
        unk = model.get("unk_token")
        if unk is not None and unk in vocab:
            types[vocab[unk]] = int(TokenType.UNKNOWN)
            meta["tokenizer.ggml.unknown_token_id"] = vocab[unk]
        meta["tokenizer.ggml.scores"] = scores
        first = tok.encode("a", add_special_tokens=False).tokens
        meta["tokenizer.ggml.add_space_prefix"] = bool(first) and first[0].startswith("\u2581")
    else:
        raise UserError("tokenizer.json is neither byte-level BPE nor SentencePiece-style BPE with byte "
                        "fallback; it cannot be written to GGUF")
    meta["tokenizer.ggml.token_type"] = types

    eos_ids = [i for i in [token_id("eos_token"), *cfg.eos_ids] if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids))
    bos = token_id("bos_token")
    if bos is None and cfg.bos_token_id is not None and cfg.bos_token_id < n:
        bos = cfg.bos_token_id
    ids = {"bos_token_id": bos, "eos_token_id": eos_ids[0] if eos_ids else None,
           "eot_token_id": eos_ids[1] if len(eos_ids) > 1 else None,
           "eom_token_id": eos_ids[2] if len(eos_ids) > 2 else None,
           "padding_token_id": token_id("pad_token"), "unknown_token_id": token_id("unk_token")}
    for key, value in ids.items():
        if value is not None:
            meta[f"tokenizer.ggml.{key}"] = int(value)
    probe = tok.encode("a", add_special_tokens=True).ids
    meta["tokenizer.ggml.add_bos_token"] = bos is not None and (
        bool(config.get("add_bos_token")) or (bool(probe) and probe[0] == bos))
    eos = ids["eos_token_id"]
    meta["tokenizer.ggml.add_eos_token"] = eos is not None and (
        bool(config.get("add_eos_token")) or (len(probe) > 1 and probe[-1] == eos))
    template = config.get("chat_template")
    if template:
        meta["tokenizer.chat_template"] = template
    return meta


def check_round_trip(meta: dict[str, Any], model_dir: Path, name: str) -> list[str]:
    """Probe texts whose ids differ between the directory's tokenizer and the GGUF's rebuilt one."""
    tok, _, _ = _load(model_dir)
    rebuilt_json, _ = build_tokenizer({**meta, "general.name": name}, str(model_dir))
    rebuilt = Tokenizer.from_str(rebuilt_json)
    return [t for t in PROBES if tok.encode(t, add_special_tokens=False).ids
            != rebuilt.encode(t, add_special_tokens=False).ids]

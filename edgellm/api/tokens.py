"""A token's exact bytes, for logprob `bytes` fields (its decoded text alone may be a lone U+FFFD)."""

from __future__ import annotations

import json
import re

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class TokenBytes:
    """Maps token ids to the bytes they add to the output (built once per tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
        self.byte_level = _byte_level_table() if "ByteLevel" in kinds else None
        self.special = set(getattr(tokenizer.backend, "get_added_tokens_decoder", dict)())

    def __call__(self, tid: int) -> bytes:
        piece = self.tokenizer.id_to_token(tid) or ""
        if self.byte_level is not None and tid not in self.special and all(c in self.byte_level for c in piece):
            return bytes(self.byte_level[c] for c in piece)
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return self.tokenizer.decode([tid], skip_special_tokens=False).encode()

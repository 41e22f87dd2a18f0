"""Incremental detokenization and stop-string matching for streamed generation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from tokenizers import Tokenizer as RawTokenizer
from tokenizers.decoders import DecodeStream

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class StreamDecoder:
    """Turns generated token ids into text deltas, one token at a time.

    The concatenation of every `put` result and the final `flush` equals
    ``tokenizer.decode(all_ids, skip_special_tokens)``. A delta never ends inside a multi-byte
    character: while the decoded tail ends in U+FFFD (an unfinished UTF-8 sequence, from byte-level
    BPE or from <0x..> byte-fallback tokens), the text is held back. Only a small window is decoded
    per token: the ids from the previous emission point (`prefix_offset`) on, compared with the text
    of the ids up to the last emission (`read_offset`), so the cost does not grow with the length.
    With a `tokenizers` tokenizer (edgellm's Tokenizer) that window is decoded by `tokenizers`' own
    DecodeStream (one decode per token, the prefix's text kept), the same rule; a step it refuses (a
    decoder whose text of the window does not extend the prefix's) hands the stream to the rule here.
    """

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        backend = getattr(tokenizer, "backend", None)
        self._backend = backend if isinstance(backend, RawTokenizer) else None
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if self._backend is not None else None

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def put(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", e.g. inside a multi-byte character)."""
        token_id = int(token_id)
        self.ids.append(token_id)
        if self._stream is not None:
            try:
                text = self._stream.step(self._backend, token_id)
            except Exception:  # its InvalidPrefix: the offsets below are still those of its last emission
                self._stream = None
            else:
                if text is None:
                    return ""
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                return text
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]

    def put_many(self, token_ids: Iterable[int]) -> str:
        """Add several tokens; return the text they complete."""
        return "".join(self.put(t) for t in token_ids)

    def flush(self) -> str:
        """Return whatever is held back (at the end of generation), even an unfinished character."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Cuts streamed text right before the first occurrence of any stop string.

    `feed` returns the text that is safe to emit now. A tail that could be the start of a stop
    string is held back until later text shows whether it is one, so a stop string is never emitted
    and is found even when it spans several deltas. After a stop, everything else is dropped.
    """

    def __init__(self, stop_strings: Iterable[str] | None = None):
        self.stop_strings: list[str] = [s for s in (stop_strings or ()) if s]
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self.held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        if not self.stop_strings:
            return delta, False
        text = self.held + delta
        cut = -1
        for stop in self.stop_strings:
            index = text.find(stop)
            if index != -1 and (cut == -1 or index < cut):
                cut, self.matched = index, stop
        if cut != -1:
            self.stopped = True
            self.held = ""
            return text[:cut], True
        keep = self._partial_tail(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    # Length of the longest tail of `text` that is a proper prefix of some stop string.
    def _partial_tail(self, text: str) -> int:
        for size in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self.stop_strings):
                return size
        return 0

    def flush(self) -> str:
        """At the end of generation without a stop: return the held-back text."""
        held, self.held = self.held, ""
        return "" if self.stopped else held

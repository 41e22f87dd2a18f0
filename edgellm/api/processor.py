"""The output processor: a request's token ids become text, cut at its stop strings.

It runs on the engine loop's thread right after each step (as `Request.consumer`), so a stop string
ends its choice before the next step; what it produces goes to the caller's `sink` (a queue).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgellm.engine.request import Request, SeqOutput
from edgellm.tokenizer.streamer import StopMatcher, StreamDecoder

_REPLACEMENT = "\ufffd"


@dataclass
class TokenOutput:
    """What one choice produced in one step, as text."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top": [(id, lp), ...]}
    finish_reason: str | None = None


class OutputProcessor:
    def __init__(self, tokenizer, stop: list[str], n: int, sink: Callable[[list[TokenOutput]], None],
                 buffered: bool = False):
        self.decoders = [StreamDecoder(tokenizer) for _ in range(n)]
        self.stoppers = [StopMatcher(stop) for _ in range(n)]
        self.sink = sink
        # A non-streaming caller needs nothing before the end: hand it everything at once instead of waking
        # its thread (and taking the GIL from the engine) for every token.
        self.buffered = buffered
        self._held: list[TokenOutput] = []
        self._open = n

    def __call__(self, req: Request, outs: list[SeqOutput]) -> list[int]:
        """Text for a step's outputs, handed to the sink; returns the choices a stop string ended."""
        stops: list[int] = []
        texts: list[TokenOutput] = []
        for o in outs:
            decoder, stopper = self.decoders[o.index], self.stoppers[o.index]
            finish, text = o.finish_reason, ""
            infos = []  # logprob entries of the tokens that made text (never a stop token's)
            for k, tok in enumerate(o.token_ids):
                if finish == "stop" and req.is_stop_token(tok):
                    continue  # a stop token is not text
                if o.logprobs and k < len(o.logprobs):
                    infos.append(o.logprobs[k])
                piece, stopped = stopper.feed(decoder.put(tok))
                text += piece
                if stopped:
                    finish = "stop"
                    if o.finish_reason is None:
                        stops.append(o.index)
                    break
            if finish not in (None, "abort") and not stopper.stopped:  # release held-back text
                tail = decoder.flush()
                if finish == "length":  # cut mid-character: drop the unfinished bytes, not a U+FFFD
                    tail = tail.rstrip(_REPLACEMENT)
                text += stopper.feed(tail)[0]
                if not stopper.stopped:
                    text += stopper.flush()
            texts.append(TokenOutput(o.index, o.token_ids, text, infos or None, finish))
            self._open -= finish is not None
        if self.buffered:
            self._held.extend(texts)
            if self._open > 0:
                return stops
            texts, self._held = self._held, []
        self.sink(texts)
        return stops

"""A chat session: conversation history, generation settings and MLC-LLM's special commands."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from edgellm.errors import BadRequestError, UserError

HELP = """You can use the following special commands:
  /help               print the special commands
  /exit               quit the cli
  /stats              print out stats of last request (token/sec)
  /metrics            print out full engine metrics
  /reset              restart a fresh chat
  /set [overrides]    override settings in the generation config. For example,
                      `/set temperature=0.5;top_p=0.8;seed=23;max_tokens=100;stop=str1,str2`
                      Note: Separate stop words in the `stop` option with commas (,).
                      `/set lora=NAME` answers with a loaded LoRA adapter (`lora=none`: the base model)
  Multi-line input: Use escape+enter to start a new line."""

# /set key -> parser of its value
_FLOAT = float


def _int(v: str) -> int:
    return int(v)


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(v)


def _stop(v: str) -> list[str]:
    return [s for s in v.split(",") if s]


SETTABLE: dict[str, Callable[[str], object]] = {
    "temperature": _FLOAT, "top_p": _FLOAT, "top_k": _int, "min_p": _FLOAT,
    "frequency_penalty": _FLOAT, "presence_penalty": _FLOAT, "repetition_penalty": _FLOAT,
    "seed": _int, "max_tokens": _int, "stop": _stop, "ignore_eos": _bool, "lora": str,
}


@dataclass
class ChatSession:
    """Drives an Engine for one conversation; `send()` streams a reply as text pieces."""

    engine: object
    settings: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    last_usage: object = None
    truncated: bool = False  # turns were dropped to fit the context window (said once)
    notice: str | None = None  # set by send() when the caller should tell the user something

    def apply_set(self, text: str) -> dict:
        """Parse `/set k=v;k=v`; all pairs are checked before any is applied."""
        from edgellm.engine.options import parse_overrides

        updates: dict = {}
        for key, value in parse_overrides(text).items():
            if key not in SETTABLE:
                raise UserError(f"unknown setting {key!r}; settable: {', '.join(SETTABLE)}")
            try:
                updates[key] = SETTABLE[key](value)
            except ValueError:
                raise UserError(f"bad value for {key}: {value!r}") from None
        if not updates:
            raise UserError("nothing to set; example: /set temperature=0.5;top_p=0.8")
        lora = updates.get("lora")
        if lora is not None and lora.lower() not in ("none", "base"):
            loaded = self.engine.lora_adapters
            if lora not in loaded:
                raise UserError(f"LoRA adapter {lora!r} is not loaded (loaded: {', '.join(loaded) or 'none'}; "
                                "start the chat with --lora NAME=DIR)")
        from edgellm.api import protocol as P

        try:  # validate with the same rules as a request, without running one
            P.parse_request(P.ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}],
                                                      **self.settings, **updates})
        except BadRequestError as e:
            raise UserError(str(e)) from None
        self.settings.update(updates)
        if lora is not None and lora.lower() in ("none", "base"):
            del self.settings["lora"]  # back to the base model
        return updates

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to `text`. A reply cut short (Ctrl-C) stays in the history as far as it got;
        a request that fails (e.g. over the context window) leaves the history unchanged."""
        self.history.append({"role": "user", "content": text})
        self._fit_window()
        try:
            stream = self.engine.chat.completions.create(
                messages=self.history, stream=True, stream_options={"include_usage": True}, **self.settings)
        except BaseException:
            self.history.pop()
            raise
        reply: list[str] = []
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    self.last_usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        reply.append(choice.delta.content)
                        yield choice.delta.content
        except (KeyboardInterrupt, GeneratorExit):
            stream.close()  # aborts the request and frees its KV cache
            self.history.append({"role": "assistant", "content": "".join(reply)})
            raise
        except BaseException:
            stream.close()
            self.history.pop()
            raise
        self.history.append({"role": "assistant", "content": "".join(reply)})

    def _fit_window(self) -> None:
        """Drop the oldest whole turns when the history outgrows the context window (the kept turns
        stay dropped: the remaining prefix is stable, so its cached KV is reused next turns)."""
        fit = getattr(self.engine, "fit_history", None)
        if fit is None:
            return
        kept, dropped = fit(self.history, self.settings.get("max_tokens"))
        if dropped:
            self.history[:] = kept
            if not self.truncated:
                self.truncated = True
                self.notice = (f"[the conversation outgrew the {self.engine.context_window}-token context window: "
                               "the oldest turns are dropped from now on]")

    def stats(self) -> str:
        if self.last_usage is None:
            return "no request has finished yet"
        extra = self.last_usage.extra or {}
        return (f"prefill: {extra.get('prefill_tokens_per_s', 0.0):.1f} tok/s, "
                f"decode: {extra.get('decode_tokens_per_s', 0.0):.1f} tok/s"
                + (f", speculative: {int(extra['accepted_draft_tokens'])}/{int(extra['draft_tokens'])} drafted "
                   f"tokens accepted ({extra['acceptance_rate']:.0%})" if extra.get("draft_tokens") else ""))

    def metrics(self) -> str:
        return json.dumps(self.engine.metrics(), indent=2)

    def reset(self) -> None:
        self.history.clear()
        self.truncated = False
        self.engine.reset()

    def command(self, line: str) -> str | None:
        """Run a special command; returns text to print, or None for /exit."""
        cmd, _, rest = line.strip().partition(" ")
        if cmd == "/exit":
            return None
        if cmd == "/help":
            return HELP
        if cmd == "/stats":
            return self.stats()
        if cmd == "/metrics":
            return self.metrics()
        if cmd == "/reset":
            self.reset()
            return "chat history cleared"
        if cmd == "/set":
            try:
                updates = self.apply_set(rest)
            except UserError as e:
                return f"error: {e} (nothing changed)"
            return "set " + ", ".join(f"{k}={v}" for k, v in updates.items())
        return f"unknown command {cmd!r}; type /help for the list"

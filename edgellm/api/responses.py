"""Assemble OpenAI-shaped responses and stream chunks from the engine's token outputs."""

from __future__ import annotations

from edgellm.api import protocol as P
from edgellm.api.processor import TokenOutput
from edgellm.engine.request import Request


class ChoiceState:
    def __init__(self) -> None:
        self.text = ""
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[dict] = []


class ResponseBuilder:
    """Accumulates outputs of one request and renders them as chat or text completion objects."""

    def __init__(self, kind: str, request_id: str, model: str, n: int, tokenizer,
                 echo_text: str = "", include_usage: bool = False, tokens_as_ids: bool = False):
        self.kind, self.id, self.model, self.tokenizer = kind, request_id, model, tokenizer
        self.choices = [ChoiceState() for _ in range(n)]
        self.echo_text = echo_text
        self.include_usage = include_usage
        self.sent_role = [False] * n
        self.tokens_as_ids = tokens_as_ids

    @property
    def done(self) -> bool:
        """Every choice has reported its finish reason (so no output is still in flight)."""
        return all(c.finish_reason is not None for c in self.choices)

    def add(self, outs: list[TokenOutput]) -> None:
        for o in outs:
            c = self.choices[o.index]
            c.text += o.text
            c.token_ids.extend(o.token_ids)
            if o.logprobs:
                c.logprobs.extend(o.logprobs)
            if o.finish_reason:
                c.finish_reason = o.finish_reason

    # ---- logprobs ------------------------------------------------------------------------
    def _token_str(self, tid: int) -> str:
        if self.tokens_as_ids:
            return f"token_id:{tid}"
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def _chat_logprobs(self, infos: list[dict] | None) -> P.ChoiceLogprobs | None:
        if not infos:
            return None
        content = []
        for info in infos:
            tok = self._token_str(info["token_id"])
            tops = [P.TopLogprob(token=self._token_str(t), logprob=lp, bytes=list(self._token_str(t).encode()))
                    for t, lp in info["top"]]
            content.append(P.TokenLogprob(token=tok, logprob=info["logprob"], bytes=list(tok.encode()),
                                          top_logprobs=tops))
        return P.ChoiceLogprobs(content=content)

    def _completion_logprobs(self, infos: list[dict] | None, offset: int) -> P.CompletionLogprobs | None:
        if not infos:
            return None
        out = P.CompletionLogprobs()
        for info in infos:
            tok = self._token_str(info["token_id"])
            out.tokens.append(tok)
            out.token_logprobs.append(info["logprob"])
            out.top_logprobs.append({self._token_str(t): lp for t, lp in info["top"]} or None)
            out.text_offset.append(offset)
            offset += len(tok)
        return out

    # ---- whole responses --------------------------------------------------------------------
    def usage(self, req: Request) -> P.Usage:
        u = req.usage()
        names = ("draft_tokens", "accepted_draft_tokens", "acceptance_rate")
        spec = {k: u[k] for k in names} if u["draft_tokens"] else {}  # only when the engine speculated
        return P.Usage(prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                       total_tokens=u["total_tokens"],
                       prompt_tokens_details=P.PromptTokensDetails(cached_tokens=u["cached_tokens"]),
                       extra={"prefill_tokens_per_s": u["prefill_tokens_per_s"],
                              "decode_tokens_per_s": u["decode_tokens_per_s"], "ttft_s": u["ttft_s"],
                              **spec})

    def final(self, req: Request):
        usage = self.usage(req)
        if self.kind == "chat":
            return P.ChatCompletionResponse(id=self.id, model=self.model, usage=usage, choices=[
                P.ChatCompletionResponseChoice(index=i, message=P.ChatCompletionMessage(content=c.text),
                                               finish_reason=c.finish_reason,
                                               logprobs=self._chat_logprobs(c.logprobs))
                for i, c in enumerate(self.choices)])
        return P.CompletionResponse(id=self.id, model=self.model, usage=usage, choices=[
            P.CompletionChoice(index=i, text=self.echo_text + c.text, finish_reason=c.finish_reason,
                               logprobs=self._completion_logprobs(c.logprobs, len(self.echo_text)))
            for i, c in enumerate(self.choices)])

    # ---- streaming ------------------------------------------------------------------------
    def chunks(self, outs: list[TokenOutput]) -> list:
        """Stream chunks for one batch of outputs (one chunk per choice that has something)."""
        self.add(outs)
        result = []
        for o in outs:
            if not o.text and not o.finish_reason and not o.logprobs:
                continue
            if self.kind == "chat":
                delta = P.DeltaMessage(content=o.text)
                if not self.sent_role[o.index]:
                    delta.role = "assistant"
                    self.sent_role[o.index] = True
                choice = P.ChatCompletionStreamChoice(index=o.index, delta=delta, finish_reason=o.finish_reason,
                                                      logprobs=self._chat_logprobs(o.logprobs))
                result.append(P.ChatCompletionStreamResponse(id=self.id, model=self.model, choices=[choice]))
            else:
                choice = P.CompletionChoice(index=o.index, text=o.text, finish_reason=o.finish_reason,
                                            logprobs=self._completion_logprobs(o.logprobs, 0))
                result.append(P.CompletionResponse(id=self.id, model=self.model, choices=[choice]))
        return result

    def first_chunks(self) -> list:
        """Completions with echo stream the prompt first; chat streams nothing up front."""
        if self.kind != "chat" and self.echo_text:
            return [P.CompletionResponse(id=self.id, model=self.model, choices=[
                P.CompletionChoice(index=i, text=self.echo_text) for i in range(len(self.choices))])]
        return []

    def usage_chunk(self, req: Request):
        if self.kind == "chat":
            return P.ChatCompletionStreamResponse(id=self.id, model=self.model, choices=[], usage=self.usage(req))
        return P.CompletionResponse(id=self.id, model=self.model, choices=[], usage=self.usage(req))

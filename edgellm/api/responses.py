"""Assemble OpenAI-shaped responses and stream chunks from the engine's token outputs."""

from __future__ import annotations

from edgellm.api import protocol as P
from edgellm.api.processor import TokenOutput
from edgellm.api.tool_stream import ToolCallStream
from edgellm.api.tools import parse_tool_calls
from edgellm.engine.request import Request


class ChoiceState:
    def __init__(self) -> None:
        self.text = ""
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[dict] = []
        # tool mode (streaming): the incremental tool-call parser, and logprob entries not sent yet
        self.stream: ToolCallStream | None = None
        self.held_logprobs: list[dict] = []


class ResponseBuilder:
    """Accumulates outputs of one request and renders them as chat or text completion objects."""

    def __init__(self, kind: str, request_id: str, model: str, n: int, tokenizer,
                 echo_text: str = "", include_usage: bool = False, tokens_as_ids: bool = False, token_bytes=None,
                 tools: list[dict] | None = None, parallel_tool_calls: bool = True):
        self.kind, self.id, self.model, self.tokenizer = kind, request_id, model, tokenizer
        self.choices = [ChoiceState() for _ in range(n)]
        self.echo_text = echo_text
        self.include_usage = include_usage
        self.tokens_as_ids = tokens_as_ids
        self.token_bytes = token_bytes  # TokenBytes: a token's exact bytes
        self.tools = tools  # the tools a chat reply may call (parsed out of its text), or None
        self.parallel_tool_calls = parallel_tool_calls  # False: only a reply's first call counts

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
    def _bytes(self, tid: int) -> list[int]:
        return list(self.token_bytes(tid)) if self.token_bytes else list(self._token_str(tid).encode())

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
            tops = [P.TopLogprob(token=self._token_str(t), logprob=lp, bytes=self._bytes(t)) for t, lp in info["top"]]
            content.append(P.TokenLogprob(token=tok, logprob=info["logprob"], bytes=self._bytes(info["token_id"]),
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
            if info.get("logprob") is None:  # the first prompt token: nothing predicts it
                out.top_logprobs.append(None)
            else:  # the sampled token is always listed, as OpenAI and vLLM do (even with logprobs=0)
                out.top_logprobs.append({tok: info["logprob"], **{self._token_str(t): lp for t, lp in info["top"]}})
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
            choices = []
            for i, c in enumerate(self.choices):
                content, calls = self._parse(c.text) if self.tools else (c.text, [])
                message = P.ChatCompletionMessage(content=content, tool_calls=calls or None)
                choices.append(P.ChatCompletionResponseChoice(
                    index=i, message=message, finish_reason="tool_calls" if calls else c.finish_reason,
                    logprobs=self._chat_logprobs(c.logprobs)))
            return P.ChatCompletionResponse(id=self.id, model=self.model, usage=usage, choices=choices)
        prompt_infos = self.prompt_logprobs(req)
        return P.CompletionResponse(id=self.id, model=self.model, usage=usage, choices=[
            P.CompletionChoice(index=i, text=self.echo_text + c.text, finish_reason=c.finish_reason,
                               logprobs=self._completion_logprobs(prompt_infos + c.logprobs if c.logprobs or
                                                                  prompt_infos else None, 0))
            for i, c in enumerate(self.choices)])

    def prompt_logprobs(self, req: Request) -> list[dict]:
        """Echoed prompt tokens' logprob entries (the first with logprob None), when asked for."""
        if not (self.echo_text and req.params.prompt_logprobs):
            return []
        rows = req.sequences[0].prompt_logprobs
        return [{"token_id": req.prompt_ids[0], "logprob": None, "top": []}] + rows

    # ---- streaming ------------------------------------------------------------------------
    def chunks(self, outs: list[TokenOutput]) -> list:
        """Stream chunks for one batch of outputs: a choice's new text (with its logprobs), and when
        it finished a last chunk with an empty delta and the finish reason (as OpenAI frames it)."""
        self.add(outs)
        result = []
        for o in outs:
            if self.kind == "chat" and self.tools:
                result.extend(self._tool_mode_chunks(o))
                continue
            if o.text or o.logprobs:
                if self.kind == "chat":
                    result.append(self._chat_chunk(o.index, P.DeltaMessage(content=o.text), None,
                                                   self._chat_logprobs(o.logprobs)))
                else:
                    result.append(self._text_chunk(o.index, o.text, None,
                                                   self._completion_logprobs(o.logprobs, 0)))
            if o.finish_reason:
                if self.kind == "chat":
                    result.append(self._chat_chunk(o.index, P.DeltaMessage(), o.finish_reason))
                else:
                    result.append(self._text_chunk(o.index, "", o.finish_reason))
        return result

    def _parse(self, text: str) -> tuple[str | None, list[dict]]:
        content, calls = parse_tool_calls(text, self.tools)
        return content, calls if self.parallel_tool_calls else calls[:1]

    def _tool_mode_chunks(self, o: TokenOutput) -> list:
        """Chat streaming when tools are offered: text that may start a tool call is held until it is
        known; a call is sent as `delta.tool_calls` as soon as its name is complete (index, id, type,
        name), then its `arguments` string in the pieces the model writes (`api/tool_stream.py`)."""
        c = self.choices[o.index]
        if c.stream is None:
            c.stream = ToolCallStream(self.tools, self.parallel_tool_calls)
        c.held_logprobs += o.logprobs or []
        deltas = c.stream.feed(o.text)
        if o.finish_reason:
            deltas += c.stream.finish()
        out = []
        for d in deltas:
            logprobs = None
            if "content" in d:  # the logprobs of the tokens so far go with the content they made
                logprobs, c.held_logprobs = self._chat_logprobs(c.held_logprobs), []
            out.append(self._chat_chunk(o.index, P.DeltaMessage(**d), None, logprobs))
        if o.finish_reason:
            finish = "tool_calls" if c.stream.called else o.finish_reason
            out.append(self._chat_chunk(o.index, P.DeltaMessage(), finish))
        return out

    def _chat_chunk(self, index: int, delta: P.DeltaMessage, finish: str | None, logprobs=None):
        chunk = P.ChatCompletionStreamResponse(id=self.id, model=self.model, choices=[
            P.ChatCompletionStreamChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)])
        chunk._usage_null = self.include_usage
        return chunk

    def _text_chunk(self, index: int, text: str, finish: str | None, logprobs=None):
        chunk = P.CompletionResponse(id=self.id, model=self.model, choices=[
            P.CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)])
        chunk._usage_null = self.include_usage
        return chunk

    def first_chunks(self) -> list:
        """Chat streams open with the role (and empty content) per choice; completions with echo
        stream the prompt first."""
        if self.kind == "chat":
            return [self._chat_chunk(i, P.DeltaMessage(role="assistant", content=""), None)
                    for i in range(len(self.choices))]
        if self.echo_text:
            return [self._text_chunk(i, self.echo_text, None) for i in range(len(self.choices))]
        return []

    def usage_chunk(self, req: Request):
        if self.kind == "chat":
            return P.ChatCompletionStreamResponse(id=self.id, model=self.model, choices=[], usage=self.usage(req))
        return P.CompletionResponse(id=self.id, model=self.model, choices=[], usage=self.usage(req))

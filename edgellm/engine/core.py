"""The engine core: a plain, synchronous object; each `step()` is one forward pass.

    step: schedule -> run the model -> sample -> scheduler.update -> token outputs

It deals in token ids only: a choice finishes on a stop token id (or the model's end-of-turn ids),
at max_tokens, at the context window, or when its grammar terminates. Text -- detokenization and
stop strings -- is the frontend's (`edgellm.api`), which calls `finish` when a stop string appears.
Whoever owns the core drives it: `EngineLoop` on a thread for the API, `edgellm bench` and the tests
directly.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from edgellm.engine.kv_pool import KVPool
from edgellm.engine.metrics import EngineMetrics
from edgellm.engine.request import Request, SeqOutput, Sequence, Status
from edgellm.engine.sampler import Sampler
from edgellm.engine.scheduler import Scheduler
from edgellm.engine.speculative import Speculator

log = logging.getLogger("edgellm.engine")
StepOutputs = list[tuple[Request, list[SeqOutput]]]


class EngineCore:
    """Owns the requests in flight and steps them: `add`, `step`, `finish`, `abort`."""

    def __init__(self, runner, scheduler: Scheduler, sampler: Sampler, context_window: int,
                 metrics: EngineMetrics | None = None, model: Any = None, speculator: Speculator | None = None):
        self.runner, self.scheduler, self.sampler = runner, scheduler, sampler
        self.speculator = speculator  # drafts tokens for decoding sequences (speculative_mode), or None
        self.pool: KVPool = scheduler.pool
        self.context_window = context_window
        self.model = model  # the eager model (None when a compiled library runs in its place)
        self.metrics = metrics or EngineMetrics()
        self.requests: dict[str, Request] = {}
        self.lora = None  # the eager model's LoraSet (run-time LoRA adapters); None with a compiled library

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.metrics.inc("requests_total")
        self.metrics.inc("prompt_tokens_total", len(req.prompt_ids))
        self.scheduler.add(req.sequences[0])  # choices > 0 fork from it after its prefill

    def step(self) -> StepOutputs:
        """One forward pass over the scheduled batch; the token each ready sequence sampled."""
        chunks = self.scheduler.schedule()
        outputs: dict[int, tuple[Request, list[SeqOutput]]] = {}

        def emit(req: Request, outs: list[SeqOutput]) -> None:
            outputs.setdefault(id(req), (req, []))[1].extend(outs)

        for seq in self.scheduler.out_of_memory:  # reached the KV budget: finished with "length"
            self._finished(seq.request, "length")
            emit(seq.request, [SeqOutput(seq.index, [], None, "length")])
        if chunks and self.speculator is not None:
            self.speculator.propose(chunks, self.pool, self.context_window)
        if chunks:
            now = time.perf_counter()
            for c in chunks:
                if c.seq.t_prefill_start is None:
                    c.seq.t_prefill_start = now
            chunks, logits = self._run(chunks, emit)
        if chunks:
            self.metrics.inc("steps_total")
            self.metrics.inc("prefill_tokens_total", sum(c.length for c in chunks if c.length > 1 and not c.draft))
            verifying = {id(c.seq): c for c in chunks if c.draft}
            ready = self.scheduler.update(chunks)
            plain = [(s, r) for s, r in ready if id(s) not in verifying]
            if plain:
                seqs = [s for s, _ in plain]
                rows = [r for _, r in plain]
                # every row in order (a plain decode step): sample the logits as they are, no gathered copy
                whole = rows == list(range(logits.shape[0]))
                picked = logits if whole else logits[rows]
                argmax = getattr(self.runner, "argmax", None)  # the native step's own argmax of each row
                if argmax is not None and not whole:
                    argmax = [argmax[r] for r in rows]
                tokens, infos = self.sampler(picked, seqs, argmax=argmax)
                t = time.perf_counter()
                for seq, tok, info in zip(seqs, tokens, infos):
                    emit(seq.request, [self._append(seq, [tok], [info], t)])
            for seq, row in ready:
                c = verifying.get(id(seq))
                if c is not None:
                    emit(seq.request, [self._verify(c, logits[row:row + 1 + len(c.draft)])])
        return list(outputs.values())

    def _verify(self, c, logits: torch.Tensor) -> SeqOutput:
        """Accept the longest valid run of a chunk's draft (plus the target's own next token)."""
        seq, base_len = c.seq, c.seq.total_len
        tokens, accepted = self.speculator.verify(seq, c.draft, logits)
        seq.spec_drafted += len(c.draft)
        seq.spec_accepted += accepted
        self.metrics.inc("spec_draft_tokens_total", len(c.draft))
        self.metrics.inc("spec_accepted_tokens_total", accepted)
        # the accepted drafts' KV is in the cache; positions past it are overwritten later
        seq.num_computed = c.start + 1 + accepted
        self.pool.set_length(seq.slot, seq.num_computed)
        infos: list[dict | None] = [None] * len(tokens)
        if seq.params.logprobs:
            lp = torch.log_softmax(logits[:len(tokens)].float(), dim=-1)
            for i, tok in enumerate(tokens):
                infos[i] = {"token_id": tok, "logprob": float(lp[i, tok]), "top": []}
                if seq.params.top_logprobs:
                    vals, ids = lp[i].topk(seq.params.top_logprobs)
                    infos[i]["top"] = list(zip(ids.tolist(), vals.tolist()))
        out = self._append(seq, tokens, infos, time.perf_counter())
        self.speculator.synced(seq, base_len, len(c.draft), accepted)
        return out

    def _run(self, chunks: list, emit) -> tuple[list, torch.Tensor | None]:
        """The runner's step; if it fails, each request's chunks run alone so only the failing ones fail."""
        try:
            return chunks, self._runner_step(chunks)
        except Exception as e:
            requests = list(dict.fromkeys(c.seq.request for c in chunks))
            if len(requests) == 1:
                emit(requests[0], self.abort(requests[0], error=e))
                return [], None
        log.warning("a batched step failed; running its %d requests one by one", len(requests))
        kept, rows, argmax = [], [], []
        for req in requests:
            own = [c for c in chunks if c.seq.request is req]
            try:
                rows.append(self._runner_step(own))
                kept += own
                argmax.append(getattr(self.runner, "argmax", None))
            except Exception as e:
                log.warning("request %s failed: %s", req.request_id, e)
                emit(req, self.abort(req, error=e))
        if hasattr(self.runner, "argmax"):  # the concatenated rows' argmax (or none if any call lacked it)
            self.runner.argmax = None if None in argmax else [a for part in argmax for a in part]
        return kept, (torch.cat(rows) if rows else None)

    def _runner_step(self, chunks: list):
        logits = self.runner.step(chunks)
        for c, rows in getattr(self.runner, "prompt_logits", ()):  # requests with prompt_logprobs
            self._prompt_logprobs(c.seq, c.start, rows)
        return logits

    @staticmethod
    def _prompt_logprobs(seq: Sequence, start: int, rows) -> None:
        """Logprob entries of prompt tokens start+1.. from the rows at positions start.. (rows [n, vocab])."""
        lp = torch.log_softmax(rows, dim=-1)
        targets = torch.tensor(seq.prompt_ids[start + 1:start + 1 + rows.shape[0]], dtype=torch.long)
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        k = seq.params.top_logprobs
        tops = lp.topk(k, dim=-1) if k else None
        for i, (tok, val) in enumerate(zip(targets.tolist(), chosen)):
            if start + i < len(seq.prompt_logprobs):
                continue  # recomputed after a preemption
            top = list(zip(tops.indices[i].tolist(), tops.values[i].tolist())) if tops is not None else []
            seq.prompt_logprobs.append({"token_id": tok, "logprob": val, "top": top})

    def _append(self, seq: Sequence, tokens: list[int], infos: list[dict | None], t: float) -> SeqOutput:
        """Append tokens one by one, stopping at the first that finishes the choice."""
        req, p = seq.request, seq.request.params
        kept: list[int] = []
        finish = None
        for tok in tokens:
            if seq.t_first_token is None:
                seq.t_first_token = t
                if seq.index == 0:
                    self.metrics.observe("ttft", t - req.arrival)
            else:
                self.metrics.observe("itl", t - seq.t_last_token)
            seq.t_last_token = t
            seq.output_ids.append(tok)
            kept.append(tok)
            self.metrics.inc("generation_tokens_total")
            if seq.grammar_matcher is not None:
                seq.grammar_matcher.accept(tok)
            if req.is_stop_token(tok):
                finish = "stop"
            elif p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens:
                finish = "length"
            elif seq.total_len >= self.context_window:
                finish = "length"
            elif seq.grammar_matcher is not None and seq.grammar_matcher.is_terminated():
                finish = "stop"
            if finish is not None:
                self.finish(seq, finish)
                break
        kept_infos = [i for i in infos[:len(kept)] if i]
        return SeqOutput(seq.index, kept, kept_infos or None, finish)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End one choice (also the frontend's way to stop it on a stop string)."""
        if seq.status is Status.FINISHED:
            return
        self.scheduler.finish(seq, reason)
        self._finished(seq.request, reason)

    def _finished(self, req: Request, reason: str) -> None:
        if req.finished and self.requests.pop(req.request_id, None) is not None and reason != "abort":
            self.metrics.inc("requests_finished")
            self.metrics.observe("e2e", time.perf_counter() - req.arrival)
            usage = req.usage()
            self.metrics.last_prefill_tps = usage["prefill_tokens_per_s"] or self.metrics.last_prefill_tps
            self.metrics.last_decode_tps = usage["decode_tokens_per_s"] or self.metrics.last_decode_tps
            self.metrics.inc("cached_tokens_total", usage["cached_tokens"])

    def abort(self, req: Request, error: BaseException | None = None) -> list[SeqOutput]:
        """End every unfinished choice of `req` (cancelled, or failed with `error`); their final outputs."""
        if error is not None:
            req.error = error
            self.metrics.inc("requests_failed")
        elif req.request_id in self.requests:
            self.metrics.inc("requests_cancelled")
        req.cancelled = True
        outs = []
        for seq in req.sequences:
            if seq.status is not Status.FINISHED:
                self.finish(seq, "abort")
                outs.append(SeqOutput(seq.index, [], None, "abort"))
        self.requests.pop(req.request_id, None)
        return outs

    def gauges(self) -> dict:
        g = {"requests_running": len(self.scheduler.running), "requests_waiting": len(self.scheduler.waiting),
             "preemptions_total": self.scheduler.num_preempted}
        g.update(self.pool.stats())
        return g

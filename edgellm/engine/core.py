"""The engine loop: one background thread that schedules, runs the model and emits tokens.

API threads only enqueue requests and aborts; all model, cache and sequence state is touched
by the loop thread alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from edgellm.engine.kv_pool import KVPool
from edgellm.engine.metrics import EngineMetrics
from edgellm.engine.request import Request, Sequence, Status, TokenOutput
from edgellm.engine.runner import ModelRunner
from edgellm.engine.sampler import Sampler
from edgellm.engine.scheduler import ScheduledChunk, Scheduler
from edgellm.tokenizer.streamer import StopMatcher, StreamDecoder

log = logging.getLogger("edgellm.engine")


class EngineCore:
    def __init__(self, runner: ModelRunner, pool: KVPool, scheduler: Scheduler, sampler: Sampler,
                 tokenizer, context_window: int, metrics: EngineMetrics | None = None):
        self.runner, self.pool, self.scheduler, self.sampler = runner, pool, scheduler, sampler
        self.tokenizer, self.context_window = tokenizer, context_window
        self.metrics = metrics or EngineMetrics()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.requests: dict[str, Request] = {}
        self._wake = threading.Event()
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="edgellm-engine", daemon=True)
        self.thread.start()

    # ---- API side (any thread) ----------------------------------------------------------
    def add(self, request: Request) -> None:
        self.inbox.put(("add", request))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))
        self._wake.set()

    def call(self, fn):
        """Run fn() on the engine thread (e.g. reset caches) and return its result."""
        done = threading.Event()
        box: dict = {}
        self.inbox.put(("call", (fn, box, done)))
        self._wake.set()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=30)

    # ---- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            self._drain()
            if not self.scheduler.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # a failed step fails its requests, never the engine
                log.exception("engine step failed")
                for req in list(self.requests.values()):
                    self._fail(req, e)
        for req in list(self.requests.values()):
            req.cancelled = True
            self._finish_all(req, "abort")

    def _drain(self) -> None:
        while True:
            try:
                kind, payload = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._start(payload)
            elif kind == "abort":
                req = self.requests.get(payload)
                if req is not None:
                    req.cancelled = True
                    self.metrics.inc("requests_cancelled")
                    self._finish_all(req, "abort")
            elif kind == "call":
                fn, box, done = payload
                try:
                    box["result"] = fn()
                except Exception as e:
                    box["error"] = e
                done.set()

    def _start(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.metrics.inc("requests_total")
        self.metrics.inc("prompt_tokens_total", len(req.prompt_ids))
        for seq in req.sequences:
            seq.decoder = StreamDecoder(self.tokenizer)
            seq.stopper = StopMatcher(req.params.stop)
        self.scheduler.add(req.sequences[0])  # choices > 0 fork from it after its prefill

    def step(self) -> None:
        chunks = self.scheduler.schedule()
        if not chunks:
            return
        now = time.perf_counter()
        for c in chunks:
            if c.seq.t_prefill_start is None:
                c.seq.t_prefill_start = now
        logits = self.runner.step(chunks)
        self.metrics.inc("steps_total")
        self.metrics.inc("prefill_tokens_total", sum(c.length for c in chunks if c.length > 1))
        ready: list[tuple[Sequence, int]] = []  # (sequence, logits row)
        row = 0
        for c in chunks:
            c.seq.num_computed = c.start + c.length
            self.pool.seqs[c.seq.slot].length = c.seq.num_computed
            if c.completes:
                ready.append((c.seq, row))
                row += 1
                if c.seq.index == 0 and not c.seq.output_ids and c.seq.request.n > 1:
                    ready.extend((sib, row - 1) for sib in self._fork(c))
        if not ready:
            return
        seqs = [s for s, _ in ready]
        tokens, infos = self.sampler(logits[[r for _, r in ready]], seqs)
        t = time.perf_counter()
        outputs: dict[int, tuple[Request, list[TokenOutput]]] = {}
        for seq, tok, info in zip(seqs, tokens, infos):
            out = self._append(seq, tok, info, t)
            outputs.setdefault(id(seq.request), (seq.request, []))[1].append(out)
        for req, outs in outputs.values():
            if not req.cancelled:
                self._emit(req, outs)

    def _fork(self, chunk: ScheduledChunk) -> list[Sequence]:
        siblings = []
        for sib in chunk.seq.request.sequences[1:]:
            slot = self.pool.fork(chunk.seq.slot)
            if slot is None:  # no memory to share the prefill: compute it again later
                self.scheduler.add(sib)
                continue
            sib.slot, sib.num_computed = slot, chunk.seq.num_computed
            sib.cached_tokens, sib.t_prefill_start = chunk.seq.cached_tokens, chunk.seq.t_prefill_start
            self.scheduler.add_running(sib)
            siblings.append(sib)
        return siblings

    def _append(self, seq: Sequence, tok: int, info: dict | None, t: float) -> TokenOutput:
        req, p = seq.request, seq.request.params
        if seq.t_first_token is None:
            seq.t_first_token = t
            if seq.index == 0:
                self.metrics.observe("ttft", t - req.arrival)
        else:
            self.metrics.observe("itl", t - seq.t_last_token)
        seq.t_last_token = t
        seq.output_ids.append(tok)
        self.metrics.inc("generation_tokens_total")
        if seq.grammar_matcher is not None:
            seq.grammar_matcher.accept(tok)
        finish = None
        text = ""
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in req.stop_ids):
            finish = "stop"
        else:
            text, stopped = seq.stopper.feed(seq.decoder.put(tok))
            if stopped:
                finish = "stop"
            elif p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens:
                finish = "length"
            elif seq.total_len >= self.context_window:
                finish = "length"
            elif seq.grammar_matcher is not None and seq.grammar_matcher.is_terminated():
                finish = "stop"
        if finish is not None and not seq.stopper.stopped:  # release held-back text
            text += seq.stopper.feed(seq.decoder.flush())[0]
            if not seq.stopper.stopped:
                text += seq.stopper.flush()
        seq.text += text
        out = TokenOutput(seq.index, [tok], text, [info] if info else None, finish)
        if finish is not None:
            self._finish(seq, finish)
        return out

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason, seq.status = reason, Status.FINISHED
        self.scheduler.remove(seq, keep_for_reuse=reason != "abort")
        req = seq.request
        if req.finished:
            self.requests.pop(req.request_id, None)
            if reason != "abort":
                self.metrics.inc("requests_finished")
                self.metrics.observe("e2e", time.perf_counter() - req.arrival)
                usage = req.usage()
                self.metrics.last_prefill_tps = usage["prefill_tokens_per_s"] or self.metrics.last_prefill_tps
                self.metrics.last_decode_tps = usage["decode_tokens_per_s"] or self.metrics.last_decode_tps
                self.metrics.inc("cached_tokens_total", usage["cached_tokens"])

    def _finish_all(self, req: Request, reason: str) -> None:
        outs = []
        for seq in req.sequences:
            if seq.status is not Status.FINISHED:
                self._finish(seq, reason)
                outs.append(TokenOutput(seq.index, [], "", None, reason))
        self.requests.pop(req.request_id, None)
        if outs:
            self._emit(req, outs)

    def _fail(self, req: Request, error: BaseException) -> None:
        req.error = error
        self.metrics.inc("requests_failed")
        self._finish_all(req, "abort")

    def _emit(self, req: Request, outs: list[TokenOutput]) -> None:
        try:
            req.sink(req, outs)
        except Exception:  # a broken consumer must not stop the engine
            log.exception("request sink failed")
            req.cancelled = True
            if not req.finished:
                self._finish_all(req, "abort")

    def gauges(self) -> dict:
        g = {"requests_running": len(self.scheduler.running), "requests_waiting": len(self.scheduler.waiting),
             "preemptions_total": self.scheduler.num_preempted}
        g.update(self.pool.stats())
        return g

"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step runs one forward pass over a flattened batch: one token for each decoding sequence
plus prompt chunks of prefilling sequences, up to `prefill_chunk_size` prompt tokens. New
requests join between steps while fewer than `max_num_sequence` run. If the KV budget runs
out, the most recently admitted sequence is preempted (its KV freed; it is recomputed later). A
sequence that cannot grow even alone has reached the budget: it finishes with "length" (the frontend
refuses prompts that could never fit), so nothing spins in preemption.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from edgellm.engine.kv_pool import KVPool
from edgellm.engine.request import Sequence, Status


def lora_tag(seq: Sequence) -> str | None:
    """The key a sequence's KV is cached under besides its tokens: its LoRA adapter's (None: the base)."""
    lora = seq.request.lora
    return lora.key if lora is not None else None


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed in this step
    length: int  # tokens computed in this step (with a draft: the last known token + the drafted ones)
    draft: list[int] = field(default_factory=list)  # speculative tokens to verify (a decode chunk only)

    @property
    def completes(self) -> bool:
        """All known tokens are in the cache after this step: the next token can be sampled."""
        return self.start + self.length - len(self.draft) == self.seq.total_len

    @property
    def token_ids(self) -> list[int]:
        known = self.length - len(self.draft)
        return self.seq.all_ids[self.start:self.start + known] + self.draft

    @property
    def logit_rows(self) -> int:
        """Logits rows this chunk yields: 1 + drafted tokens when it completes its sequence, else 0."""
        return 1 + len(self.draft) if self.completes else 0


class Scheduler:
    def __init__(self, pool: KVPool, max_num_sequence: int, prefill_chunk_size: int, reuse_kv: bool):
        self.pool = pool
        self.max_num_sequence = max_num_sequence
        self.prefill_chunk_size = prefill_chunk_size
        self.reuse_kv = reuse_kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preempted = 0
        self.out_of_memory: list[Sequence] = []  # finished by the budget since the last schedule()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already holds KV (a forked choice) joins the running set directly."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_sequence:
            seq = self.waiting[0]
            if seq.slot is None:
                slot, reused = (None, 0)
                if self.reuse_kv and not seq.output_ids and not seq.params.prompt_logprobs:
                    slot, reused = self.pool.take_prefix(seq.all_ids, lora_tag(seq))
                if slot is None:
                    slot = self.pool.new_slot()
                seq.slot, seq.num_computed, seq.cached_tokens = slot, reused, reused
            seq.status = Status.RUNNING
            self.running.append(self.waiting.popleft())

    def preempt(self, seq: Sequence) -> None:
        self.pool.free(seq.slot)
        seq.slot, seq.num_computed, seq.status = None, 0, Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preempted += 1

    def update(self, chunks: list[ScheduledChunk]) -> list[tuple[Sequence, int]]:
        """Record what a step computed; returns (sequence, logits row) for each sequence to sample.

        A chunk that completes its sequence owns the next logits row (a chunk with a draft owns
        1 + len(draft) rows from there, and only its known tokens count as computed until the core
        accepts drafted ones). The first prefill of a request
        with n > 1 choices is shared: the other choices fork its KV and sample from the same row.
        """
        ready: list[tuple[Sequence, int]] = []
        row = 0
        for c in chunks:
            c.seq.num_computed = c.start + c.length - len(c.draft)
            self.pool.set_length(c.seq.slot, c.seq.num_computed)
            if c.completes:
                ready.append((c.seq, row))
                if c.seq.index == 0 and not c.seq.output_ids and c.seq.request.n > 1:
                    ready.extend((sib, row) for sib in self._fork(c.seq))
                row += c.logit_rows
        return ready

    def _fork(self, seq: Sequence) -> list[Sequence]:
        siblings = []
        for sib in seq.request.sequences[1:]:
            slot = self.pool.fork(seq.slot)
            if slot is None:  # no memory to share the prefill: compute it again later
                self.add(sib)
                continue
            sib.slot, sib.num_computed = slot, seq.num_computed
            sib.cached_tokens, sib.t_prefill_start = seq.cached_tokens, seq.t_prefill_start
            self.add_running(sib)
            siblings.append(sib)
        return siblings

    def finish(self, seq: Sequence, reason: str) -> None:
        """A choice is done: leave the batch; its KV stays as a prefix cache unless it was aborted."""
        seq.finish_reason, seq.status = reason, Status.FINISHED
        self.remove(seq, keep_for_reuse=reason != "abort")

    def remove(self, seq: Sequence, keep_for_reuse: bool) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            if keep_for_reuse:
                self.pool.commit(seq.slot, seq.all_ids[:seq.num_computed], lora_tag(seq))
            self.pool.free(seq.slot, keep_for_reuse=keep_for_reuse and self.reuse_kv)
            seq.slot = None

    def schedule(self) -> list[ScheduledChunk]:
        """The next step's chunks; decodes first (cheap), then prompt chunks within the budget."""
        self._admit()
        self.out_of_memory = []
        budget = self.prefill_chunk_size
        chunks: list[ScheduledChunk] = []
        ordered = sorted(self.running, key=lambda s: s.remaining > 1)  # decodes first, stable
        for seq in ordered:
            if seq.status is not Status.RUNNING or seq.slot is None:
                continue
            n = seq.remaining
            if n > 1:
                if budget <= 0:
                    continue
                n = min(n, budget)
                budget -= n
            start = seq.num_computed
            expect = len(seq.prompt_ids) + seq.params.max_tokens if seq.params.max_tokens else None
            while not self.pool.reserve(seq.slot, start, start + n, expect):
                if self.running == [seq]:  # alone and still over the budget: it can never grow
                    self.finish(seq, "length")
                    self.out_of_memory.append(seq)
                    break
                victim = self.running[-1]
                self.preempt(victim)
                chunks = [c for c in chunks if c.seq is not victim]
                if victim is seq:
                    break
            else:
                chunks.append(ScheduledChunk(seq, start, n))
        return chunks

"""Speculative decoding: draft a few tokens per decoding sequence, verify them in one target step.

    propose: per sequence, up to k drafted tokens (ngram: prompt lookup; small_draft: a draft model
             with its own KVPool and ModelRunner), put on its decode chunk (length 1 + k)
    target step: logits for every row of such a chunk
    accept:  greedy -- the longest prefix where the target's argmax equals the draft, plus the target's
             own next token; sampling -- rejection sampling (accept with min(1, p/q), else resample
             from normalized max(0, p - q)), so the output distribution is the target's.

Requests that use penalties, logit_bias or a grammar are not speculated (their per-row logits
would depend on the drafted tokens). k adapts per sequence: it grows after a fully accepted draft,
shrinks after a rejection, and a sequence whose drafts keep failing pauses drafting for a while.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgellm.engine.request import SamplingParams, Sequence, TokenView
from edgellm.engine.sampler import Sampler, argmax_rows
from edgellm.engine.scheduler import ScheduledChunk

NGRAM_MAX = 3  # prompt lookup tries the last 3, 2, then 1 tokens


def ngram_draft(ids: list[int], k: int, n_max: int = NGRAM_MAX) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last
    n-gram (n = n_max..1), at most k of them; [] when no n-gram recurs."""
    total = len(ids)
    for n in range(min(n_max, total - 1), 0, -1):
        tail = ids[total - n:]
        for i in range(total - n - 1, -1, -1):  # the latest earlier occurrence first
            if ids[i:i + n] == tail:
                return ids[i + n:i + n + k]
    return []


class DraftSeq(TokenView):
    """The draft model's view of a sequence: its token ids, its slot in the draft's KVPool."""

    params = SamplingParams()  # the runner asks (prompt_logprobs); a draft needs none of the extras

    def __init__(self, slot: int):
        super().__init__(slot)
        self.num_computed = 0


@dataclass
class SpecState:
    """Per sequence: its current draft length, back-off, and its draft-model view."""

    k: int
    cooldown: int = 0  # steps left without drafting
    fails: int = 0  # consecutive drafts with nothing accepted
    draft: DraftSeq | None = None
    q: list = field(default_factory=list)  # draft distributions of the pending draft (sampling only)


class Speculator:
    def __init__(self, mode: str, max_k: int, draft_runner=None, draft_pool=None):
        self.mode, self.max_k = mode, max_k
        self.draft_runner, self.draft_pool = draft_runner, draft_pool
        self.tracked: list[Sequence] = []  # sequences holding draft state

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        p = seq.params
        return (p.speculative and not p.needs_penalties and not p.logit_bias and seq.grammar_matcher is None
                and bool(seq.output_ids))

    def _state(self, seq: Sequence) -> SpecState:
        if seq.spec is None:
            seq.spec = SpecState(k=self.max_k)
            self.tracked.append(seq)
        return seq.spec

    # ---- drafting ---------------------------------------------------------------------------------
    def propose(self, chunks: list[ScheduledChunk], pool, context_window: int) -> None:
        """Put drafts on the decode chunks of eligible sequences (reserving their KV rows)."""
        self._release_finished()
        wanted: list[tuple[ScheduledChunk, int]] = []
        for c in chunks:
            seq = c.seq
            if c.length != 1 or not c.completes or not self.eligible(seq):
                continue
            st = self._state(seq)
            if st.cooldown > 0:
                st.cooldown -= 1
                continue
            k = min(st.k, context_window - seq.total_len)
            if seq.params.max_tokens is not None:
                k = min(k, seq.params.max_tokens - len(seq.output_ids) - 1)
            if k > 0:
                wanted.append((c, k))
        if not wanted:
            return
        if self.mode == "ngram":
            drafts = [ngram_draft(c.seq.all_ids, k) for c, k in wanted]
        else:
            drafts = self._draft_model([c.seq for c, _ in wanted], [k for _, k in wanted])
        for (c, _), d in zip(wanted, drafts):
            if d and pool.reserve(c.seq.slot, c.start, c.start + 1 + len(d)):
                c.draft, c.length = list(d), 1 + len(d)
            else:
                pool.reserve(c.seq.slot, c.start, c.start + 1)  # back to the plain decode (already fitted)
                c.seq.spec.q = []

    def _draft_model(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        """k tokens per sequence from the draft model, batched; the draft's KV catches up on the way."""
        drafts: list[list[int]] = [[] for _ in seqs]
        for seq in seqs:
            st = seq.spec
            if st.draft is None:
                st.draft = DraftSeq(self.draft_pool.new_slot())
            st.draft.prompt_ids = list(seq.all_ids)
            st.q = []
        live = list(range(len(seqs)))
        while live:
            chunks, owners = [], []
            for i in live:
                ds = seqs[i].spec.draft
                start = min(ds.num_computed, ds.total_len - 1)
                if not self.draft_pool.reserve(ds.slot, start, ds.total_len):
                    continue  # the draft's KV budget is full: no draft for this one now
                chunks.append(ScheduledChunk(ds, start, ds.total_len - start))
                owners.append(i)
            if not chunks:
                break
            logits = self.draft_runner.step(chunks)
            for row, (i, c) in enumerate(zip(owners, chunks)):
                seq, ds = seqs[i], seqs[i].spec.draft
                ds.num_computed = c.start + c.length
                self.draft_pool.set_length(ds.slot, ds.num_computed)
                tok = self._draft_token(logits[row], seq)
                drafts[i].append(tok)
                ds.prompt_ids.append(tok)
            live = [i for i in owners if len(drafts[i]) < ks[i]]
        return drafts

    @staticmethod
    def _draft_token(row: torch.Tensor, seq: Sequence) -> int:
        if seq.params.greedy:
            return argmax_rows(row[None])[0]
        q = Sampler.probs(row, seq.params)
        if q is None:  # degenerate: the draft proposes its argmax with certainty
            q = torch.zeros_like(row)
            q[int(row.argmax())] = 1.0
        q = q / q.sum()
        seq.spec.q.append(q)
        return int(torch.multinomial(q, 1, generator=seq.generator))

    # ---- verification ---------------------------------------------------------------------------
    def verify(self, seq: Sequence, draft: list[int], logits: torch.Tensor) -> tuple[list[int], int]:
        """(tokens to append, drafted tokens accepted) from the target's logits [1 + k, V]."""
        st = seq.spec
        p = seq.params
        out: list[int] = []
        if p.greedy:
            target = argmax_rows(logits)
            for d, t in zip(draft, target):
                if d != t:
                    out.append(t)
                    break
                out.append(d)
            else:
                out.append(target[len(draft)])
        else:
            qs = st.q if len(st.q) == len(draft) else None  # None: a point-mass draft (prompt lookup)
            for i, d in enumerate(draft):
                probs = Sampler.probs(logits[i], p)
                if probs is None:
                    out.append(int(logits[i].argmax()))
                    break
                probs = probs / probs.sum()
                qd = float(qs[i][d]) if qs is not None else 1.0
                u = float(torch.rand((), generator=seq.generator))
                if qd > 0 and u < min(1.0, float(probs[d]) / qd):
                    out.append(d)
                    continue
                residual = (probs - qs[i]).clamp_min(0) if qs is not None else probs.clone()
                if qs is None:
                    residual[d] = 0.0
                if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is right
                    residual = probs
                out.append(int(torch.multinomial(residual, 1, generator=seq.generator)))
                break
            else:
                probs = Sampler.probs(logits[len(draft)], p)
                out.append(int(logits[len(draft)].argmax()) if probs is None
                           else int(torch.multinomial(probs, 1, generator=seq.generator)))
        accepted = len(out) - 1
        self._adapt(st, accepted, len(draft))
        st.q = []
        return out, accepted

    def _adapt(self, st: SpecState, accepted: int, drafted: int) -> None:
        if accepted == drafted:
            st.k, st.fails = min(st.k + 1, self.max_k), 0
        elif accepted == 0:
            st.k, st.fails = max(1, st.k // 2), st.fails + 1
            if st.fails >= 2:  # drafts keep failing here: pause, longer each time (a draft model's
                # attempt also costs its catch-up over the paused tokens, so it pauses longer)
                base = 2 if self.mode == "ngram" else 4
                st.cooldown = min(base ** (st.fails - 1), 32 if self.mode == "ngram" else 128)
        else:
            st.k, st.fails = max(1, accepted + 1), 0

    def synced(self, seq: Sequence, base_len: int, drafted: int, accepted: int) -> None:
        """After verification: the draft model's KV keeps the drafted tokens that were accepted."""
        ds = seq.spec.draft if seq.spec is not None else None
        if ds is None:
            return
        ds.num_computed = min(ds.num_computed, base_len + min(accepted, max(drafted - 1, 0)))
        ds.prompt_ids = list(seq.all_ids)
        self.draft_pool.set_length(ds.slot, ds.num_computed)

    # ---- lifetime ----------------------------------------------------------------------------------
    def _release_finished(self) -> None:
        from edgellm.engine.request import Status

        keep = []
        for seq in self.tracked:
            if seq.status is Status.FINISHED:
                if seq.spec.draft is not None:
                    self.draft_pool.free(seq.spec.draft.slot)
                seq.spec = None
            else:
                keep.append(seq)
        self.tracked = keep

"""`StaticRunner`: what the compiled-library runners share (`compile/runtime.py` explains the design): a
state per sequence slot holding the compiled program's own caches, LRU reuse of states, a state rebuilt
by copying one with the same prefix or by recomputing, and the engine's `step(chunks)` over them."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from edgellm.errors import UserError


class SlotState:
    """One state of the compiled program (its own caches): the tokens they hold and whose they are."""

    __slots__ = ("slot", "tokens", "handle", "owner")

    def __init__(self, slot: int, handle):
        self.slot, self.tokens, self.handle = slot, [], handle
        self.owner = None  # the sequence whose tokens these are (the last to run in this state)


def _ids(seq, i: int, j: int) -> list[int]:
    """seq.all_ids[i:j] without joining the whole prompt and output (a decode step wants one token)."""
    n = len(seq.prompt_ids)
    if i >= n:
        return seq.output_ids[i - n:j - n]
    return seq.prompt_ids[i:j] + (seq.output_ids[:j - n] if j > n else [])


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search the first difference
    while lo < hi:
        mid = (lo + hi) // 2
        if a[:mid + 1] == b[:mid + 1]:
            lo = mid + 1
        else:
            hi = mid
    return lo


class StaticRunner:
    """Per-slot states over a one-sequence step program; subclasses run the program."""

    fused = None  # ModelRunner's attribute (a fused native decode step); none here
    argmax: list[int] | None = None  # each returned row's argmax when the native step gave it (ModelRunner's)
    _argmax: int | None = None  # the last _forward's argmax, if it knew it

    def __init__(self, meta: dict, lib: Path, ledger, num_sequences: int):
        self.meta, self.lib = meta, lib
        self.max_len = self.context_window = int(meta["context_window_size"])
        self.chunk = int(meta["prefill_chunk_size"])
        self.vocab = int(meta["vocab_size"])
        self.pool = ledger  # the scheduler's slots: a state whose slot is gone is the first to reuse
        want = num_sequences or 1
        self.capacity = max(1, min(int(meta.get("max_batch_size") or 1), want)) + 1  # +1 keeps a prefix
        self.states: OrderedDict[int, SlotState] = OrderedDict()  # LRU order

    # ---- subclass API -------------------------------------------------------------------------
    def _new_handle(self):
        raise NotImplementedError

    def _forward(self, handle, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [1, vocab] of the last of `ids`, written at positions start.. of the handle's cache."""
        raise NotImplementedError

    def _copy(self, src, dst, n: int) -> bool:
        """Copy the first n cached positions; False if this program cannot."""
        return False

    # ---- state bookkeeping --------------------------------------------------------------------
    def _alive(self, slot: int) -> bool:
        if self.pool is None:
            return True
        return slot in getattr(self.pool, "seqs", {}) or slot in getattr(self.pool, "prefix_cache", {})

    def _take_state(self, slot: int, keep: set[int]) -> SlotState:
        if len(self.states) < self.capacity:
            return SlotState(slot, self._new_handle())
        victims = [s for s in self.states if s not in keep]
        dead = [s for s in victims if not self._alive(s)]
        if not victims:
            raise RuntimeError("more sequences in one step than the library's states")
        victim = self.states.pop((dead or victims)[0])
        return SlotState(slot, victim.handle)

    def _state_for(self, seq, start: int, keep: set[int]) -> SlotState:
        st = self.states.get(seq.slot)
        if st is not None and st.owner is seq and len(st.tokens) == start:
            # the same sequence's next token (a decode step): its tokens so far are the state's, as
            # they were computed (a sequence's tokens below what it computed never change)
            self.states.move_to_end(seq.slot)
            return st
        st = self._prefix_state(seq, st, start, keep)
        st.owner = seq
        return st

    def _prefix_state(self, seq, st: SlotState | None, start: int, keep: set[int]) -> SlotState:
        """The state of `seq` (st: its slot's current one, if any) holding its first `start` tokens."""
        ids = seq.all_ids
        if st is not None and len(st.tokens) >= start and st.tokens[:start] == ids[:start]:
            del st.tokens[start:]
            self.states.move_to_end(seq.slot)
            return st
        if st is None:
            st = self._take_state(seq.slot, keep)
            self.states[seq.slot] = st
        have = _common(st.tokens, ids[:start])
        for other in self.states.values():  # a fork or a cached prefix: copy instead of recomputing
            if other is st or have >= start:
                continue
            n = _common(other.tokens, ids[:start])
            if n > have and self._copy(other.handle, st.handle, n):
                st.tokens, have = other.tokens[:n], n
        del st.tokens[have:]
        if have < start:
            self._run(st, ids[have:start], have)
        self.states.move_to_end(seq.slot)
        return st

    def _one(self, st: SlotState, seq, start: int) -> torch.Tensor:
        """Logits [1, vocab] of the token of `seq` at `start` (a decode step)."""
        return self._run(st, _ids(seq, start, start + 1), start)

    def _run(self, st: SlotState, ids: list[int], start: int) -> torch.Tensor:
        end = start + len(ids)
        if end > self.max_len:
            raise UserError(f"sequence of {end} tokens exceeds the library's context window "
                            f"({self.max_len}); compile with --overrides context_window_size=N")
        logits = None
        for s in range(0, len(ids), self.chunk):
            piece = ids[s:s + self.chunk]
            logits = self._forward(st.handle, torch.tensor(piece, dtype=torch.long), start + s)
            st.tokens.extend(piece)
        return logits

    def step(self, chunks) -> torch.Tensor:
        rows, argmax = [], []
        keep = {c.seq.slot for c in chunks}
        for c in chunks:
            st = self._state_for(c.seq, c.start, keep)
            self._argmax = None
            if c.length == 1:
                logits = self._one(st, c.seq, c.start)
            else:
                logits = self._run(st, _ids(c.seq, c.start, c.start + c.length), c.start)
            if c.completes:
                rows.append(logits.reshape(1, -1).float().cpu())
                argmax.append(self._argmax)
        # greedy tokens: the native decode step's own argmax, when every row came from it
        self.argmax = None if None in argmax else argmax
        if not rows:
            return torch.empty(0, self.vocab)
        return rows[0] if len(rows) == 1 else torch.cat(rows)

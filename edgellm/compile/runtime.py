"""Run a compiled model library in the engine in place of the eager model.

`load_library(path, model_dir, ...)` checks that the library was compiled for the model and returns a
runner with ModelRunner's interface (`step(chunks) -> logits [R, vocab]`) and the context window it
supports (`runner.context_window`).

The compiled programs handle one sequence per call and keep their own static KV caches, one
per sequence slot (an AOTInductor library: key and value tensors per layer and slot; an
ExecuTorch program: one loaded copy of the program per slot, the cache inside it). The
engine's KV pool is not used. A runner state remembers which tokens its cache holds, so a
sequence whose cache is missing (more sequences than states, a forked choice, a reused prefix)
is rebuilt by copying a state with the same prefix or by recomputing it: results always equal
the eager engine's. The engine's scheduler keeps only a SlotLedger (slots, no memory) beside it.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from edgellm.compile import target as T
from edgellm.errors import UserError
from edgellm.models.fused_decode import _token_at


def sniff(path: Path) -> str:
    """'pt2', 'pte' or 'tar' from the file's content."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04" or zipfile.is_zipfile(path):
        return "pt2"
    if head[4:6] == b"ET":
        return "pte"
    if tarfile.is_tarfile(path):
        return "tar"
    raise UserError(f"{path}: not a model library (expected an AOTInductor .pt2, an ExecuTorch .pte "
                    "or an edgellm .tar)")


def inspect_library(path: str | Path) -> tuple[dict, Path, str]:
    """(metadata, artifact path, artifact kind) of a library file; UserError if it is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model library {path}: no such file")
    kind = sniff(path)
    if kind == "tar":
        from edgellm.compile.archive import extract_artifact, read_tar_metadata
        from edgellm.paths import edgellm_home

        meta = read_tar_metadata(path)
        if meta is None:
            raise UserError(f"{path}: not an edgellm model library archive (no metadata.json)")
        art = extract_artifact(path, edgellm_home() / "libs")
        return meta, art, meta.get("artifact", "pt2")
    if kind == "pt2":
        from edgellm.compile.aoti import read_pt2_metadata

        meta = read_pt2_metadata(path)
    else:
        from edgellm.compile.executorch_export import read_pte_metadata

        meta = read_pte_metadata(path)
    if meta is None:
        raise UserError(f"{path}: not an edgellm model library (no edgellm metadata; compile it with "
                        "`edgellm compile`)")
    return meta, path, kind


class _State:
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
        self.states: OrderedDict[int, _State] = OrderedDict()  # LRU order

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

    def _take_state(self, slot: int, keep: set[int]) -> _State:
        if len(self.states) < self.capacity:
            return _State(slot, self._new_handle())
        victims = [s for s in self.states if s not in keep]
        dead = [s for s in victims if not self._alive(s)]
        if not victims:
            raise RuntimeError("more sequences in one step than the library's states")
        victim = self.states.pop((dead or victims)[0])
        return _State(slot, victim.handle)

    def _state_for(self, seq, start: int, keep: set[int]) -> _State:
        st = self.states.get(seq.slot)
        if st is not None and st.owner is seq and len(st.tokens) == start:
            # the same sequence's next token (a decode step): its tokens so far are the state's, as
            # they were computed (a sequence's tokens below what it computed never change)
            self.states.move_to_end(seq.slot)
            return st
        st = self._prefix_state(seq, st, start, keep)
        st.owner = seq
        return st

    def _prefix_state(self, seq, st: _State | None, start: int, keep: set[int]) -> _State:
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

    def _one(self, st: _State, seq, start: int) -> torch.Tensor:
        """Logits [1, vocab] of the token of `seq` at `start` (a decode step)."""
        return self._run(st, _ids(seq, start, start + 1), start)

    def _run(self, st: _State, ids: list[int], start: int) -> torch.Tensor:
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


class AOTIRunner(StaticRunner):
    """An AOTInductor package, fed the engine model's weights.

    A cpu library built on the native operators (metadata `native_ops`) gets the repacked weights of
    the eager model, and its single-token steps run the model's native decode step (the same one call
    over all layers the eager engine makes at O2) on the library's own caches; prefill chunks and
    recomputation run the compiled graph.
    """

    def __init__(self, meta: dict, lib: Path, ledger, num_sequences: int, artifact: Path, model_dir: Path,
                 device: str):
        super().__init__(meta, lib, ledger, num_sequences)
        from edgellm.compile.aoti import OLDEST_PT2_FORMAT, PT2_FORMAT, kv_dtype_of, load_pt2
        from edgellm.models.loader import load_model

        version = int(meta.get("format_version") or 1)
        if version < OLDEST_PT2_FORMAT:
            raise UserError(f"model library {lib.name} was compiled by an older edgellm (another KV cache "
                            "layout); compile it again")
        if version > PT2_FORMAT:
            raise UserError(f"model library {lib.name} was compiled by a newer edgellm (format {version}); "
                            "upgrade edgellm or compile it again")
        self.device = device
        self.kv_dtype = kv_dtype_of(meta)
        self.decoder = None  # (FusedDecoder, its cache view) for single-token steps
        fresh, _ = load_model(model_dir, device=self.device, verify=False)
        if meta.get("native_ops"):
            model = self._native(fresh, lib)
        else:
            from edgellm.compile.lowering import float_model

            model = float_model(fresh)
            del fresh
        self.program = load_pt2(artifact)
        self.model = model  # the program reads these tensors in place
        named = {f"model.{k}": v for k, v in model.named_parameters()}
        named.update({f"model.{k}": v for k, v in model.named_buffers()})
        wanted = self.program.get_constant_fqns()
        missing = [k for k in wanted if k not in named]
        if missing:
            raise UserError(f"model library {lib.name} needs weight {missing[0]!r}, which this model does not "
                            "have (compiled by another edgellm version?); compile it again")
        consts = {}
        for k in wanted:
            consts[k] = named[k]
        try:
            self.program.load_constants(consts, check_full_update=True, user_managed=True)
        except RuntimeError as e:
            raise UserError(f"model library {lib.name} does not accept this model's weights ({e}); "
                            "compile it again") from None
        self.positions = torch.arange(self.max_len, dtype=torch.long, device=self.device)

    def _native(self, fresh, lib: Path):
        from edgellm.compile.native_ops import native_model
        from edgellm.quantization import kernels
        from edgellm.quantization.layers import repack_model

        if self.device != "cpu" or not kernels.available():
            raise UserError(f"model library {lib.name} calls edgellm's native CPU kernels, which are not "
                            f"available here ({kernels.unavailable_reason() or 'not on cpu'})")
        repack_model(fresh)
        window = (self.meta.get("overrides") or {}).get("sliding_window")
        if window is not None:  # the graph was compiled with it: the native step must attend alike
            from edgellm.compile.compiler import apply_sliding_window

            apply_sliding_window(fresh, self.meta.get("model_type"), int(window))
        view = _CacheView(fresh.cfg.num_layers, self.kv_dtype)
        from edgellm.models.fused_decode import native_decoder

        fused = native_decoder(fresh, view)
        if fused is not None:
            self.decoder = (fused, view)
        return native_model(fresh)

    def _new_handle(self):
        from edgellm.compile.aoti import new_caches

        return new_caches(self.model, self.max_len, self.device, self.kv_dtype)

    def step(self, chunks) -> torch.Tensor:
        # one sequence's decode token (the common step): straight into the native step, whose logits are
        # already [1, vocab] float32 on the CPU. Python runs with caches the step's weight stream has just
        # evicted, so every object touched costs: the general path took ~50 us a token more than the
        # eager runner's
        if len(chunks) == 1 and self.decoder is not None:
            c = chunks[0]
            if c.length == 1 and c.completes and c.start + 1 <= self.max_len:
                logits = self._one(self._state_for(c.seq, c.start, (c.seq.slot,)), c.seq, c.start)
                self.argmax = None if self._argmax is None else [self._argmax]
                return logits
        return super().step(chunks)

    def _one(self, st: _State, seq, start: int) -> torch.Tensor:
        # a decode step straight into the native step (no tensor of ids, no chunk loop): the compiled
        # runtime's Python per token was 90 us against the eager runner's 35
        if self.decoder is None or start + 1 > self.max_len:
            return super()._one(st, seq, start)
        token = _token_at(seq, start)
        logits = self._decode(st.handle, token, start)
        st.tokens.append(token)
        return logits

    def _decode(self, handle, token: int, start: int) -> torch.Tensor:
        """The native decode step for `token` at `start` of the handle's caches (and its argmax)."""
        fused, view = self.decoder
        view.kv.k, view.kv.v = handle
        with torch.inference_mode():
            logits = fused([_Row(start, token)])
        self._argmax = None if fused.last_argmax is None else fused.last_argmax[0]
        return logits

    def _forward(self, handle, ids, start):
        t = ids.shape[0]
        self._argmax = None
        if t == 1 and self.decoder is not None:
            return self._decode(handle, int(ids[0]), start)
        k, v = handle
        with torch.inference_mode():
            return self.program(ids.to(self.device), self.positions[start:start + t],
                                self.positions[:start + t], k, v)

    def _copy(self, src, dst, n):
        for s, d in zip(src[0] + src[1], dst[0] + dst[1]):
            d[:, :n].copy_(s[:, :n])
        return True


class _SeqCache:
    __slots__ = ("k", "v", "base", "native")

    def __init__(self, num_layers: int):
        self.k: list = []
        self.v: list = []
        self.base = [0] * num_layers  # a library's cache holds positions 0.. at index 0
        self.native = None  # the native step's pointers into k and v (rebuilt when the lists change)


class _CacheView:
    """What the native decode step reads of a KV pool, over one library state's caches ([KVH, context, D]
    per layer, float32 or float16; slot 0 is whichever state runs)."""

    def __init__(self, num_layers: int, dtype: torch.dtype):
        self.dtype = dtype
        self.kv = _SeqCache(num_layers)
        self.seqs = {0: self.kv}


class _Row:
    """A one-token chunk as the native decode step reads it: the token at position `start` of slot 0."""

    __slots__ = ("start", "seq")

    def __init__(self, start: int, token: int):
        self.start = start
        self.seq = _Tokens(start, token)


class _Tokens:
    __slots__ = ("slot", "prompt_ids", "output_ids")

    def __init__(self, start: int, token: int):
        self.slot, self.prompt_ids, self.output_ids = 0, _Only(start, token), ()


class _Only:
    """A sequence of start + 1 token ids of which only the last is known (all the step reads)."""

    __slots__ = ("n", "token")

    def __init__(self, start: int, token: int):
        self.n, self.token = start + 1, token

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return self.token


class PteRunner(StaticRunner):
    """An ExecuTorch program through ExecuTorch's Python runtime (CPU)."""

    def __init__(self, meta: dict, lib: Path, ledger, num_sequences: int, artifact: Path):
        super().__init__(meta, lib, ledger, num_sequences)
        self.artifact = artifact
        self._new_handle()  # fail here, not at the first request, if the program does not load

    def _new_handle(self):
        # Methods of one loaded program share their planned memory (the KV cache): every state
        # loads the program anew (the file is memory-mapped, so the weights are not duplicated).
        from edgellm.compile.executorch_export import PteProgram

        prog = PteProgram(self.artifact)
        return prog, prog.new_method()

    def _forward(self, handle, ids, start):
        from edgellm.compile.executorch_export import run_method

        return run_method(handle[1], ids, start)


def load_library(model_lib: str | Path, model_dir: Path, cfg, arch, device: str, num_sequences: int,
                 ledger) -> StaticRunner:
    """The runner for `model_lib`, checked against the model in `model_dir` (chat config `cfg`, `arch`)."""
    meta, artifact, kind = inspect_library(model_lib)
    lib = Path(model_lib)
    T.check_match(meta, lib, cfg, arch, Path(model_dir))
    dev = meta.get("device")
    if kind == "pt2":
        want = str(device).split(":")[0]
        if dev != want:
            raise UserError(f"model library {lib.name} was compiled for {dev}, but the engine runs on {want}; "
                            f"pass device={dev!r} (--device {dev}) or compile for {want}")
        return AOTIRunner(meta, lib, ledger, num_sequences, artifact, Path(model_dir), device)
    if str(device) != "cpu":
        raise UserError(f"model library {lib.name} is an ExecuTorch program for {dev}; it runs on the CPU "
                        "here: pass device='cpu' (--device cpu)")
    return PteRunner(meta, lib, ledger, num_sequences, artifact)

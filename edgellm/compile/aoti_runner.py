"""The AOTInductor (.pt2) library's runner (`compile/runtime.py` explains the runners' design): the
compiled graph for prefill chunks and recomputation, and on a cpu library built on the native operators,
the model's native decode step over the library's own caches for single-token steps."""

from __future__ import annotations

from pathlib import Path

import torch

from edgellm.compile.static_runner import SlotState, StaticRunner
from edgellm.errors import UserError
from edgellm.models.fused_decode import _token_at


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

    def _one(self, st: SlotState, seq, start: int) -> torch.Tensor:
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

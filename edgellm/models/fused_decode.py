"""The decode step of a model as one native call over all its layers (edgellm.quantization.kernels).

A family's Model declares the capability by describing its layers: `fused_layers()` returns one
`LayerSpec` per layer (which modules are the norms, the projections, the MLP; whether the residual is
parallel; which activation), or None when a layer is not of that shape. `native_decoder(model, pool)`
(models/base.py) hands that to `FusedDecoder.build`, which the engine's runner asks for at O2. The
native side (ELayer in quantization/csrc/common.h) covers RMSNorm or LayerNorm-with-bias pre-norms,
optional post norms (Gemma 2), sequential or parallel residuals (GPT-NeoX), gated (silu, gelu) or plain
(gelu) MLPs, per-head q/k norms (Qwen3), partial rotary, biases, sliding windows, attention soft-capping,
and float32, float16 or int8 KV caches, with linears that are repacked quantized layers or float32
nn.Linear. `build` returns None for anything else, and the runner then steps the model's modules.
The embedding runs in the native step when it is a plain lookup of a repacked quantized table, else (a
float table, Gemma's scaling, a tensor-parallel shard) the model's own module computes it; the final norm
and the output matrix run in the native step too when they are of its kinds (else, and with logit
soft-capping or a tensor-parallel head, the model's own modules compute them from the step's hidden
states).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.models.base import ACTIVATIONS, RMSNorm

KV_KINDS = {torch.float32: 0, torch.float16: 1, torch.int8: 2}  # cache element types of the native step
# MLP activations of the native step (ELayer.act): 0 silu, 1 gelu (tanh approximation), 2 gelu (erf)
ACT_CODES = {"silu": 0, "swish": 0, "gelu_new": 1, "gelu_pytorch_tanh": 1, "gelu_fast": 1, "gelu": 2}


@dataclass
class LayerSpec:
    """One decoder layer as the native step computes it:
    h += post_attn_norm(attn(norm1(h))) + post_mlp_norm(mlp(norm2(h if parallel else h + attention part))),
    mlp = down(act(gate) * up) with up = [gate; up] rows when `gated`, else down(act(up))."""

    norm1: nn.Module
    norm2: nn.Module
    qkv: nn.Module  # rows [q heads; k heads; v heads]
    o: nn.Module
    up: nn.Module
    down: nn.Module
    act: object  # the MLP's activation function (one of base.ACTIVATIONS)
    gated: bool = True
    parallel: bool = False
    window: int | None = None
    q_norm: nn.Module | None = None  # per-head RMSNorms (qwen3)
    k_norm: nn.Module | None = None
    post_attn_norm: nn.Module | None = None  # RMSNorms of the attention / MLP output (gemma2)
    post_mlp_norm: nn.Module | None = None


def _act_code(fn) -> int | None:
    for name, code in ACT_CODES.items():
        if ACTIVATIONS[name] is fn:
            return code
    return 0 if fn is F.silu else None


class FusedDecoder:
    """The decode step of a model whose layers are `LayerSpec`s, as one native call (csrc/fused_decode.cpp)."""

    def __init__(self, model: nn.Module, pool, lib, layers, keep, windows, eps: float, tail=None, embed=None):
        from edgellm.quantization import kernels as K

        self.model, self.pool, self.lib, self.K = model, pool, lib, K
        cfg = model.cfg
        self.L = cfg.num_layers
        self.windows = windows
        self.windowed = any(w is not None for w in windows)
        self._keep = keep  # tensors and descriptors the native side points at
        self._layers = layers
        m = K.EModel()
        m.L, m.H, m.nh, m.nkv, m.D = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        m.rot, m.I = cfg.rot_dim, cfg.intermediate_size
        cos = model.rope.cos.float().contiguous()
        sin = model.rope.sin.float().contiguous()
        self._rope = (cos, sin)
        m.maxpos = cos.shape[0]
        m.eps, m.scale = float(eps), float(cfg.scale)
        m.softcap = float(cfg.attn_softcap or 0.0)
        m.cos, m.sin = cos.data_ptr(), sin.data_ptr()
        m.layers = ctypes.cast(layers, ctypes.POINTER(K.ELayer))
        # the tail (final norm, output matrix) in the native step when the model's are of its kinds
        m.fn_kind, m.fn_w, m.fn_b = -1, None, None
        self.head = None  # the output matrix's PackedWeight when the native step computes the logits
        if tail is not None:
            (m.fn_kind, m.fn_w, m.fn_b), self.head = tail
            if self.head is not None:
                m.head = ctypes.pointer(self.head.desc)
        self.embed = embed  # the embedding table's PackedWeight when the native step looks tokens up
        if embed is not None:
            m.embed = ctypes.pointer(embed.desc)
        self.desc = m
        self.ref = ctypes.byref(m)
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._scratch_key = (0, 0, 0)
        self.last_argmax: list[int] | None = None  # the last step's argmax of each row's logits (the native head)
        self._io: _StepIO | None = None
        self._logits: torch.Tensor | None = None  # the next step's logits, allocated after the last step

    @classmethod
    def build(cls, model: nn.Module, pool, specs: list[LayerSpec] | None) -> FusedDecoder | None:
        """The fused step for `model` whose layers `specs` describes; None where the native step does not apply."""
        from edgellm.quantization import kernels as K
        from edgellm.quantization.layers import QuantLinear

        lib = K.library()
        if specs is None or lib is None or pool.dtype not in KV_KINDS:
            return None
        cfg = model.cfg
        if (len(specs) != cfg.num_layers or cfg.rot_dim % 2 or cfg.rot_dim > 512 or cfg.head_dim > 512
                or cfg.num_heads % cfg.num_kv_heads or str(model.rope.cos.device) != "cpu"):
            return None
        keep: list = []
        eps: list[float] = []

        def linear(mod: nn.Module):
            if isinstance(mod, QuantLinear):
                return mod.packed if mod.packed is not None and mod.packed.fmt in (4, 8) else None
            if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.device.type == "cpu":
                return K.PackedWeight.from_float(mod.weight, mod.bias)
            return None

        def vec(t: torch.Tensor) -> int:
            t = t.detach().float().contiguous()
            keep.append(t)
            return t.data_ptr()

        def norm(mod, layer_norm_ok: bool = False) -> tuple[int, int | None, int] | None:
            """(kind, weight, bias) of a norm: 0 = RMSNorm, 1 = LayerNorm with bias; None if neither."""
            if type(mod) is RMSNorm and not mod.offset:
                eps.append(mod.eps)
                return 0, vec(mod.weight), None
            if (layer_norm_ok and isinstance(mod, nn.LayerNorm) and mod.weight is not None and mod.bias is not None
                    and mod.weight.shape == (cfg.hidden_size,)):
                eps.append(mod.eps)
                return 1, vec(mod.weight), vec(mod.bias)
            return None

        layers = (K.ELayer * cfg.num_layers)()
        windows = []
        for e, sp in zip(layers, specs):
            act = _act_code(sp.act)
            parts = [linear(sp.qkv), linear(sp.o), linear(sp.up), linear(sp.down)]
            n1, n2 = norm(sp.norm1, True), norm(sp.norm2, True)
            if act is None or any(p is None for p in parts) or n1 is None or n2 is None or n1[0] != n2[0]:
                return None
            extra = []
            for mod in (sp.q_norm, sp.k_norm, sp.post_attn_norm, sp.post_mlp_norm):
                got = None if mod is None else norm(mod)
                if mod is not None and got is None:
                    return None
                extra.append(None if got is None else got[1])
            gu_rows = (2 if sp.gated else 1) * cfg.intermediate_size
            if parts[2].n != gu_rows or parts[3].k != cfg.intermediate_size:
                return None
            keep.extend(parts)
            e.norm, e.ln1, e.ln1b = n1
            e.ln2, e.ln2b = n2[1], n2[2]
            e.qn, e.kn, e.pn1, e.pn2 = extra
            e.parallel, e.act, e.gated = int(sp.parallel), act, int(sp.gated)
            e.qkv, e.o, e.gu, e.down = (p.desc for p in parts)
            windows.append(sp.window)
        if len(set(eps)) != 1:  # one epsilon for every norm of the native step
            return None
        return cls(model, pool, lib, layers, keep, windows, eps[0], _tail(model, norm, linear, eps), _embed(model))

    def _scratch_for(self, b: int, maxkeys: int, nt: int) -> torch.Tensor:
        key = (b, maxkeys, nt)
        if any(k > s for k, s in zip(key, self._scratch_key)):
            key = tuple(max(k, s) for k, s in zip(key, self._scratch_key))
            key = (key[0], max(key[1] * 5 // 4, 256), key[2])
            size = self.lib.el_decode_scratch_bytes(self.ref, *key)
            self._scratch = torch.empty(size, dtype=torch.uint8)
            self._scratch_key = key
        return self._scratch

    def _io_for(self, b: int) -> _StepIO:
        io = self._io
        if io is None or io.cap < b:
            io = self._io = _StepIO(max(b, 8), self.desc.H)
        return io

    def __call__(self, chunks) -> torch.Tensor:
        """Logits [B, vocab] of one decode step: `chunks` are the engine's, one new token per sequence."""
        # Up to the native call this makes no torch op and no ctypes function call (each releases the GIL)
        # when the native step embeds the tokens and the batch has the last step's size (a new size
        # allocates its logits here): a stream's reader woken by the last step would take the GIL there and
        # run on this step's critical path, where the other core idles; in the native call it runs beside
        # the step instead.
        model, pool, L = self.model, self.pool, self.L
        b = len(chunks)
        starts = [c.start for c in chunks]
        if max(starts) >= self.desc.maxpos:
            raise ValueError(f"position {max(starts)} is beyond the model's {self.desc.maxpos} positions")
        tokens = [_token_at(c.seq, c.start) for c in chunks]
        io = self._io_for(b)
        io.pos_v[:b] = starts
        io.ids_v[:b] = tokens
        if self.embed is not None:
            if min(tokens) < 0 or max(tokens) >= self.embed.n:
                raise IndexError(f"token id out of range for an embedding of {self.embed.n} rows")
            h = io.h
        else:
            h = model.embed(io.ids[:b]).float().contiguous()
        keys, values, caps, widx = [], [], [], []
        windows = self.windows
        kfrom = (ctypes.c_int32 * (L * b))()
        for j, c in enumerate(chunks):  # sequence j's entries sit at j * L .. j * L + L - 1
            kv = pool.seqs[c.seq.slot]
            own = kv.native
            if own is None or own[0] is not kv.k or own[1] is not kv.v:
                own = kv.native = (kv.k, kv.v, bytes((ctypes.c_void_p * L)(*[t.data_ptr() for t in kv.k])),
                                   bytes((ctypes.c_void_p * L)(*[t.data_ptr() for t in kv.v])),
                                   bytes((ctypes.c_int32 * L)(*[t.shape[1] for t in kv.k])))
            keys.append(own[2])
            values.append(own[3])
            caps.append(own[4])
            start = c.start
            widx += [start - base for base in kv.base]
            if self.windowed:
                kfrom[j * L:(j + 1) * L] = [0 if w is None else max(base, start - w + 1) - base
                                            for base, w in zip(kv.base, windows)]
        n = L * b
        kp = (ctypes.c_void_p * n).from_buffer_copy(b"".join(keys))
        vp = (ctypes.c_void_p * n).from_buffer_copy(b"".join(values))
        cap = (ctypes.c_int32 * n).from_buffer_copy(b"".join(caps))
        widx = (ctypes.c_int32 * n)(*widx)
        nt = self.K.threads()
        scratch = self._scratch_for(b, max(starts) + 1, nt)
        logits = None
        if self.head is not None:  # allocated at the end of the last step when it had as many rows
            logits = self._logits if self._logits is not None and self._logits.shape[0] == b else \
                torch.empty(b, self.head.n)
        argmax = None if logits is None else (ctypes.c_int32 * b)()
        self.lib.el_decode(self.ref, b, io.pos_ptr, h.data_ptr(), kp, vp, cap, widx, kfrom, scratch.data_ptr(),
                           self._scratch_key[1], nt, KV_KINDS[pool.dtype],
                           None if logits is None else logits.data_ptr(),
                           io.ids_ptr if self.embed is not None else None, argmax)
        self.last_argmax = None if argmax is None else list(argmax)
        if logits is not None:
            self._logits = torch.empty(b, self.head.n)  # the next step's (the caller owns this one)
            return logits
        return model.logits(h[:b] if self.desc.fn_kind >= 0 else model.final_norm(h[:b])).float()


class _StepIO:
    """A decode step's inputs for up to `cap` rows, written through ctypes views (no torch call)."""

    def __init__(self, cap: int, hidden: int):
        self.cap = cap
        self.ids = torch.zeros(cap, dtype=torch.int64)
        self.pos = torch.zeros(cap, dtype=torch.int64)
        self.h = torch.empty(cap, hidden)  # the hidden states when the native step embeds the tokens
        self.ids_ptr, self.pos_ptr = self.ids.data_ptr(), self.pos.data_ptr()
        self.ids_v = (ctypes.c_int64 * cap).from_address(self.ids_ptr)
        self.pos_v = (ctypes.c_int64 * cap).from_address(self.pos_ptr)


def _tail(model: nn.Module, norm, linear, eps: list[float]):
    """((final norm kind, weight, bias), output PackedWeight or None) for the native step, or None when the
    model's final norm is of no kind it computes (or has another epsilon than the layers')."""
    from edgellm.quantization.layers import QuantEmbedding

    fn = norm(model.final_norm, True)
    if fn is None or eps[-1] != eps[0]:
        return None
    head = None
    if model.tp_gather is None and not model.cfg.final_softcap:  # the logits as they leave model.logits
        out = model.output
        if out is not None:
            head = linear(out)
        elif isinstance(model.embedding, QuantEmbedding) and model.embedding.packed is not None:
            head = model.embedding.packed if model.embedding.packed.fmt in (4, 8) else None
    return fn, head


def _embed(model: nn.Module):
    """The PackedWeight of the model's embedding table when its `embed` is a plain lookup of one (the
    native step then writes the hidden states itself), else None."""
    from edgellm.models.base import CausalLM
    from edgellm.quantization.layers import QuantEmbedding

    emb = model.embedding
    if type(model).embed is not CausalLM.embed or not isinstance(emb, QuantEmbedding) or emb.packed is None:
        return None
    return emb.packed if type(emb).forward is QuantEmbedding.forward else None


def _token_at(seq, i: int) -> int:
    n = len(seq.prompt_ids)
    return seq.prompt_ids[i] if i < n else seq.output_ids[i - n]


def native_decoder(model: nn.Module, pool):
    """The decode step of `model` as one native call over all layers, or None where it does not apply
    (the model declares no `fused_layers`, no kernels, a cache or layer the native step does not cover)."""
    fused_layers = getattr(model, "fused_layers", None)
    return None if fused_layers is None else FusedDecoder.build(model, pool, fused_layers())

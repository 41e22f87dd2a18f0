"""The decode step of a Llama-shaped model as one native call (edgellm.quantization.kernels).

A model offers it through `Model.native_decoder(pool)`; the engine's runner asks for it at O2. It
covers models made of llama.Block layers (llama, mistral, qwen2, qwen3, phi3, internlm2) with float32,
float16 or int8 KV caches whose linears are repacked quantized layers or float32 nn.Linear;
`FusedDecoder.build` returns None for anything else, and the runner then steps the model's modules.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

KV_KINDS = {torch.float32: 0, torch.float16: 1, torch.int8: 2}  # cache element types of the native step


class FusedDecoder:
    """The decode step of a Llama-shaped model as one native call (see edgellm_kernels.cpp).

    Covers llama.Block models (llama, mistral, qwen2, qwen3, phi3, internlm2) with float32, float16 or int8
    KV caches whose linears are repacked quantized layers or float32 nn.Linear; `build` returns None otherwise.
    Embedding, final norm and logits stay the model's own modules.
    """

    def __init__(self, model: nn.Module, pool, lib, layers, keep, windows):
        from edgellm.quantization import kernels as K

        self.model, self.pool, self.lib, self.K = model, pool, lib, K
        cfg = model.cfg
        self.L = cfg.num_layers
        self.windows = windows
        self._keep = keep  # tensors and descriptors the native side points at
        self._layers = layers
        m = K.EModel()
        m.L, m.H, m.nh, m.nkv, m.D = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        m.rot, m.I = cfg.rot_dim, cfg.intermediate_size
        cos = model.rope.cos.float().contiguous()
        sin = model.rope.sin.float().contiguous()
        self._rope = (cos, sin)
        m.maxpos = cos.shape[0]
        m.eps, m.scale = float(model.model.layers[0].input_layernorm.eps), float(cfg.scale)
        m.cos, m.sin = cos.data_ptr(), sin.data_ptr()
        m.layers = ctypes.cast(layers, ctypes.POINTER(K.ELayer))
        self.desc = m
        self.ref = ctypes.byref(m)
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._scratch_key = (0, 0, 0)

    @classmethod
    def build(cls, model: nn.Module, pool, block: type, attention: type, mlp: type) -> FusedDecoder | None:
        """The fused step for `model` if every layer is exactly a `block` of `attention` and `mlp` (the
        classes the native code implements); None otherwise."""
        from edgellm.models.base import RMSNorm
        from edgellm.quantization import kernels as K
        from edgellm.quantization.layers import QuantLinear

        lib = K.library()
        if lib is None or pool.dtype not in KV_KINDS:
            return None
        cfg = model.cfg
        if (cfg.attn_softcap is not None or cfg.rot_dim % 2 or cfg.rot_dim > 512 or cfg.head_dim > 512
                or cfg.num_heads % cfg.num_kv_heads or str(model.rope.cos.device) != "cpu"):
            return None
        keep: list = []

        def linear(mod: nn.Module):
            if isinstance(mod, QuantLinear):
                return mod.packed if mod.packed is not None and mod.packed.fmt in (4, 8) else None
            if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.device.type == "cpu":
                return K.PackedWeight.from_float(mod.weight, mod.bias)
            return None

        def norm(mod) -> int | None:
            if type(mod) is not RMSNorm or mod.offset or mod.eps != model.model.layers[0].input_layernorm.eps:
                return None
            w = mod.weight.detach().float().contiguous()
            keep.append(w)
            return w.data_ptr()

        layers = (K.ELayer * cfg.num_layers)()
        windows = []
        for i, blk in enumerate(model.model.layers):
            if (type(blk) is not block or type(blk.self_attn) is not attention
                    or type(blk.mlp) is not mlp or blk.mlp.act is not torch.nn.functional.silu):
                return None
            at = blk.self_attn
            parts = [linear(at.qkv_proj), linear(at.o_proj), linear(blk.mlp.gate_up_proj), linear(blk.mlp.down_proj)]
            ptrs = [norm(blk.input_layernorm), norm(blk.post_attention_layernorm)]
            if any(p is None for p in parts + ptrs):
                return None
            if cfg.qk_norm:
                qn, kn = norm(at.q_norm), norm(at.k_norm)
                if qn is None or kn is None:
                    return None
            else:
                qn = kn = None
            keep.extend(parts)
            e = layers[i]
            e.ln1, e.ln2, e.qn, e.kn = ptrs[0], ptrs[1], qn, kn
            e.qkv, e.o, e.gu, e.down = (p.desc for p in parts)
            windows.append(at.window)
        return cls(model, pool, lib, layers, keep, windows)

    def _scratch_for(self, b: int, maxkeys: int, nt: int) -> torch.Tensor:
        key = (b, maxkeys, nt)
        if any(k > s for k, s in zip(key, self._scratch_key)):
            key = tuple(max(k, s) for k, s in zip(key, self._scratch_key))
            key = (key[0], max(key[1] * 5 // 4, 256), key[2])
            size = self.lib.el_decode_scratch_bytes(self.ref, *key)
            self._scratch = torch.empty(size, dtype=torch.uint8)
            self._scratch_key = key
        return self._scratch

    def __call__(self, chunks) -> torch.Tensor:
        """Logits [B, vocab] of one decode step: `chunks` are the engine's, one new token per sequence."""
        model, pool, L = self.model, self.pool, self.L
        b = len(chunks)
        starts = [c.start for c in chunks]
        if max(starts) >= self.desc.maxpos:
            raise ValueError(f"position {max(starts)} is beyond the model's {self.desc.maxpos} positions")
        ids = torch.tensor([_token_at(c.seq, c.start) for c in chunks], dtype=torch.long)
        pos = torch.tensor(starts, dtype=torch.int64)
        h = model.embed(ids).float().contiguous()
        n = L * b
        kp, vp = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)()
        cap, widx, kfrom = (ctypes.c_int32 * n)(), (ctypes.c_int32 * n)(), (ctypes.c_int32 * n)()
        for j, c in enumerate(chunks):
            kv = pool.seqs[c.seq.slot]
            start = c.start
            for layer in range(L):
                i = layer * b + j
                k, base, w = kv.k[layer], kv.base[layer], self.windows[layer]
                kp[i], vp[i] = k.data_ptr(), kv.v[layer].data_ptr()
                cap[i] = k.shape[1]
                widx[i] = start - base
                kfrom[i] = 0 if w is None else max(base, start - w + 1) - base
        nt = self.K.threads()
        scratch = self._scratch_for(b, max(starts) + 1, nt)
        self.lib.el_decode(self.ref, b, pos.data_ptr(), h.data_ptr(), kp, vp, cap, widx, kfrom, scratch.data_ptr(),
                           self._scratch_key[1], nt, KV_KINDS[pool.dtype])
        return model.logits(model.model.norm(h)).float()


def _token_at(seq, i: int) -> int:
    n = len(seq.prompt_ids)
    return seq.prompt_ids[i] if i < n else seq.output_ids[i - n]

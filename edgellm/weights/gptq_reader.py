"""Pre-quantized HF checkpoints (GPTQ, AWQ) read back as float weights, ready to requantize.

GPTQ: `qweight` int32 [K*bits/32, N] packed along K (value j of a word at bits*j), `qzeros` int32
[G, N*bits/32] packed along N, `scales` [G, N], optional `g_idx` [K] (act-order groups). The
original "gptq" checkpoint format stores zero points minus one; "gptq_v2" stores them as is.
AWQ (GEMM): `qweight` and `qzeros` int32 [K, N/8] / [G, N/8] packed along N with the nibble order
(0, 2, 4, 6, 1, 3, 5, 7). Both dequantize as w[k, n] = (q - zero) * scale, transposed to HF's [N, K].

With `keep=True` (quantization q4f16_awq) an AWQ linear is not dequantized: it comes out as our
layout of the same numbers, `<prefix>.q_weight` (int32 [N, K/8], codes along K, lowest nibble
first), `<prefix>.q_scale` [N, G] and `<prefix>.q_zero` [N, G] (float16, integer values).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from edgellm.errors import UserError
from edgellm.quantization.modes import get_mode
from edgellm.quantization.pack import pack_codes
from edgellm.weights.hf_reader import SafetensorsSource, TorchBinSource, detect_format

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i]
PARTS = ("qweight", "qzeros", "scales", "g_idx")
KEPT = (".q_weight", ".q_scale", ".q_zero")  # what an AWQ linear becomes with keep=True


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along rows -> [R * 32/bits, C] values (value j of a word -> row j)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    vals = (packed.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)
    return vals.reshape(packed.shape[0] * per, packed.shape[1])


def _unpack_cols(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, C] packed along columns -> [R, C * 32/bits]."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    vals = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, C, per]; nibble i
    if order is not None:
        inverse = [order.index(c) for c in range(per)]  # column c sits in nibble inverse[c]
        vals = vals[..., inverse]
    return vals.reshape(packed.shape[0], -1)


def dequantize_gptq(parts: dict[str, torch.Tensor], bits: int, group_size: int, zero_offset: int) -> torch.Tensor:
    q = _unpack_rows(parts["qweight"], bits)  # [K, N]
    k = q.shape[0]
    zeros = _unpack_cols(parts["qzeros"], bits)[:, : q.shape[1]] + zero_offset  # [G, N]
    scales = parts["scales"].float()
    g = parts["g_idx"].long() if "g_idx" in parts else torch.arange(k) // (group_size if group_size > 0 else k)
    w = (q - zeros[g]).float() * scales[g]
    return w.t().contiguous()


def dequantize_awq(parts: dict[str, torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    q = _unpack_cols(parts["qweight"], bits, AWQ_ORDER)  # [K, N]
    zeros = _unpack_cols(parts["qzeros"], bits, AWQ_ORDER)  # [G, N]
    g = torch.arange(q.shape[0]) // group_size
    w = (q - zeros[g]).float() * parts["scales"].float()[g]
    return w.t().contiguous()


class PrequantizedSource:
    """Tensors of a GPTQ/AWQ checkpoint; quantized linears come out as float `<prefix>.weight`."""

    def __init__(self, base, hf_cfg: dict, fmt: str, keep: bool = False):
        qc = hf_cfg.get("quantization_config") or {}
        method = str(qc.get("quant_method", fmt)).lower()
        if method != fmt:
            raise UserError(f"--source-format {fmt} but config.json says quant_method {method!r}")
        self.base, self.fmt = base, fmt
        self.bits = int(qc.get("bits", qc.get("w_bit", 4)))
        self.group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
        if self.bits not in (2, 4, 8) or (fmt == "awq" and self.bits != 4):
            raise UserError(f"{fmt} checkpoints with {self.bits}-bit weights are not supported")
        if fmt == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
            raise UserError(f"AWQ version {qc.get('version')!r} is not supported (only GEMM)")
        if keep and fmt != "awq":
            raise UserError(f"q4f16_awq keeps an AWQ checkpoint's own codes; this is a {fmt} checkpoint "
                            "(use q4f16_1, which requantizes it)")
        self.keep = keep
        self.zero_offset = 0 if str(qc.get("checkpoint_format", "gptq")).lower() == "gptq_v2" else 1

    def _prefix(self, name: str) -> tuple[str, str] | None:
        head, _, leaf = name.rpartition(".")
        return (head, leaf) if leaf in PARTS else None

    def names(self) -> list[str]:
        out = []
        for n in self.base.names():
            p = self._prefix(n)
            if p is None:
                out.append(n)
            elif p[1] == "qweight":
                out += [p[0] + s for s in KEPT] if self.keep else [p[0] + ".weight"]
        return out

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        needed = ("qweight", "qzeros", "scales")
        for name, t in self.base.iter_tensors():
            p = self._prefix(name)
            if p is None:
                yield name, t
                continue
            parts = pending.setdefault(p[0], {})
            parts[p[1]] = t
            if all(k in parts for k in needed) and (self.fmt == "awq" or "g_idx" in parts
                                                    or not self._has_g_idx(p[0])):
                del pending[p[0]]
                yield from self._out(p[0], parts)
        for prefix, parts in pending.items():
            if not all(k in parts for k in needed):
                raise UserError(f"{prefix}: incomplete {self.fmt} tensors (have {', '.join(sorted(parts))})")
            yield from self._out(prefix, parts)

    def _out(self, prefix: str, parts: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.keep:
            yield prefix + ".weight", self._dequantize(parts)
            return
        q = _unpack_cols(parts["qweight"], self.bits, AWQ_ORDER).t()  # [N, K] codes 0..15
        n, k = q.shape
        if k % self.group_size or parts["scales"].shape != (k // self.group_size, n):
            raise UserError(f"{prefix}: AWQ scales {list(parts['scales'].shape)} do not fit a [{k}, {n}] "
                            f"weight in groups of {self.group_size}")
        words = pack_codes(q.to(torch.uint8).contiguous(), get_mode("q4f16_awq"))
        zeros = _unpack_cols(parts["qzeros"], self.bits, AWQ_ORDER)[:, :n].t()
        yield prefix + ".q_weight", words
        yield prefix + ".q_scale", parts["scales"].t().to(torch.float16).contiguous()
        yield prefix + ".q_zero", zeros.to(torch.float16).contiguous()

    def _has_g_idx(self, prefix: str) -> bool:
        if not hasattr(self, "_gidx"):
            self._gidx = {n.rpartition(".")[0] for n in self.base.names() if n.endswith(".g_idx")}
        return prefix in self._gidx

    def _dequantize(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.fmt == "awq":
            return dequantize_awq(parts, self.bits, self.group_size)
        return dequantize_gptq(parts, self.bits, self.group_size, self.zero_offset)


def open_prequantized(model_dir: Path, hf_cfg: dict, fmt: str, keep: bool = False) -> PrequantizedSource:
    if detect_format(model_dir) == "huggingface-safetensor":
        base = SafetensorsSource(model_dir)
    else:
        base = TorchBinSource(model_dir)
    return PrequantizedSource(base, hf_cfg, fmt, keep)

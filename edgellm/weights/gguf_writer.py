"""export-gguf: a converted model directory -> one GGUF file for llama.cpp, Ollama or LM Studio.

Hyperparameters and tensor names come from the family's GGUF hooks (models/gguf_hooks.py), the
vocabulary from gguf_vocab.py. Weights stream tensor by tensor: a quantized tensor of ours is
re-packed into the GGUF type directly where the codes carry over exactly (q4f16_1 -> Q4_0 / Q8_0,
q8f16_1 -> Q8_0; docs/formats.md lists every pair), else it is dequantized and quantized again.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType, LlamaFileType
from tqdm import tqdm

from edgellm.config import load_chat_config
from edgellm.errors import UserError
from edgellm.models.gguf_hooks import rope_tensors
from edgellm.models.loader import arch_config, build_model, expected_tensors
from edgellm.models.mapping import from_disk_name
from edgellm.models.registry import get_family
from edgellm.quantization.modes import QuantMode, get_mode
from edgellm.quantization.pack import dequantize, unpack
from edgellm.weights.gguf_vocab import tokenizer_metadata
from edgellm.weights.tensor_cache import find_manifest, read_tensors

EXPORT_TYPES = {"q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "q8_0": QT.Q8_0, "f16": QT.F16, "f32": QT.F32}
_FILE_TYPES = {QT.F32: LlamaFileType.ALL_F32, QT.F16: LlamaFileType.MOSTLY_F16, QT.Q4_0: LlamaFileType.MOSTLY_Q4_0,
               QT.Q4_1: LlamaFileType.MOSTLY_Q4_1, QT.Q8_0: LlamaFileType.MOSTLY_Q8_0}
_BLOCK = 32  # Q4_0 / Q4_1 / Q8_0 block length


def default_type(mode: QuantMode) -> str:
    """The export type nearest to a quantization mode (exact where one exists)."""
    if not mode.quantized:
        return "f32" if mode.model_dtype == torch.float32 else "f16"
    return "q8_0" if mode.kind == "int8" else "q4_0"


def _q4_exact(mode: QuantMode) -> bool:
    # q4f16_1 / q4f32_1 / q4f16_2: symmetric 4-bit codes 0..14, w = (q - 7) * scale, groups of 32.
    return mode.kind == "group" and mode.bits == 4 and mode.group_size == _BLOCK and mode.max_int == 7


def _q8_exact(mode: QuantMode) -> bool:
    return mode.kind == "int8" and mode.group_size == _BLOCK


@dataclass
class _Piece:
    """One GGUF tensor: rows of one of our tensors, in a GGUF type."""

    gguf_name: str
    ours: str
    rows: torch.Tensor | None
    shape: tuple[int, ...]  # numpy order (rows, columns)
    qtype: QT

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.shape[-1] // block * size


class _Ours:
    """One of our tensors as stored: plain float, or (codes, scales) of a quantized mode."""

    def __init__(self, name: str, shape: tuple[int, ...], mode: QuantMode | None,
                 plain: torch.Tensor | None = None, q_weight: torch.Tensor | None = None,
                 q_scale: torch.Tensor | None = None):
        self.name, self.shape, self.mode = name, shape, mode
        self.plain, self.q_weight, self.q_scale = plain, q_weight, q_scale

    @property
    def quantized(self) -> bool:
        return self.q_weight is not None

    def floats(self, rows: torch.Tensor | None) -> np.ndarray:
        if not self.quantized:
            t = self.plain if rows is None else self.plain[rows]
            return t.float().numpy()
        qw, qs = (self.q_weight, self.q_scale) if rows is None else (self.q_weight[rows], self.q_scale[rows])
        return dequantize(qw, qs, self.mode, self.shape[1], torch.float32).numpy()

    def codes_scales(self, rows: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        """(codes uint8 / int8 [N, K], scales float32 [N, groups])."""
        qw, qs = (self.q_weight, self.q_scale) if rows is None else (self.q_weight[rows], self.q_scale[rows])
        if self.mode.kind == "int8":
            return qw.numpy(), qs.float().numpy()
        if self.mode.bits == 4 and sys.byteorder == "little":
            # Each byte of the little-endian words holds two codes, the low nibble first.
            b = qw.contiguous().numpy().view(np.uint8)
            codes = np.empty((b.shape[0], b.shape[1] * 2), np.uint8)
            codes[:, 0::2], codes[:, 1::2] = b & 15, b >> 4
            return codes, qs.float().numpy()
        return unpack(qw, self.mode).numpy().astype(np.uint8), qs.float().numpy()


def _blocks(head: list[np.ndarray], qs: np.ndarray) -> np.ndarray:
    """Per-block header fields (each [N, G] float -> fp16 bytes) + payload [N, G, B] -> uint8 [N, G * size]."""
    parts = [h.astype(np.float16).view(np.uint8).reshape(*h.shape, 2) for h in head] + [qs]
    out = np.concatenate(parts, axis=-1)
    return out.reshape(out.shape[0], -1)


def _nibbles(n: np.ndarray) -> np.ndarray:
    # ggml's Q4 layout: byte j of a block holds value j (low nibble) and value j + 16 (high nibble).
    return n[..., :16] | (n[..., 16:] << 4)


def _encode(t: _Ours, piece: _Piece) -> np.ndarray:
    """The bytes (or float array) of one GGUF tensor."""
    q, rows = piece.qtype, piece.rows
    if q in (QT.F32, QT.F16):
        arr = t.floats(rows)
        return arr.astype(np.float32 if q == QT.F32 else np.float16)
    if t.quantized and (_q4_exact(t.mode) or (q == QT.Q8_0 and _q8_exact(t.mode))):
        codes, scales = t.codes_scales(rows)
        n, g = scales.shape
        codes = codes.reshape(n, g, _BLOCK)
        if _q8_exact(t.mode):
            return _blocks([scales], codes.view(np.uint8))
        if q == QT.Q4_0:  # w = (q - 7) * s = ((q + 1) - 8) * d with d = s
            return _blocks([scales], _nibbles(codes + np.uint8(1)))
        if q == QT.Q8_0:  # w = (q - 7) * s
            return _blocks([scales], (codes.astype(np.int8) - np.int8(7)).view(np.uint8))
        # Q4_1: w = q * d + m with d = s, m = -7 s (m rounded to fp16)
        return _blocks([scales, -7.0 * scales], _nibbles(codes))
    return gguf.quants.quantize(np.ascontiguousarray(t.floats(rows), dtype=np.float32), q)


def _value_type(value: Any) -> GGUFValueType:
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    return GGUFValueType.STRING


def _add_metadata(writer: gguf.GGUFWriter, arch_name: str, meta: dict[str, Any]) -> None:
    for key, value in meta.items():
        key = key.format(arch=arch_name)
        if key == gguf.Keys.Tokenizer.CHAT_TEMPLATE:
            writer.add_chat_template(value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, _value_type(value))


def _manifest_order(model_dir: Path, family) -> list[str]:
    """Our tensor names in the order read_tensors completes them (a quantized one at its last part)."""
    manifest = json.loads(find_manifest(model_dir).read_text())
    done: dict[str, None] = {}
    seen: dict[str, int] = {}
    for shard in manifest["records"]:
        for rec in shard["records"]:
            name = from_disk_name(family, rec["name"])
            for suffix in (".q_weight", ".q_scale"):
                if name.endswith(suffix):
                    base = name[: -len(suffix)] + ".weight"
                    seen[base] = seen.get(base, 0) + 1
                    if seen[base] == 2:
                        done[base] = None
                    break
            else:
                done[name] = None
    return list(done)


def export_gguf(model_dir: str | os.PathLike, output: str | os.PathLike, gguf_type: str | None = None, *,
                force: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Write `output` (.gguf) from a converted model directory; returns a summary of what was written."""
    model_dir, output = Path(model_dir), Path(output)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such model directory")
    cfg = load_chat_config(model_dir)
    family = get_family(cfg.model_type)
    mode = get_mode(cfg.quantization)
    if mode.zero_points:
        raise UserError(f"{model_dir} is {mode.name}: export-gguf does not take AWQ zero points yet; convert the "
                        "AWQ checkpoint with q4f16_1 (requantized) and export that")
    arch = arch_config(cfg, family)
    gguf_type = gguf_type or default_type(mode)
    if gguf_type not in EXPORT_TYPES:
        raise UserError(f"GGUF type {gguf_type!r} is not supported (supported: {', '.join(EXPORT_TYPES)})")
    target = EXPORT_TYPES[gguf_type]
    if output.exists() and not force:
        raise UserError(f"{output} already exists; choose another name or pass --force")
    if output.exists() and output.is_dir():
        raise UserError(f"{output} is a directory; give a file name such as model.gguf")

    want = expected_tensors(build_model(family, arch, mode, 1))
    names = family.gguf_export_names(arch)
    order = [n for n in _manifest_order(model_dir, family) if n in want]
    missing = [n for n in want if n not in order]
    if missing:
        raise UserError(f"{model_dir}: weights lack {missing[0]} ({len(missing)} tensors missing)")
    output_required = getattr(family, "GGUF_OUTPUT_REQUIRED", False) and arch.tie_word_embeddings
    pieces: dict[str, list[_Piece]] = {}
    for name in order:
        base, _, suffix = name.rpartition(".")
        shape, kind = want[name]
        targets = names.get(base)
        if targets is None:
            raise UserError(f"{cfg.model_type}: tensor {name} has no GGUF name")  # a gap in the family's hooks
        out = []
        for gguf_base, rows in targets:
            rshape = (len(rows) if rows is not None else shape[0], *shape[1:])
            qtype = QT.F32
            if len(rshape) == 2:
                # A mode's quantized tensors take the asked type; those it leaves in float (q4f16_2's
                # embedding) stay float16. Rows not made of whole blocks fall back to F16, as in llama.cpp.
                quantizing = target not in (QT.F32, QT.F16)
                qtype = target if kind == "quant" or not mode.quantized or not quantizing else QT.F16
                if qtype not in (QT.F32, QT.F16) and rshape[1] % _BLOCK:
                    qtype = QT.F16
            out.append(_Piece(f"{gguf_base}.{suffix}", name, rows, rshape, qtype))
        if output_required and targets[0][0] == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD]:
            out.append(_Piece(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight", name, None, shape,
                              out[0].qtype))
        pieces[name] = out

    writer = gguf.GGUFWriter(None, family.GGUF_ARCH)
    writer.add_name(model_dir.resolve().name)
    writer.add_file_type(int(_FILE_TYPES[target]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_metadata(writer, family.GGUF_ARCH, family.gguf_metadata(arch, cfg.model_config))
    _add_metadata(writer, family.GGUF_ARCH, tokenizer_metadata(model_dir, cfg, arch.vocab_size))
    extra = rope_tensors(arch)
    for gname, arr in extra.items():
        writer.add_tensor_info(gname, arr.shape, arr.dtype, arr.nbytes)
    for name in order:
        for p in pieces[name]:
            writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.partial-", dir=output.parent)
    os.close(fd)
    counts: dict[str, int] = {}
    bar = tqdm(total=sum(len(p) for p in pieces.values()) + len(extra), desc="Exporting", unit="tensor",
               disable={None: None, True: False, False: True}[progress], dynamic_ncols=True)
    try:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for arr in extra.values():
            writer.write_tensor_data(arr)
            bar.update(1)
        for name, tensor in _stream(model_dir, family, mode, want):
            for p in pieces.get(name, []):
                data = _encode(tensor, p)
                if data.nbytes != p.nbytes:
                    raise RuntimeError(f"{p.gguf_name}: {data.nbytes} bytes, expected {p.nbytes}")
                writer.write_tensor_data(data)
                counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
                bar.update(1)
            del tensor
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        bar.leave = False
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return {"architecture": family.GGUF_ARCH, "type": gguf_type, "tensors": sum(counts.values()) + len(extra),
            "types": counts, "bytes": output.stat().st_size}


def _stream(model_dir: Path, family, mode: QuantMode, want: dict):
    """(our name, _Ours) as read_tensors completes each tensor (a quantized one needs both its parts)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for disk_name, t in read_tensors(model_dir):
        name = from_disk_name(family, disk_name)
        for suffix in (".q_weight", ".q_scale"):
            if name.endswith(suffix):
                base = name[: -len(suffix)] + ".weight"
                got = pending.setdefault(base, {})
                got[suffix] = t
                if len(got) == 2:
                    del pending[base]
                    if base not in want:  # a tied model's spare lm_head copy
                        break
                    yield base, _Ours(base, want[base][0], mode, q_weight=got[".q_weight"], q_scale=got[".q_scale"])
                break
        else:
            if name in want:
                yield name, _Ours(name, tuple(t.shape), None, plain=t)

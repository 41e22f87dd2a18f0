"""The converted-weights format: params_shard_*.bin + tensor-cache.json (MLC-LLM's layout).

Writing streams tensors straight into ~32 MB shard files while hashing them; reading checks
each shard's size and md5 once, then returns tensors, memory-mapped if asked.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from edgellm.errors import CorruptWeightsError, UserError
from edgellm.validation import validate
from edgellm.weights.safe_path import inside

SHARD_BYTES = 32 * 1024 * 1024
CACHE_NAMES = ("tensor-cache.json", "ndarray-cache.json")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint32": torch.int32,  # same bytes; kernels treat words as bit patterns
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.int8: "int8", torch.uint8: "uint8"}


def dtype_name(t: torch.Tensor, packed: bool = False) -> str:
    return "uint32" if packed else _DTYPE_NAMES[t.dtype]


class ShardWriter:
    """Appends tensors to params_shard_N.bin files and writes tensor-cache.json on close."""

    def __init__(self, out_dir: Path, shard_bytes: int | None = None):
        # SHARD_BYTES is read at call time so it can be changed (tests, tuning).
        self.out_dir, self.shard_bytes = out_dir, shard_bytes or SHARD_BYTES
        self.shards: list[dict] = []
        self._file = None
        self._md5 = None
        self.param_count = 0
        self.param_bytes = 0

    def _new_shard(self) -> None:
        self._close_shard()
        name = f"params_shard_{len(self.shards)}.bin"
        self._file = open(self.out_dir / name, "wb")
        self._md5 = hashlib.md5()
        self.shards.append({"dataPath": name, "format": "raw-shard", "nbytes": 0, "records": []})

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1]["md5sum"] = self._md5.hexdigest()
            self._file = None

    def add(self, name: str, tensor: torch.Tensor, dtype: str, logical_numel: int | None = None) -> None:
        data = tensor.detach().contiguous().cpu()
        # A view of the tensor's bytes (no copy: a quantized embedding is ~100 MB).
        raw = memoryview(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else memoryview(b"")
        used = self.shards[-1]["nbytes"] if self.shards else 0
        pad = -used % 16  # aligned records can be viewed in place when memory-mapped
        if not self.shards or (used and used + pad + len(raw) > self.shard_bytes):
            self._new_shard()
            pad = 0
        shard = self.shards[-1]
        if pad:
            self._file.write(b"\0" * pad)
            self._md5.update(b"\0" * pad)
            shard["nbytes"] += pad
        shard["records"].append({"name": name, "shape": list(data.shape), "dtype": dtype,
                                 "format": "raw", "nbytes": len(raw),
                                 "byteOffset": shard["nbytes"]})
        self._file.write(raw)
        self._md5.update(raw)
        shard["nbytes"] += len(raw)
        self.param_count += logical_numel if logical_numel is not None else data.numel()
        self.param_bytes += len(raw)

    def close(self, extra: dict | None = None) -> dict:
        self._close_shard()
        meta = {"ParamSize": self.param_count, "ParamBytes": self.param_bytes,
                "BitsPerParam": round(8.0 * self.param_bytes / max(self.param_count, 1), 4), **(extra or {})}
        manifest = {"metadata": meta, "records": self.shards}
        text = json.dumps(manifest, indent=1)
        for name in CACHE_NAMES:  # older MLC runtimes and apps only know ndarray-cache.json
            (self.out_dir / name).write_text(text, encoding="utf-8")
        return manifest


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int] = Field(max_length=8)
    dtype: str
    nbytes: int = Field(ge=0)
    byteOffset: int = Field(ge=0)  # noqa: N815 - MLC's key


class _Shard(BaseModel):
    model_config = ConfigDict(extra="allow")
    dataPath: str  # noqa: N815
    nbytes: int = Field(ge=0)
    records: list[_Record]
    md5sum: str | None = None


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    records: list[_Shard]


def load_manifest(model_dir: Path) -> dict:
    """tensor-cache.json, checked: its shape, unique record names, shards named inside `model_dir`."""
    path = find_manifest(model_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must be a JSON object with 'records', not {type(data).__name__}")
    validate(_Manifest, data, path)
    seen: set[str] = set()
    for i, shard in enumerate(data["records"]):
        inside(model_dir, shard["dataPath"], f"{path.name} records[{i}].dataPath", must_exist=False)
        for rec in shard["records"]:
            if any(d < 0 for d in rec["shape"]):
                raise UserError(f"{path}: tensor {rec['name']} has a negative dimension {rec['shape']}")
            if rec["name"] in seen:
                raise UserError(f"{path}: tensor {rec['name']} is listed twice")
            seen.add(rec["name"])
    return data


def find_manifest(model_dir: Path) -> Path:
    for name in CACHE_NAMES:
        if (model_dir / name).exists():
            return model_dir / name
    raise UserError(f"{model_dir} has no tensor-cache.json or ndarray-cache.json (not a converted model)")


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_shards(model_dir: Path, manifest: dict) -> None:
    """Check every shard's size and md5 once; a stamp file remembers shards already checked."""
    stamp_path = model_dir / ".edgellm-verified.json"
    try:
        stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
    except (OSError, ValueError):
        stamp = {}
    changed = False
    for shard in manifest["records"]:
        path = inside(model_dir, shard["dataPath"], "tensor-cache.json dataPath", must_exist=False)
        if not path.exists():
            raise CorruptWeightsError(f"shard {shard['dataPath']} is missing from {model_dir}")
        st = path.stat()
        key = f"{shard['dataPath']}:{st.st_size}:{st.st_mtime_ns}"
        if stamp.get(shard["dataPath"]) == key:
            continue
        if st.st_size != shard["nbytes"]:
            raise CorruptWeightsError(
                f"shard {shard['dataPath']} is corrupted or truncated: {st.st_size} bytes, "
                f"expected {shard['nbytes']}")
        if shard.get("md5sum") and _file_md5(path) != shard["md5sum"]:
            raise CorruptWeightsError(f"shard {shard['dataPath']} is corrupted: md5 mismatch")
        stamp[shard["dataPath"]] = key
        changed = True
    if changed:
        try:
            stamp_path.write_text(json.dumps(stamp))
        except OSError:
            pass  # read-only model directory: verify again next time


def read_tensors(model_dir: Path, use_mmap: bool = False, verify: bool = True
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every record; mmap'd tensors share the shard's pages (read-only)."""
    manifest = load_manifest(model_dir)
    if verify:
        verify_shards(model_dir, manifest)
    for shard in manifest["records"]:
        path = inside(model_dir, shard["dataPath"], "tensor-cache.json dataPath", must_exist=False)
        # The size check is cheap, so it runs even without verify: a truncated shard is named,
        # never read as garbage (md5 is only checked when verifying).
        size = path.stat().st_size if path.is_file() else None
        if size is None:
            raise CorruptWeightsError(f"shard {shard['dataPath']} is missing from {model_dir}")
        if size != shard["nbytes"]:
            raise CorruptWeightsError(f"shard {shard['dataPath']} is corrupted or truncated: {size} bytes, "
                                      f"expected {shard['nbytes']}")
        if shard["nbytes"] == 0:
            buf = np.zeros(0, dtype=np.uint8)
        elif use_mmap:
            buf = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: never touches the file
        else:
            buf = np.fromfile(path, dtype=np.uint8)
        for rec in shard["records"]:
            dtype = DTYPES.get(rec["dtype"])
            if dtype is None:
                raise UserError(f"{rec['name']}: unsupported dtype {rec['dtype']!r} in {path.name}")
            off, n = rec["byteOffset"], rec["nbytes"]
            bf16 = rec["dtype"] == "float32" and rec.get("format") == "f32-to-bf16"
            numel = math.prod(rec["shape"])
            if off < 0 or off + n > len(buf) or n != numel * (2 if bf16 else dtype.itemsize):
                raise CorruptWeightsError(f"{rec['name']}: its record (offset {off}, {n} bytes, shape "
                                          f"{rec['shape']}) does not fit shard {shard['dataPath']}")
            raw = buf[off:off + n]
            if bf16:
                # MLC-LLM stores float32 as the top 16 bits (bfloat16) of each value.
                half = torch.from_numpy(raw.copy()).view(torch.bfloat16).reshape(rec["shape"])
                yield rec["name"], half.float()
                continue
            if off % dtype.itemsize:
                raw = raw.copy()  # misaligned record (other writers pack tightly)
            t = torch.from_numpy(raw).view(dtype).reshape(rec["shape"])
            yield rec["name"], t if use_mmap else t.clone()
        del buf


def total_bytes(model_dir: Path) -> int:
    manifest = load_manifest(model_dir)
    return sum(s["nbytes"] for s in manifest["records"])


def is_converted_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in CACHE_NAMES) and \
        (path / "mlc-chat-config.json").exists()


def remove_shards(out_dir: Path) -> None:
    for p in out_dir.glob("params_shard_*.bin"):
        os.remove(p)

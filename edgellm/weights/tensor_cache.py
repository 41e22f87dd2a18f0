"""The converted-weights format: params_shard_*.bin + tensor-cache.json (MLC-LLM's layout).

Writing streams tensors straight into ~32 MB shard files while hashing them; reading checks
each shard's size and md5 once, then returns tensors, memory-mapped if asked.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from edgellm.errors import CorruptWeightsError, UserError

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

    def __init__(self, out_dir: Path, shard_bytes: int = SHARD_BYTES):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
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
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        if not self.shards or (self.shards[-1]["nbytes"] and
                               self.shards[-1]["nbytes"] + len(raw) > self.shard_bytes):
            self._new_shard()
        shard = self.shards[-1]
        pad = -shard["nbytes"] % 16  # aligned records can be viewed in place when memory-mapped
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

    def close(self) -> dict:
        self._close_shard()
        meta = {"ParamSize": self.param_count, "ParamBytes": self.param_bytes,
                "BitsPerParam": round(8.0 * self.param_bytes / max(self.param_count, 1), 4)}
        manifest = {"metadata": meta, "records": self.shards}
        with open(self.out_dir / "tensor-cache.json", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        return manifest


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
        path = model_dir / shard["dataPath"]
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
    manifest = json.loads(find_manifest(model_dir).read_text())
    if verify:
        verify_shards(model_dir, manifest)
    for shard in manifest["records"]:
        path = model_dir / shard["dataPath"]
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
            raw = buf[off:off + n]
            if off % dtype.itemsize:
                raw = raw.copy()  # misaligned record (other writers pack tightly)
            t = torch.from_numpy(raw).view(dtype).reshape(rec["shape"])
            yield rec["name"], t if use_mmap else t.clone()
        del buf


def total_bytes(model_dir: Path) -> int:
    manifest = json.loads(find_manifest(model_dir).read_text())
    return sum(s["nbytes"] for s in manifest["records"])


def is_converted_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in CACHE_NAMES) and \
        (path / "mlc-chat-config.json").exists()


def remove_shards(out_dir: Path) -> None:
    for p in out_dir.glob("params_shard_*.bin"):
        os.remove(p)

"""Hugging Face checkpoints: safetensors (single or sharded) and PyTorch .bin files."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from edgellm.errors import UserError
from edgellm.weights.safe_path import inside


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def _shard_files(model_dir: Path, single: str, index: str) -> list[Path]:
    if (model_dir / index).exists():
        data = read_json(model_dir / index)
        weight_map = (data.get("weight_map") if isinstance(data, dict) else None) or {}
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{model_dir / index}: weight_map must be an object of tensor name -> file name")
        files = list(dict.fromkeys(weight_map.values()))
        paths = [inside(model_dir, f, f"{index} weight_map", must_exist=False) for f in files]
        missing = [f for f, p in zip(files, paths) if not p.exists()]
        if missing:
            raise UserError(f"{model_dir / index} lists {missing[0]}, which does not exist")
        return [model_dir / f for f in files]
    if (model_dir / single).exists():
        return [model_dir / single]
    return []


_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _safetensors_entries(path: Path) -> dict[str, tuple[int, int, torch.dtype, list[int]]]:
    """name -> (absolute byte offset, byte count, dtype, shape) from a safetensors header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise UserError(f"{path} is truncated or not a safetensors file ({e})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise UserError(f"{path}: tensor {name} has dtype {info.get('dtype')}, which edgellm cannot read")
        begin, end = info["data_offsets"]
        out[name] = (8 + n + begin, end - begin, dtype, list(info["shape"]))
    return out


class SafetensorsSource:
    """Tensors of `model.safetensors` or the shards in `model.safetensors.index.json`."""

    format = "huggingface-safetensor"

    def __init__(self, model_dir: Path, files: list[Path] | None = None):
        self.model_dir = model_dir
        self.files = files or _shard_files(model_dir, "model.safetensors", "model.safetensors.index.json")
        if not self.files:
            self.files = sorted(model_dir.glob("*.safetensors"))
        if not self.files:
            raise UserError(f"no .safetensors files in {model_dir}")
        self._names: dict[str, Path] = {}
        self._entries: dict[str, tuple[int, int, torch.dtype, list[int]]] = {}
        for path in self.files:
            names = self._open(path).keys()  # validates the header against the file size
            entries = _safetensors_entries(path)
            for name in names:
                self._names[name] = path
                self._entries[name] = entries[name]

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is truncated or not a safetensors file ({e})") from None

    def names(self) -> list[str]:
        return list(self._names)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, path in self._names.items():
            # Read with plain read() into the tensor's own buffer, not through a file mapping:
            # mapped pages count in resident memory, which would double the peak (the
            # mapping and the copy) on the largest tensor, e.g. a 150k-row embedding.
            offset, nbytes, dtype, shape = self._entries[name]
            buf = torch.empty(nbytes, dtype=torch.uint8)
            view = memoryview(buf.numpy())
            try:
                with open(path, "rb", buffering=0) as f:
                    f.seek(offset)
                    got = 0
                    while got < nbytes:
                        n = f.readinto(view[got:])
                        if not n:
                            break
                        got += n
            except OSError as e:
                raise UserError(f"cannot read tensor {name} from {path}: {e.strerror}") from None
            if got != nbytes:
                raise UserError(f"{path} is truncated: tensor {name} needs {nbytes} bytes at offset "
                                f"{offset}, found {got}")
            tensor = buf.view(dtype).reshape(shape)
            del view, buf
            yield name, tensor
            del tensor  # before reading the next one (e.g. lm_head then the embedding)


class TorchBinSource:
    """Tensors of `pytorch_model.bin` (or its shards), loaded with weights_only=True."""

    format = "huggingface-torch"

    def __init__(self, model_dir: Path, files: list[Path] | None = None):
        self.model_dir = model_dir
        self.files = files or _shard_files(model_dir, "pytorch_model.bin", "pytorch_model.bin.index.json")
        if not self.files:
            self.files = sorted(model_dir.glob("*.bin")) + sorted(model_dir.glob("*.pt"))
        if not self.files:
            raise UserError(f"no pytorch_model.bin files in {model_dir}")
        self._names: list[str] = []
        for path in self.files:
            self._names.extend(self._load(path).keys())

    @staticmethod
    def _load(path: Path) -> dict[str, torch.Tensor]:
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, unsafe globals, truncated zip
            raise UserError(f"cannot load {path} safely (weights_only=True): {str(e).splitlines()[0]}") \
                from None
        if not isinstance(sd, dict):
            raise UserError(f"{path} does not hold a state dict")
        return sd

    def names(self) -> list[str]:
        return list(self._names)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path in self.files:
            sd = self._load(path)
            for name in list(sd):
                yield name, sd.pop(name)
            del sd


def hf_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise UserError(f"{model_dir} has no config.json")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: must be a JSON object, not {type(cfg).__name__}")
    return cfg


def detect_format(model_dir: Path) -> str:
    names = os.listdir(model_dir)
    if any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names):
        return "huggingface-safetensor"
    if any(n.endswith(".bin") or n.endswith(".pt") for n in names):
        return "huggingface-torch"
    raise UserError(f"{model_dir} has no weight files (.safetensors or pytorch_model.bin)")

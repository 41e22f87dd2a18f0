"""Hugging Face checkpoints: safetensors (single or sharded) and PyTorch .bin files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from edgellm.errors import UserError


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
        weight_map = read_json(model_dir / index).get("weight_map") or {}
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise UserError(f"{model_dir / index} lists {missing[0]}, which does not exist")
        return [model_dir / f for f in files]
    if (model_dir / single).exists():
        return [model_dir / single]
    return []


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
        for path in self.files:
            for name in self._open(path).keys():
                self._names[name] = path

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
            # Reopen per tensor: the file mapping is dropped after each read, so resident
            # memory stays near one tensor instead of growing to the whole file.
            try:
                with safe_open(str(path), framework="pt") as f:
                    tensor = f.get_tensor(name)
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"cannot read tensor {name} from {path}: {e}") from None
            yield name, tensor


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
    return read_json(path)


def detect_format(model_dir: Path) -> str:
    names = os.listdir(model_dir)
    if any(n.endswith(".safetensors") for n in names):
        return "huggingface-safetensor"
    if any(n.endswith(".bin") or n.endswith(".pt") for n in names):
        return "huggingface-torch"
    raise UserError(f"{model_dir} has no weight files (.safetensors or pytorch_model.bin)")

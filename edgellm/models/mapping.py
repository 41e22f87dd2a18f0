"""Tensor names: Hugging Face -> ours (with fusion) and ours <-> MLC-LLM's names on disk."""

from __future__ import annotations

from types import ModuleType

import torch

from edgellm.errors import UserError


class HFMapper:
    """Turns a stream of HF tensors into our tensors, fusing parts once all have arrived.

    Only the parts of one fused tensor are held at a time (e.g. one layer's q, k, v).
    """

    def __init__(self, family: ModuleType, arch=None):
        self.family, self.arch = family, arch
        self.transform = getattr(family, "hf_transform", None)  # (name, tensor, arch) -> tensor
        self.pending: dict[str, list[torch.Tensor | None]] = {}

    def feed(self, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        out = self._fuse(hf_name, tensor)
        if self.transform is not None:
            out = [(n, self.transform(n, t, self.arch)) for n, t in out]
        return out

    def _fuse(self, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        name = self.family.hf_rename(hf_name)
        if name is None:
            return []
        dotted = "." + name
        for fused, parts in self.family.HF_FUSED.items():
            for idx, part in enumerate(parts):
                token = "." + part + "."
                if token in dotted:
                    target = dotted.replace(token, "." + fused + ".", 1)[1:]
                    buf = self.pending.setdefault(target, [None] * len(parts))
                    buf[idx] = tensor
                    if any(t is None for t in buf):
                        return []
                    del self.pending[target]
                    return [(target, torch.cat(buf, dim=0))]
        return [(name, tensor)]

    def finish(self) -> None:
        if self.pending:
            name = next(iter(self.pending))
            raise UserError(f"incomplete checkpoint: parts of {name} are missing")


def to_disk_name(family: ModuleType, name: str) -> str:
    for ours, disk in family.DISK_NAMES:
        name = name.replace(ours, disk)
    return name


def from_disk_name(family: ModuleType, name: str) -> str:
    for ours, disk in family.DISK_NAMES:
        name = name.replace(disk, ours)
    return name

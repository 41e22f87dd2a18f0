"""Merge a PEFT LoRA adapter into base weights while they stream through conversion."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from edgellm.errors import UserError
from edgellm.weights.hf_reader import SafetensorsSource, TorchBinSource, read_json


class LoraMerger:
    """W' = W + scale * B @ A for every adapted weight; scale = alpha / r (or alpha / sqrt(r))."""

    def __init__(self, adapter_dir: str | Path):
        adapter_dir = Path(adapter_dir).expanduser()
        if not (adapter_dir / "adapter_config.json").exists():
            raise UserError(f"{adapter_dir} is not a PEFT LoRA adapter (no adapter_config.json)")
        cfg = read_json(adapter_dir / "adapter_config.json")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise UserError(f"{adapter_dir}: only LoRA adapters can be merged, not {cfg.get('peft_type')}")
        r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
        self.scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        if (adapter_dir / "adapter_model.safetensors").exists():
            src = SafetensorsSource(adapter_dir, [adapter_dir / "adapter_model.safetensors"])
        else:
            src = TorchBinSource(adapter_dir, [adapter_dir / "adapter_model.bin"])
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in src.iter_tensors():
            for part in ("lora_A", "lora_B"):
                marker = f".{part}."
                if marker in name:
                    base = name.split(marker)[0]
                    for prefix in ("base_model.model.",):
                        base = base[len(prefix):] if base.startswith(prefix) else base
                    pairs.setdefault(base + ".weight", {})[part] = t.float()
        self.deltas = pairs
        self.used: set[str] = set()

    def apply(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        ab = self.deltas.get(hf_name)
        if ab is None:
            return tensor
        if "lora_A" not in ab or "lora_B" not in ab:
            raise UserError(f"LoRA adapter has only half of the pair for {hf_name}")
        delta = (ab["lora_B"] @ ab["lora_A"]) * self.scale
        if self.fan_in_fan_out:
            delta = delta.T
        if delta.shape != tensor.shape:
            raise UserError(f"LoRA delta for {hf_name} has shape {list(delta.shape)}, "
                            f"weight has {list(tensor.shape)}")
        self.used.add(hf_name)
        return (tensor.float() + delta).to(tensor.dtype)

    def finish(self) -> None:
        unused = sorted(set(self.deltas) - self.used)
        if unused:
            raise UserError(f"LoRA adapter targets {unused[0]}, which the base model does not have")

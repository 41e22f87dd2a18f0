"""PEFT LoRA adapters: read one (checked), merge it into base weights at conversion, or write it apart.

An adapter directory holds `adapter_config.json` (r, lora_alpha, target_modules, use_rslora, ...) and
`adapter_model.safetensors` (or `.bin`) with a pair per adapted weight: lora_A [r, in], lora_B [out, r];
the weight's update is scale * B @ A with scale = alpha / r (alpha / sqrt(r) with rslora). The split
export (`convert_weight --lora-split`) writes the same format, float16 or float32, plus an `edgellm`
section naming the base model it was made for (checked when the engine loads it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgellm.errors import UserError
from edgellm.weights.hf_reader import SafetensorsSource, TorchBinSource, read_json

PEFT_PREFIX = "base_model.model."


@dataclass
class PeftAdapter:
    """A checked PEFT LoRA adapter: {HF weight name: (A [r, in], B [out, r] with the scale folded in)}."""

    path: Path
    config: dict
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def base(self) -> dict:
        """Facts of the converted base model a split adapter was written for ({} for a PEFT adapter)."""
        return dict((self.config.get("edgellm") or {}).get("base") or {})


def read_adapter(adapter_dir: str | Path) -> PeftAdapter:
    """Read and check a PEFT LoRA adapter; every problem is a one-line UserError."""
    adapter_dir = Path(adapter_dir).expanduser()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} is not a PEFT LoRA adapter (no adapter_config.json)")
    cfg = read_json(adapter_dir / "adapter_config.json")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter_dir}: only LoRA adapters are supported, not {cfg.get('peft_type')}")
    if cfg.get("alpha_pattern"):
        raise UserError(f"{adapter_dir}: per-module lora_alpha (alpha_pattern) is not supported")
    if cfg.get("use_dora"):
        raise UserError(f"{adapter_dir}: DoRA adapters are not supported (use_dora)")
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    per_module_rank = bool(cfg.get("rank_pattern"))
    if (adapter_dir / "adapter_model.safetensors").exists():
        src = SafetensorsSource(adapter_dir, [adapter_dir / "adapter_model.safetensors"])
    elif (adapter_dir / "adapter_model.bin").exists():
        src = TorchBinSource(adapter_dir, [adapter_dir / "adapter_model.bin"])
    else:
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in src.iter_tensors():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                base = name.split(marker)[0]
                base = base[len(PEFT_PREFIX):] if base.startswith(PEFT_PREFIX) else base
                halves.setdefault(base + ".weight", {})[part] = t.float()
    if not halves:
        raise UserError(f"{adapter_dir}: the adapter has no lora_A / lora_B tensors")
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    out = PeftAdapter(adapter_dir, cfg)
    for name, ab in halves.items():
        if "lora_A" not in ab or "lora_B" not in ab:
            raise UserError(f"{adapter_dir}: the adapter has only half of the pair for {name}")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{adapter_dir}: rank mismatch for {name}: lora_A is {list(a.shape)}, "
                            f"lora_B is {list(b.shape)}")
        rank = a.shape[0]
        if not per_module_rank and rank != r:
            raise UserError(f"{adapter_dir}: rank mismatch for {name}: the tensors have rank {rank}, "
                            f"adapter_config.json says r={r}")
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        if (cfg.get("edgellm") or {}).get("scale_folded"):  # written by write_split
            scale = 1.0
        if fan_in_fan_out:  # GPT-2 style Conv1D weights are stored transposed: so is their update
            a, b = b.T.contiguous(), a.T.contiguous()
        out.pairs[name] = (a, b * scale)
    return out


def write_split(adapter: PeftAdapter, out_dir: str | Path, dtype: torch.dtype, base: dict) -> Path:
    """Write `adapter` as its own directory (PEFT's format, tensors in `dtype`, the scale folded into
    lora_B) with the facts of the converted base it belongs to; returns the directory."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in adapter.pairs.items():
        prefix = PEFT_PREFIX + name[: -len(".weight")]
        tensors[prefix + ".lora_A.weight"] = a.to(dtype).contiguous()
        tensors[prefix + ".lora_B.weight"] = b.to(dtype).contiguous()  # the scale is folded into B
    ranks = {n[: -len(".weight")]: a.shape[0] for n, (a, _) in adapter.pairs.items()}
    r = max(ranks.values())
    cfg = {k: v for k, v in adapter.config.items() if k not in ("edgellm", "rank_pattern", "alpha_pattern")}
    cfg.update(r=r, lora_alpha=r, use_rslora=False, fan_in_fan_out=False, alpha_pattern={},
               rank_pattern=ranks if len(set(ranks.values())) > 1 else {},
               edgellm={"base": base, "scale_folded": True, "source": adapter.path.name})
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


class LoraMerger:
    """W' = W + scale * B @ A for every adapted weight, while the weights stream through conversion."""

    def __init__(self, adapter_dir: str | Path):
        self.adapter = read_adapter(adapter_dir)
        self.used: set[str] = set()

    def apply(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        ab = self.adapter.pairs.get(hf_name)
        if ab is None:
            return tensor
        delta = ab[1] @ ab[0]
        if delta.shape != tensor.shape:
            raise UserError(f"LoRA delta for {hf_name} has shape {list(delta.shape)}, "
                            f"weight has {list(tensor.shape)}")
        self.used.add(hf_name)
        return (tensor.float() + delta).to(tensor.dtype)

    def finish(self) -> None:
        unused = sorted(set(self.adapter.pairs) - self.used)
        if unused:
            raise UserError(f"LoRA adapter targets {unused[0]}, which the base model does not have")

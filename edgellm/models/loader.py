"""Build a model from its chat config and load a converted directory's weights into it."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from edgellm.config import ChatConfig, load_chat_config
from edgellm.errors import UserError
from edgellm.models.config import ArchConfig
from edgellm.models.mapping import from_disk_name
from edgellm.models.registry import family_hook, get_family
from edgellm.models.schema import parse_arch
from edgellm.quantization.layers import DEFAULT_PRECISION, QuantEmbedding, QuantLinear, set_precision
from edgellm.quantization.modes import QuantMode, get_mode
from edgellm.weights.tensor_cache import read_tensors


def arch_config(cfg: ChatConfig, family: ModuleType | None = None,
                source: str = "mlc-chat-config.json model_config") -> ArchConfig:
    """The family's ArchConfig (validated), with gen_config's sliding window override applied."""
    family = family or get_family(cfg.model_type)
    arch = parse_arch(family, cfg.model_config, source)
    w = cfg.sliding_window_size
    if w and w > 0:
        family_hook(family, "override_window")(arch, w)
    return arch


def runtime_context(cfg: ChatConfig, arch: ArchConfig) -> int:
    """Positions the runtime supports: the chat config's window, or the model's own maximum when it is
    -1 (MLC writes -1 for sliding-window Mistral: unbounded, the KV cache keeps only the window)."""
    ctx = cfg.context_window_size
    return ctx if ctx and ctx > 0 else arch.max_position_embeddings


def check_memory(arch: ArchConfig, positions: int, source: str | Path) -> None:
    """UserError when `positions` cannot fit this machine: the rope tables (float32 cos and sin) plus one
    full-length sequence's KV cache at its smallest (int8) already exceed physical memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = positions * (2 * arch.rot_dim * 4 + 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim)
    if need > total:
        fit = total // max(need // positions, 1)
        raise UserError(f"{source}: a context window of {positions} tokens needs {need / 2**30:.1f} GiB for one "
                        f"sequence, more than this machine's {total / 2**30:.1f} GiB; use at most {fit} "
                        f"(context_window_size)")


def build_model(family: ModuleType, arch: ArchConfig, mode: QuantMode | None, max_positions: int,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with its weights on the meta device (no memory), ready for `assign` loading."""
    with torch.device("meta"):
        return family.Model(arch, mode, max_positions=max_positions, dtype=dtype)


def expected_tensors(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """Logical weights the converter must produce: name -> (shape, kind).

    kind is "quant" for quantized layers (written as .q_weight/.q_scale, and .q_zero for awq), else "plain".
    """
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    quant_prefixes = set()
    for prefix, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            out[f"{prefix}.weight"] = ((mod.out_features, mod.in_features), "quant")
            quant_prefixes.add(prefix)
        elif isinstance(mod, QuantEmbedding):
            out[f"{prefix}.weight"] = ((mod.num_embeddings, mod.embedding_dim), "quant")
            quant_prefixes.add(prefix)
    for name, t in model.state_dict().items():
        prefix = name.rsplit(".", 1)[0]
        if prefix in quant_prefixes and name.rsplit(".", 1)[1] in ("q_weight", "q_scale", "q_zero"):
            continue
        out[name] = (tuple(t.shape), "plain")
    return out


def load_model(model_dir: str | Path, *, device: str = "cpu", use_mmap: bool = False,
               dtype: torch.dtype = torch.float32, max_positions: int | None = None,
               verify: bool = True, precision: str = DEFAULT_PRECISION,
               shard: tuple[int, int] | None = None) -> tuple[nn.Module, ChatConfig]:
    """(model ready for inference, its chat config) from a converted directory.

    `precision` ("high" / "normal") is the activation precision its quantized layers use once
    repacked for the native kernels (see edgellm.quantization.layers). `shard` = (rank, shards) loads
    only that rank's tensor-parallel part (models/sharding.py; the plan is kept as `model.shard_plan`,
    the collectives are installed by the engine).
    """
    model_dir = Path(model_dir)
    cfg = load_chat_config(model_dir)
    family = get_family(cfg.model_type)
    mode = get_mode(cfg.quantization, cfg.quantization_layout)
    arch = arch_config(cfg, family)
    positions = max_positions or runtime_context(cfg, arch)
    plan = None
    if shard is not None:
        from edgellm.models.sharding import plan_shards

        plan = plan_shards(arch, mode, shard[1], shard[0], str(model_dir / "mlc-chat-config.json"))
        arch = plan.local
    check_memory(arch, positions, model_dir / "mlc-chat-config.json")
    model = build_model(family, arch, mode, positions, dtype)
    vocab_parts = (model.PARTS[0], model.PARTS[3])
    want = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for disk_name, t in read_tensors(model_dir, use_mmap=use_mmap, verify=verify):
        name = from_disk_name(family, disk_name)
        if name not in want:
            if arch.tie_word_embeddings and name.startswith("lm_head."):
                continue  # some writers keep a copy of the tied embedding
            raise UserError(f"{model_dir}: unexpected tensor {disk_name} for {cfg.model_type}")
        ref = want[name]
        if plan is not None:
            t = plan.slice(name, t, vocab_parts)
        if tuple(t.shape) != tuple(ref.shape):
            raise UserError(f"{model_dir}: tensor {disk_name} has shape {list(t.shape)}, "
                            f"the config needs {list(ref.shape)}")
        if ref.dtype.is_floating_point and t.dtype != ref.dtype:
            t = t.to(ref.dtype)
        state[name] = t.to(device) if device != "cpu" else t
    missing = [k for k in want if k not in state]
    if missing:
        raise UserError(f"{model_dir}: weights lack {missing[0]} ({len(missing)} tensors missing)")
    model.load_state_dict(state, assign=True, strict=True)
    model.requires_grad_(False)
    model.eval()
    model.shard_plan = plan
    set_precision(model, precision)
    if device != "cpu":
        model.to(device)
    return model, cfg

"""model_type -> family module.

A family module provides: `parse_config(hf: dict) -> ArchConfig`, `Model(cfg, mode,
max_positions, dtype)`, `HF_FUSED` (our fused tensor -> its HF parts), `hf_rename(name)`
(HF name -> ours or None) and `DISK_NAMES` (our names -> MLC-LLM's on-disk names).
A family's Model may describe its blocks in `fused_layers()` (models/fused_decode.py): its decode step
then runs as one native call (`fused_decode.native_decoder(model, pool)`, engine O2).
Its GGUF knowledge (llama.cpp's architecture name, keys and tensor names) sits beside it:
`GGUF_ARCH`, `gguf_config`, `gguf_tensor_names`, `gguf_metadata`, `gguf_export_names`
(see models/gguf_hooks.py).

Optional, looked up with `family_hook` (a family without one gets the shared default):
`chat_window(hf) -> int`, the `sliding_window_size` gen_config writes into mlc-chat-config.json
(default -1, none), and `override_window(arch, size)`, which applies a chat config's
`sliding_window_size` > 0 to the ArchConfig (default: resize the layers that already slide).
A family may also have `hf_transform(name, tensor, arch)` (conversion) and `FLOAT32_TENSORS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

from edgellm.errors import UserError
from edgellm.models.config import no_chat_window, resize_sliding_layers

MODEL_FAMILIES: dict[str, str] = {
    "llama": "edgellm.models.llama",
    "mistral": "edgellm.models.mistral",
    "qwen2": "edgellm.models.qwen2",
    "qwen3": "edgellm.models.qwen3",
    "phi3": "edgellm.models.phi3",
    "gemma2": "edgellm.models.gemma2",
    "internlm2": "edgellm.models.internlm2",
    "gpt_neox": "edgellm.models.gpt_neox",
}

# Optional family hooks -> the default of a family that does not define one.
DEFAULT_HOOKS: dict[str, Callable] = {"chat_window": no_chat_window, "override_window": resize_sliding_layers}

# Spellings seen in the wild for the same families.
ALIASES = {"phi-3": "phi3", "gptneox": "gpt_neox", "internlm2_5": "internlm2", "smollm": "llama"}


def supported() -> str:
    return ", ".join(MODEL_FAMILIES)


def normalize_model_type(model_type: str | None) -> str:
    if not model_type:
        raise UserError(f"config.json has no model_type; supported model types: {supported()}")
    mt = ALIASES.get(model_type, model_type)
    if mt not in MODEL_FAMILIES:
        raise UserError(f"unsupported model_type {model_type!r}; supported model types: {supported()}")
    return mt


def get_family(model_type: str | None) -> ModuleType:
    """The family module for `model_type`, or a UserError naming the supported ones."""
    return importlib.import_module(MODEL_FAMILIES[normalize_model_type(model_type)])


def native_decode_families() -> list[str]:
    """The families whose Model offers a native decode step (the engine's O2 fused path)."""
    from edgellm.models.base import CausalLM

    return [mt for mt in MODEL_FAMILIES if get_family(mt).Model.fused_layers is not CausalLM.fused_layers]


def gguf_architectures() -> list[str]:
    """llama.cpp architecture names edgellm reads and writes, in family order."""
    return list(dict.fromkeys(importlib.import_module(m).GGUF_ARCH for m in MODEL_FAMILIES.values()))


def gguf_family(arch: str | None) -> ModuleType:
    """The family that reads GGUF files of llama.cpp architecture `arch` (the first that claims it:
    mistral writes llama files, as llama.cpp's converter does, and llama reads them back)."""
    for module in MODEL_FAMILIES.values():
        family = importlib.import_module(module)
        if family.GGUF_ARCH == arch:
            return family
    raise UserError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(gguf_architectures())})")


def family_hook(family: ModuleType, name: str) -> Callable:
    """The family module's optional hook `name` (one of DEFAULT_HOOKS), or the shared default."""
    return getattr(family, name, DEFAULT_HOOKS[name])

"""Phi-3 (mini/medium, 4k and 128k): Llama's layers; HF already stores fused qkv_proj/gate_up_proj.

RoPE may be partial (`partial_rotary_factor`) and scaled with LongRoPE (`rope_scaling.type` "su" or
"longrope": short/long factors and an attention factor on cos/sin). A `sliding_window` in the HF
config is applied to every layer, as transformers does (MLC ignores it).

MLC's on-disk names differ from HF's: `transformer.embd`, `transformer.h.{i}.ln`,
`transformer.h.{i}.mixer.{qkv_proj,out_proj}`, `transformer.norm` (mlp and post_attention_layernorm
keep HF's names).
"""

from __future__ import annotations

import math

from edgellm.models.config import ArchConfig, llama_like
from edgellm.models.llama import Model, hf_rename
from edgellm.models.schema import HFConfig
from edgellm.validation import Int

__all__ = ["DISK_NAMES", "HF_FUSED", "Model", "hf_rename", "parse_config"]

HF_FUSED: dict[str, list[str]] = {}  # nothing to fuse
DISK_NAMES = [
    ("model.embed_tokens.", "transformer.embd."),
    ("model.layers.", "transformer.h."),
    (".input_layernorm.", ".ln."),
    (".self_attn.qkv_proj.", ".mixer.qkv_proj."),
    (".self_attn.o_proj.", ".mixer.out_proj."),
    ("model.norm.", "transformer.norm."),
]


class Config(HFConfig):
    """Phi-3's own config.json facts: LongRoPE's original context."""

    original_max_position_embeddings: Int(1, 1 << 24) | None = None


def parse_config(hf: dict) -> ArchConfig:
    window = hf.get("sliding_window")
    cfg = llama_like(hf, int(window) if window else None)
    rope = cfg.rope
    if rope["rope_type"] == "longrope":
        # transformers prefers Phi-3's top-level original_max_position_embeddings over the dict's.
        orig = int(hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                   or cfg.max_position_embeddings)
        rope["original_max_position_embeddings"] = orig
        if rope.get("attention_factor") is None:
            # Fixed by the config (not by the runtime's context size), as transformers computes it.
            factor = float(rope.get("factor") or cfg.max_position_embeddings / orig)
            scale = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1.0 else 1.0
            rope["attention_factor"] = scale
    return cfg

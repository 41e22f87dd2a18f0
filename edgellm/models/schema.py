"""config.json checked before anything is sized from it: types, sane bounds, the facts that must hold.

`HFConfig` holds what every family reads; a family whose config has more facts declares
`Config(HFConfig)` in its own module. `parse_arch` validates with the family's schema, runs the
family's `parse_config`, and refuses architectures whose sizes cannot work. Every failure is one
UserError naming the file, the field and the allowed range.
"""

from __future__ import annotations

from types import ModuleType
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from edgellm.errors import UserError
from edgellm.models.base import ACTIVATIONS
from edgellm.models.config import ArchConfig
from edgellm.validation import Int, Num, validate

SIZE = Int(1, 1 << 17)  # hidden, intermediate (a 131072-wide layer is far past any released model)
COUNT = Int(1, 4096)  # layers, heads
POSITIONS = Int(-1, 1 << 24)  # -1: MLC's "unbounded" (sliding-window Mistral)
VOCAB = Int(1, 1 << 24)
TOKEN_ID = Int(0, (1 << 24) - 1)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope", "su", "yarn")


class RopeScaling(BaseModel):
    """rope_scaling / rope_parameters: the factor (and friends) its type needs."""

    model_config = ConfigDict(extra="allow")
    rope_type: Literal[ROPE_TYPES] | None = None
    type: Literal[ROPE_TYPES] | None = None
    factor: Num(0.0, 1e6) | None = None
    rope_theta: Num() | None = None
    low_freq_factor: Num(0.0, 1e6) | None = None
    high_freq_factor: Num(0.0, 1e6) | None = None
    original_max_position_embeddings: Int(1, 1 << 24) | None = None
    short_factor: list[Num(0.0, 1e6)] | None = None
    long_factor: list[Num(0.0, 1e6)] | None = None
    attention_factor: Num(0.0, 1e6) | None = None
    partial_rotary_factor: Num(0.0, 1.0) | None = None

    @model_validator(mode="after")
    def _needs(self):
        kind = self.rope_type or self.type or "default"
        need = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "longrope": ("short_factor", "long_factor"), "su": ("short_factor", "long_factor")}.get(kind, ())
        for name in need:
            if getattr(self, name) is None:
                raise ValueError(f"rope type {kind!r} needs {name!r}")
        if kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must be greater than low_freq_factor")
        return self


class HFConfig(BaseModel):
    """The config.json fields the Llama-shaped families read (any spelling they accept)."""

    model_config = ConfigDict(extra="allow")
    model_type: str | None = None
    hidden_size: SIZE | None = None
    n_embd: SIZE | None = None
    d_model: SIZE | None = None
    intermediate_size: SIZE | None = None
    num_hidden_layers: COUNT | None = None
    n_layer: COUNT | None = None
    num_attention_heads: COUNT | None = None
    n_head: COUNT | None = None
    num_key_value_heads: COUNT | None = None
    head_dim: Int(1, 4096) | None = None
    vocab_size: VOCAB | None = None
    max_position_embeddings: POSITIONS | None = None
    context_window_size: POSITIONS | None = None
    max_sequence_length: POSITIONS | None = None
    rms_norm_eps: Num(0.0, 1.0) | None = None
    layer_norm_eps: Num(0.0, 1.0) | None = None
    rope_theta: Num() | None = None
    partial_rotary_factor: Num(0.0, 1.0) | None = None
    hidden_act: Literal[tuple(ACTIVATIONS)] | None = None
    hidden_activation: Literal[tuple(ACTIVATIONS)] | None = None
    rope_scaling: RopeScaling | None = None
    rope_parameters: RopeScaling | None = None
    sliding_window: Int(-1, 1 << 24) | None = None
    layer_types: list[str] | None = None
    bos_token_id: TOKEN_ID | None = None
    eos_token_id: TOKEN_ID | list[TOKEN_ID] | None = None
    pad_token_id: Int(-1, (1 << 24) - 1) | None = None

    @model_validator(mode="after")
    def _consistent(self):
        hidden = self.hidden_size or self.n_embd or self.d_model
        heads = self.num_attention_heads or self.n_head
        if hidden and heads and self.head_dim is None and hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        if heads and self.num_key_value_heads and heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads {self.num_key_value_heads} does not divide "
                             f"num_attention_heads {heads}")
        if self.vocab_size:
            eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
            for name, ids in (("bos_token_id", [self.bos_token_id]), ("eos_token_id", eos)):
                bad = [i for i in ids if i is not None and i >= self.vocab_size]
                if bad:
                    raise ValueError(f"{name} {bad[0]} is outside the vocabulary (vocab_size {self.vocab_size})")
        return self


def validate_hf(family: ModuleType, hf: object, source: str) -> None:
    """UserError (one line, naming `source`) unless `hf` fits the family's config schema."""
    if not isinstance(hf, dict):
        raise UserError(f"{source}: must be a JSON object, not {type(hf).__name__}")
    validate(getattr(family, "Config", HFConfig), hf, source)


def parse_arch(family: ModuleType, hf: object, source: str = "config.json") -> ArchConfig:
    """The family's ArchConfig from a validated config, with sizes that can work."""
    validate_hf(family, hf, source)
    try:
        arch = family.parse_config(hf)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    except (KeyError, ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        raise UserError(f"{source}: invalid value ({type(e).__name__}: {e})") from None
    checks = (("hidden_size", arch.hidden_size, 1 << 17), ("intermediate_size", arch.intermediate_size, 1 << 17),
              ("num_hidden_layers", arch.num_layers, 4096), ("num_attention_heads", arch.num_heads, 4096),
              ("num_key_value_heads", arch.num_kv_heads, 4096), ("head_dim", arch.head_dim, 4096),
              ("vocab_size", arch.vocab_size, 1 << 24), ("max_position_embeddings", arch.max_position_embeddings,
                                                         1 << 24))
    for name, value, hi in checks:
        if not 1 <= value <= hi:
            raise UserError(f"{source}: {name} must be in 1..{hi}, got {value}")
    if arch.num_heads % arch.num_kv_heads:
        raise UserError(f"{source}: num_key_value_heads {arch.num_kv_heads} does not divide "
                        f"num_attention_heads {arch.num_heads}")
    if not 0 < arch.norm_eps < 1:
        raise UserError(f"{source}: the norm epsilon must be in (0, 1), got {arch.norm_eps}")
    if arch.hidden_act not in ACTIVATIONS:
        raise UserError(f"{source}: hidden_act {arch.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
    if arch.rope.get("rope_type") == "longrope":
        for name in ("short_factor", "long_factor"):
            if len(arch.rope[name]) != arch.rot_dim // 2:
                raise UserError(f"{source}: rope_scaling.{name} has {len(arch.rope[name])} values; the rotary "
                                f"dimension {arch.rot_dim} needs {arch.rot_dim // 2}")
    if not 0 <= arch.rotary_dim <= arch.head_dim or arch.rot_dim % 2:
        raise UserError(f"{source}: the rotary dimension {arch.rot_dim} must be even and at most "
                        f"head_dim {arch.head_dim}")
    return arch

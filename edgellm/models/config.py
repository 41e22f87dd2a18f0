"""The architecture knobs every family reads from a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgellm.errors import UserError
from edgellm.models.rope import rope_parameters


@dataclass
class ArchConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope: dict
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    windows: list[int | None] = field(default_factory=list)  # sliding window per layer
    rotary_dim: int = 0  # 0 = head_dim
    qk_norm: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_scale: float | None = None  # None = head_dim ** -0.5
    extra: dict = field(default_factory=dict)

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5


def require(hf: dict, *keys: str):
    """hf[key] for the first key present, else a UserError naming the key."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    raise UserError(f"config.json has no {keys[0]!r}")


def llama_like(hf: dict, window: int | None = None) -> ArchConfig:
    """ArchConfig for Llama-shaped configs (also the base for mistral/qwen/phi3/gemma2)."""
    hidden = int(require(hf, "hidden_size", "n_embd", "d_model"))
    heads = int(require(hf, "num_attention_heads", "n_head"))
    layers = int(require(hf, "num_hidden_layers", "n_layer"))
    head_dim = int(hf.get("head_dim") or hidden // heads)
    rope = rope_parameters(hf)
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * float(partial))
    return ArchConfig(
        hidden_size=hidden,
        intermediate_size=int(require(hf, "intermediate_size")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        vocab_size=int(require(hf, "vocab_size")),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope,
        max_position_embeddings=int(hf.get("max_position_embeddings") or hf.get("context_window_size")
                                    or hf.get("max_sequence_length") or 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        hidden_act=hf.get("hidden_act") or hf.get("hidden_activation") or "silu",
        windows=[window] * layers,
        rotary_dim=rotary_dim if rotary_dim != head_dim else 0,
    )


def windows_from_layer_types(hf: dict, layers: int, window: int | None) -> list[int | None]:
    """Per-layer windows from `layer_types` (new configs) or None everywhere."""
    types = hf.get("layer_types")
    if not types or not window:
        return [None] * layers
    return [window if t == "sliding_attention" else None for t in types[:layers]]


def no_chat_window(hf: dict) -> int:
    """Default `chat_window` hook: MLC writes no sliding window into the chat config (-1)."""
    return -1


def hf_chat_window(hf: dict) -> int:
    """`chat_window` hook of families whose MLC config carries the window: HF `sliding_window`
    unless `use_sliding_window` is false, else -1."""
    window = hf.get("sliding_window")
    return int(window) if window and hf.get("use_sliding_window", True) is not False else -1


def resize_sliding_layers(arch: ArchConfig, size: int) -> None:
    """Default `override_window` hook: the layers that slide get window `size`; the others stay full."""
    if any(w is not None for w in arch.windows):
        arch.windows = [size if w is not None else None for w in arch.windows]

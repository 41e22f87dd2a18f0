"""Building blocks shared by the model families.

A forward step takes the new tokens of one or more sequences flattened into one row
([T] ids), a `Step` that says which sequence owns which rows, and a KV cache object that
stores keys/values and computes attention (`cache.attend`). `CausalLM` is the skeleton every
family's `Model` fills in (embedding -> blocks -> final norm -> logits). Shapes in comments:
T = tokens in the step, H = query heads, KVH = key/value heads, D = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.errors import BadRequestError
from edgellm.models.rope import rope_table
from edgellm.quantization.layers import tied_logits

if TYPE_CHECKING:
    from edgellm.models.config import ArchConfig
    from edgellm.quantization.modes import QuantMode


@dataclass
class Step:
    """Which rows of a flattened step belong to which sequence."""

    slots: list[int]  # KV-cache slot of each sequence
    starts: list[int]  # absolute position of each sequence's first new token
    lengths: list[int]  # new tokens per sequence (their rows are consecutive, in this order)
    positions: torch.Tensor = field(default=None)  # [T] int64 absolute positions
    logit_rows: torch.Tensor | None = None  # rows to compute logits for; None = all rows

    def __post_init__(self) -> None:
        if self.positions is None:
            self.positions = torch.cat(
                [torch.arange(s, s + n, dtype=torch.int64) for s, n in zip(self.starts, self.lengths)])

    @classmethod
    def single(cls, start: int, length: int, slot: int = 0, last_only: bool = False) -> Step:
        rows = torch.tensor([length - 1]) if last_only else None
        return cls([slot], [start], [length], logit_rows=rows)


class KVCacheLike(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, *,
               scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """Store k, v [T, KVH, D] for the step's rows and return attention output [T, H, D]."""
        ...


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dimension (in x's dtype)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class RMSNorm(nn.Module):
    """RMS norm; `offset=1.0` gives Gemma's (1 + w) scaling."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() + self.offset if self.offset else self.weight.float()
        return rms_norm(x.float(), w, self.eps).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, Drot]; rotates the first Drot dims (partial rotary)."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat([xr * cos + rotate_half(xr) * sin, xp], dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int, *,
              scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of one sequence.

    q [H, Tq, D] at positions q_start.., k/v [KVH, Tk, D] at positions k_start..; a key is
    visible when k_pos <= q_pos and (no window or q_pos - k_pos < window).
    """
    tq, tk = q.shape[1], k.shape[1]
    q_end, k_end = q_start + tq, k_start + tk
    fits_window = window is None or (q_end - 1 - k_start) < window
    mask, is_causal = None, False
    if fits_window and tq == 1 and q_end == k_end:
        pass  # one new token that sees every cached key
    elif fits_window and tq == tk and q_start == k_start:
        is_causal = tq > 1
    else:
        qp = torch.arange(q_start, q_end).unsqueeze(1)
        kp = torch.arange(k_start, k_end).unsqueeze(0)
        mask = kp <= qp
        if window is not None:
            mask &= (qp - kp) < window
    if softcap is None:
        return F.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, is_causal=is_causal,
            scale=scale, enable_gqa=q.shape[0] != k.shape[0]).squeeze(0)
    rep = q.shape[0] // k.shape[0]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = torch.ones(tq, tk, dtype=torch.bool).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class RopeCache(nn.Module):
    """cos/sin tables looked up by absolute position."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


def select_rows(h: torch.Tensor, step: Step) -> torch.Tensor:
    return h if step.logit_rows is None else h[step.logit_rows]


class CausalLM(nn.Module):
    """Causal LM: token ids [T] -> logits [R, vocab] (float32) for the step's logit rows.

    embedding -> blocks, each `block(x, cos, sin, step, cache)` -> final norm of the logit rows ->
    output head (the untied one, else the embedding read as a linear) -> optional tanh soft-cap.
    A family subclass registers its modules under its Hugging Face names in `build` and names
    them in `PARTS`; the parts are looked up on every call (compile lowering swaps modules in place).
    """

    # Dotted names of (embedding, block list, final norm, untied output head).
    PARTS: tuple[str, str, str, str]

    def __init__(self, cfg: ArchConfig, mode: QuantMode | None = None, max_positions: int = 4096,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.build(cfg, mode, dtype)
        with torch.device("cpu"):  # real tables even when the weights are built on "meta"
            self.rope = RopeCache(*rope_table(cfg.rope, cfg.rot_dim, max_positions))

    def build(self, cfg: ArchConfig, mode: QuantMode | None, dtype: torch.dtype) -> None:
        """Register the embedding, the blocks, the final norm and (untied) the output head."""
        raise NotImplementedError

    @property
    def embedding(self) -> nn.Module:
        return self.get_submodule(self.PARTS[0])

    @property
    def blocks(self) -> nn.ModuleList:
        return self.get_submodule(self.PARTS[1])

    @property
    def final_norm(self) -> nn.Module:
        return self.get_submodule(self.PARTS[2])

    @property
    def output(self) -> nn.Module | None:
        """The untied output head; None when the embedding is tied to it."""
        return None if self.cfg.tie_word_embeddings else self.get_submodule(self.PARTS[3])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    # Set on a tensor-parallel shard (models/sharding.py: install): gathers the vocabulary runs' logits.
    tp_gather = None

    def fused_layers(self) -> list | None:
        """Every block as a `fused_decode.LayerSpec` (the family's capability of a native decode step),
        or None when a block is not of a shape the native step computes. None here: a family that can
        describe its blocks overrides this."""
        return None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.output
        emb = getattr(self.embedding, "shard", self.embedding)  # a vocab-parallel embedding's own rows
        out = (tied_logits(emb, h) if head is None else head(h)).float()
        if self.tp_gather is not None:
            out = self.tp_gather(out)
        if self.cfg.final_softcap:
            out = torch.tanh(out / self.cfg.final_softcap) * self.cfg.final_softcap
        return out

    def forward(self, ids: torch.Tensor, step: Step, cache: KVCacheLike, hidden: bool = False) -> torch.Tensor:
        """Logits [rows, vocab]; with `hidden`, the final normed hidden states [rows, hidden_size] instead."""
        if hidden and self.tp_gather is not None:  # before any collective: the other ranks only run steps
            raise BadRequestError("embeddings are not available with tensor_parallel_shards > 1 (a shard computes only "
                            "with the other ranks, in the engine's steps)")
        x = self.embed(ids)
        cos, sin = self.rope(step.positions)
        for block in self.blocks:
            x = block(x, cos, sin, step, cache)
        h = self.final_norm(select_rows(x, step))
        return h if hidden else self.logits(h)

"""Megatron-style tensor parallelism, decided at load time from the same converted directory.

Every family keeps its attention projection fused as [q (H*D rows); k (KVH*D); v (KVH*D)] and its
MLP input as [gate; up] (or GPT-NeoX's single dense_h_to_4h), so one plan covers all of them:

  column-parallel (a rank keeps some output rows): qkv (its q heads and its kv heads' k and v rows),
      gate/up (its slice of the intermediate features, from both halves), dense_h_to_4h, and the
      embedding / untied lm_head (a slice of the vocabulary, padded to ceil(V / shards) rows);
  row-parallel (a rank keeps some input columns; partial outputs are summed by one all-reduce):
      o_proj / attention.dense and down_proj / dense_4h_to_h; their bias is kept by rank 0 only.

Heads go by key-value group: with KVH >= shards each rank takes a contiguous run of kv heads (as even
as possible; SmolLM2's 3 kv heads over 2 ranks are 2 + 1) and their query heads; with fewer kv heads
than shards each kv head is replicated on shards / KVH ranks, which split its query heads. Quantized
row-parallel layers split only at whole groups (a group straddling two ranks is refused).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgellm.errors import UserError
from edgellm.models.config import ArchConfig
from edgellm.quantization.modes import QuantMode

QKV = ("self_attn.qkv_proj", "attention.query_key_value")
GATE_UP = ("mlp.gate_up_proj",)
UP = ("mlp.dense_h_to_4h",)
O_PROJ = ("self_attn.o_proj", "attention.dense")
DOWN = ("mlp.down_proj", "mlp.dense_4h_to_h")
ROW_PARALLEL = O_PROJ + DOWN


def _even(n: int, parts: int, rank: int) -> range:
    """Rank's contiguous run when n units are dealt as evenly as possible (the first ranks get one more)."""
    base, extra = divmod(n, parts)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


@dataclass
class ShardPlan:
    """What rank `rank` of `world` keeps; `local` is the ArchConfig its modules are built with."""

    rank: int
    world: int
    full: ArchConfig
    local: ArchConfig
    q_heads: range
    kv_heads: range
    inter: range  # intermediate features
    vocab: range  # vocabulary rows held (the last rank's run may be short; padded to vocab_per)
    vocab_per: int
    mode: QuantMode | None

    def _rows(self, prefix: str) -> torch.Tensor | None:
        d, h, kvh, inter = self.full.head_dim, self.full.num_heads, self.full.num_kv_heads, self.full.intermediate_size
        if prefix.endswith(QKV):
            q = torch.arange(self.q_heads.start * d, self.q_heads.stop * d)
            k = torch.arange(self.kv_heads.start * d, self.kv_heads.stop * d)
            return torch.cat([q, h * d + k, (h + kvh) * d + k])
        i = torch.arange(self.inter.start, self.inter.stop)
        if prefix.endswith(GATE_UP):
            return torch.cat([i, inter + i])
        if prefix.endswith(UP):
            return i
        return None

    def _cols(self, prefix: str) -> range | None:
        d = self.full.head_dim
        if prefix.endswith(O_PROJ):
            return range(self.q_heads.start * d, self.q_heads.stop * d)
        if prefix.endswith(DOWN):
            return self.inter
        return None

    def slice(self, name: str, t: torch.Tensor, vocab_parts: tuple[str, ...]) -> torch.Tensor:
        """This rank's part of the full tensor `name` (a state-dict name); replicated ones unchanged."""
        prefix, leaf = name.rsplit(".", 1)
        if prefix in vocab_parts:  # embedding / untied head: a run of vocabulary rows, zero-padded
            part = t[self.vocab.start:self.vocab.stop]
            pad = self.vocab_per - part.shape[0]
            return torch.cat([part, part.new_zeros(pad, *part.shape[1:])]) if pad else part.clone()
        rows = self._rows(prefix)
        if rows is not None:
            return t.index_select(0, rows)
        cols = self._cols(prefix)
        if cols is None:
            return t
        if leaf == "bias":  # the partial sums are added up: one rank adds the bias
            return t.clone() if self.rank == 0 else torch.zeros_like(t)
        if leaf == "weight":
            return t[:, cols.start:cols.stop].contiguous()
        if leaf == "q_scale":  # one scale per group of input columns
            per = self.mode.group_size
            return t[:, cols.start // per:cols.stop // per].contiguous()
        epw = self.mode.elems_per_word if self.mode.kind == "group" else 1  # q_weight: packed words
        return t[:, cols.start // epw:cols.stop // epw].contiguous()


def plan_shards(arch: ArchConfig, mode: QuantMode | None, world: int, rank: int, source: str) -> ShardPlan:
    """The plan of `rank`, or a one-line UserError naming why this model cannot be split `world` ways."""
    h, kvh, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    head = f"{source}: tensor_parallel_shards={world}"
    if not 0 <= rank < world:
        raise UserError(f"{head}: rank {rank} is out of range")
    g = h // kvh
    if kvh >= world:
        kv = _even(kvh, world, rank)
    elif world % kvh == 0 and g % (world // kvh) == 0:
        kv = range(rank // (world // kvh), rank // (world // kvh) + 1)
    else:
        raise UserError(f"{head} cannot split {h} query heads over {kvh} key-value heads (use a number of "
                        f"shards at most {kvh}, or a multiple of {kvh} that divides {g})")
    q = plan_heads(h, kvh, world, rank)
    quant = mode is not None and mode.quantized
    unit = 1
    if quant:
        if not mode.group_size:
            raise UserError(f"{head}: per-channel quantization (group size 0) cannot be split by columns")
        unit = mode.group_size
        for k, what in ((h * d, "o_proj"), (arch.intermediate_size, "down_proj")):
            if k % unit:
                raise UserError(f"{head}: {what} has {k} input columns, not whole groups of {unit}")
        for r in range(world):  # every rank's o_proj columns must start and end on a group boundary
            heads = plan_heads(h, kvh, world, r)
            if (heads.start * d) % unit or (heads.stop * d) % unit:
                raise UserError(f"{head}: a quantization group of {unit} columns would straddle two shards in "
                                f"o_proj (shard {r} starts at column {heads.start * d}; head_dim {d})")
    units = arch.intermediate_size // unit
    if units < world:
        raise UserError(f"{head}: the MLP has {arch.intermediate_size} features, too few for {world} shards")
    run = _even(units, world, rank)
    inter = range(run.start * unit, run.stop * unit)
    vper = -(-arch.vocab_size // world)
    vocab = range(min(rank * vper, arch.vocab_size), min((rank + 1) * vper, arch.vocab_size))
    local = dataclasses.replace(arch, num_heads=len(q), num_kv_heads=len(kv), intermediate_size=len(inter),
                                vocab_size=vper)
    return ShardPlan(rank, world, arch, local, q, kv, inter, vocab, vper, mode)


def plan_heads(h: int, kvh: int, world: int, rank: int) -> range:
    """Query heads of `rank`: those of its kv heads, or (kv heads replicated on world / kvh ranks) its
    share of one kv head's query heads."""
    g = h // kvh
    if kvh >= world:
        kv = _even(kvh, world, rank)
        return range(kv.start * g, kv.stop * g)
    per = world // kvh
    group, sub = divmod(rank, per)
    return range(group * g + sub * (g // per), group * g + (sub + 1) * (g // per))


def check_shards(arch: ArchConfig, mode: QuantMode | None, world: int, source: str) -> None:
    """UserError (one line) when the model cannot be split `world` ways; run before any worker starts."""
    for r in range(world):
        plan_shards(arch, mode, world, r, source)


class RowParallel(nn.Module):
    """A row-parallel layer: this rank's partial product, summed over the ranks (one all-reduce)."""

    def __init__(self, inner: nn.Module, all_reduce: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.inner, self.all_reduce = inner, all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(self.inner(x))


class VocabParallelEmbedding(nn.Module):
    """Looks up the ids in this rank's vocabulary run (zeros for the others), summed over the ranks.

    `shard` is the local embedding (also the tied output head, over the same run)."""

    def __init__(self, shard: nn.Module, plan: ShardPlan, all_reduce: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.shard, self.start, self.per, self.all_reduce = shard, plan.vocab.start, plan.vocab_per, all_reduce

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.per)
        x = self.shard(torch.where(inside, local, torch.zeros_like(local)))
        return self.all_reduce(x * inside.unsqueeze(-1).to(x.dtype))


class VocabGather:
    """Logits [R, vocab_per] of each rank -> the full [R, vocab] (an all-gather along the vocabulary)."""

    def __init__(self, vocab_size: int, all_gather: Callable[[torch.Tensor], torch.Tensor]):
        self.vocab_size, self.all_gather = vocab_size, all_gather

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.all_gather(logits)[..., :self.vocab_size]


def install(model: nn.Module, plan: ShardPlan, comm) -> None:
    """Put the collectives into a loaded shard: all-reduce after each row-parallel layer and the
    embedding, an all-gather of the logits. `comm` has all_reduce(t) and all_gather(t) (last dim)."""
    for name, mod in list(model.named_modules()):
        if name.endswith(ROW_PARALLEL):
            parent, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), leaf, RowParallel(mod, comm.all_reduce))
    emb_parent, emb_leaf = model.PARTS[0].rsplit(".", 1)
    setattr(model.get_submodule(emb_parent), emb_leaf,
            VocabParallelEmbedding(model.get_submodule(model.PARTS[0]), plan, comm.all_reduce))
    model.tp_gather = VocabGather(plan.full.vocab_size, comm.all_gather)
    model.tp_comm = comm
    model.cfg = plan.full  # what callers read (vocabulary size, hidden size); the blocks keep `local`

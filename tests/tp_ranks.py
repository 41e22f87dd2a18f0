"""Rank 1 of the family parity test (tests/test_tensor_parallel.py), in a module light enough for a
spawned process to import quickly (no transformers)."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from edgellm.engine.distributed import Comm, make_group
from edgellm.engine.options import EngineOptions
from edgellm.engine.pool_setup import make_pool
from edgellm.models.base import Step
from edgellm.models.loader import load_model
from edgellm.models.sharding import install
from edgellm.quantization.layers import QuantEmbedding, QuantLinear

PROMPT = torch.tensor([5, 17, 33, 101, 250, 7, 64, 129, 300, 42, 11, 90])
DECODE = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_model(model_dir: Path, rank: int | None, comm: Comm | None) -> list[torch.Tensor]:
    """Prompt logits, then DECODE greedy steps' logits, of the whole model (rank None) or one shard."""
    model, cfg = load_model(model_dir, precision="high", shard=None if rank is None else (rank, 2))
    arch = model.cfg
    if rank is not None:
        install(model, model.shard_plan, comm)
        arch = model.shard_plan.local
    for m in model.modules():  # quantized layers run the native kernels on their shard (repack_model
        if isinstance(m, (QuantLinear, QuantEmbedding)):  # without its slow gc pass)
            m.repack()
    pool = make_pool(arch, cfg, EngineOptions(), "cpu", 64)
    slot = pool.new_slot()
    out, ids, pos = [], PROMPT, 0
    with torch.inference_mode():
        for _ in range(DECODE + 1):
            pool.reserve(slot, pos, pos + len(ids))
            logits = model(ids, Step.single(pos, len(ids), slot), pool)
            pool.set_length(slot, pos + len(ids))
            out.append(logits.float())
            pos += len(ids)
            ids = logits[-1:].argmax(-1)
    return out


def rank1(port: int, dirs: list[str]) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=60))
    store.set("edgellm/hello/1", "1")
    comm = Comm(make_group(store, 1, 2, "127.0.0.1"), 2)
    for d in dirs:
        run_model(Path(d), 1, comm)

"""Tensor parallelism on one host: per-rank resident memory and decode speed at 1 and N shards, and
the time rank 0 spends in the collectives per decoded token.

    python benchmarks/random_model.py qwen2.5-1.5b --context 1024 -o /tmp/qwen-1.5b-random
    python benchmarks/tensor_parallel.py /tmp/qwen-1.5b-random --shards 2

Each configuration gets the same cores in total (threads / shards per rank). On a shared or small
machine only the ratios of one run mean anything.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from edgellm.config import load_chat_config
from edgellm.engine.build import build_engine
from edgellm.engine.distributed import Comm, make_group
from edgellm.engine.options import make_options
from edgellm.models.base import Step
from edgellm.models.loader import arch_config


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(model_dir: str, shards: int, threads: int, prompt: int, gen: int) -> dict:
    opts = make_options({"tensor_parallel_shards": shards, "threads": max(1, threads // shards),
                         "max_num_sequence": 1, "context_window_size": prompt + gen + 64, "opt": "O1"})
    core = build_engine(model_dir, opts, "cpu")
    runner, pool = core.runner, core.pool
    procs = getattr(getattr(runner, "link", None), "procs", [])
    rss = [rss_mib(os.getpid())] + [rss_mib(p.pid) for p in procs]
    slot = pool.new_slot()
    pool.reserve(slot, 0, prompt + gen)
    ids = torch.randint(100, 1000, (prompt,), generator=torch.Generator().manual_seed(0))
    logits = runner.forward(ids, Step.single(0, prompt, slot, last_only=True))
    pool.set_length(slot, prompt)
    comm = getattr(core.model, "tp_comm", None)
    calls0, secs0 = (comm.calls, comm.seconds) if comm else (0, 0.0)
    t0 = time.perf_counter()
    for i in range(gen):
        tok = logits[-1:].argmax(-1)
        pos = prompt + i
        pool.reserve(slot, pos, pos + 1)
        logits = runner.forward(tok, Step.single(pos, 1, slot))
        pool.set_length(slot, pos + 1)
    dt = time.perf_counter() - t0
    out = {"shards": shards, "rss_mib": [round(r) for r in rss], "decode_tok_s": gen / dt}
    if comm:
        out["collectives_per_token"] = (comm.calls - calls0) / gen
        out["collective_ms_per_token"] = (comm.seconds - secs0) / gen * 1000
    if hasattr(runner, "close"):
        runner.close()
    return out


def _comm_rank1(port: int, hidden: int, vocab_part: int, layers: int, tokens: int) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=120))
    store.set("edgellm/hello/1", "1")
    _token_collectives(Comm(make_group(store, 1, 2, "127.0.0.1"), 2), hidden, vocab_part, layers, tokens)


def _token_collectives(comm, hidden: int, vocab_part: int, layers: int, tokens: int) -> None:
    """One decoded token's collectives: 2 per layer and the embedding's ([1, hidden]), the logits' gather."""
    for _ in range(tokens):
        for _ in range(2 * layers + 1):
            comm.all_reduce(torch.ones(1, hidden))
        comm.all_gather(torch.ones(1, vocab_part))


def collectives_only(hidden: int, vocab: int, layers: int, tokens: int = 20) -> float:
    """ms per token of a decode step's collectives alone (2 ranks, no compute in between)."""
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=120))
    p = torch.multiprocessing.get_context("spawn").Process(
        target=_comm_rank1, args=(port, hidden, -(-vocab // 2), layers, tokens + 2), daemon=True)
    p.start()
    store.wait(["edgellm/hello/1"], datetime.timedelta(seconds=120))
    comm = Comm(make_group(store, 0, 2, "127.0.0.1"), 2)
    _token_collectives(comm, hidden, -(-vocab // 2), layers, 2)  # warm up
    t0 = time.perf_counter()
    _token_collectives(comm, hidden, -(-vocab // 2), layers, tokens)
    ms = (time.perf_counter() - t0) / tokens * 1000
    p.join(30)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores in total, split over the ranks")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--collectives-only", action="store_true", help="only time a token's collectives")
    a = ap.parse_args()
    if a.collectives_only:
        arch = arch_config(load_chat_config(Path(a.model)))
        print({"collectives_only_ms_per_token": collectives_only(arch.hidden_size, arch.vocab_size, arch.num_layers)})
        return
    for shards in (1, a.shards):
        print(measure(a.model, shards, a.threads, a.prompt_len, a.gen_len), flush=True)
    arch = arch_config(load_chat_config(Path(a.model)))
    print({"collectives_only_ms_per_token": collectives_only(arch.hidden_size, arch.vocab_size, arch.num_layers)})


if __name__ == "__main__":
    main()

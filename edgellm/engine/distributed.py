"""Tensor parallelism across processes on torch.distributed (gloo on CPU).

Rank 0 is the engine: its EngineCore schedules and samples as always, with a `DistributedRunner`
in place of the ModelRunner. Before each forward the runner puts the step into the group's TCPStore
(key edgellm/step/<n>, pickled: the KV-pool calls made since the last step, the token row, the Step
fields); every worker waits for that key, replays the pool calls on its own pool (same slots, same
lengths, only its heads) and runs the same forward over its shard (models/sharding.py). The layers'
all-reduces and the logits' all-gather run on a ProcessGroupGloo whose every collective has a
timeout (EDGELLM_TP_TIMEOUT seconds, 30 by default); a worker's death closes its sockets, which
fails the collective at once.

One host: `tensor_parallel_parts` spawns shards - 1 worker processes itself (torch.multiprocessing,
spawn); a watchdog thread marks the engine failed as soon as one exits, and workers leave when
their parent goes. Across hosts the same command runs under torchrun (RANK, WORLD_SIZE,
MASTER_ADDR set): rank 0 returns the engine, the others serve steps until rank 0 stops
(docs/distributed.md).

At O2 the one-call native decode step cannot all-reduce between layers, so ranks run the O1
per-layer path (native kernels on their shard).
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from edgellm.config import ChatConfig
from edgellm.engine.kv_pool import KVPool
from edgellm.engine.options import EngineOptions
from edgellm.engine.runner import ModelRunner
from edgellm.errors import UserError
from edgellm.models.base import Step

log = logging.getLogger("edgellm.engine")

STEP_KEY = "edgellm/step/{}"
STARTUP_SECONDS = 600.0  # loading a shard of a large model (the liveness watch ends it early)
# Pool calls that change what a rank's pool holds; rank 0 records them, the workers replay them.
POOL_CALLS = ("new_slot", "free", "clear_prefix_cache", "reserve", "set_length", "commit", "take_prefix", "fork")


class ShardLost(RuntimeError):
    """A tensor-parallel rank is gone: the engine cannot run any more."""


def collective_timeout() -> float:
    return float(os.environ.get("EDGELLM_TP_TIMEOUT", "30"))


class Comm:
    """The collectives a shard's layers call (models/sharding.py: install)."""

    def __init__(self, group: dist.ProcessGroupGloo, world: int):
        self.group, self.world = group, world
        self.calls, self.seconds = 0, 0.0  # collectives run and the time spent in them (incl. waiting)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        x = t.float().contiguous() if t.dtype != torch.float32 else t.contiguous()
        self.group.allreduce([x]).wait()
        self.calls, self.seconds = self.calls + 1, self.seconds + time.perf_counter() - t0
        return x.to(t.dtype)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        x = t.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.group.allgather([parts], [x]).wait()
        self.calls, self.seconds = self.calls + 1, self.seconds + time.perf_counter() - t0
        return torch.cat(parts, dim=-1)


class RecordingPool(KVPool):
    """Rank 0's KV pool: also records each outermost mutating call for the workers to replay."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, tuple, dict]] = []
        self._depth = 0

    def take_calls(self) -> list[tuple[str, tuple, dict]]:
        calls, self.calls = self.calls, []
        return calls


def _recorded(name: str):
    def call(self, *args, **kwargs):
        if self._depth == 0:  # fork calls new_slot: replaying fork does that again
            self.calls.append((name, tuple(list(a) if isinstance(a, list) else a for a in args), kwargs))
        self._depth += 1
        try:
            return getattr(KVPool, name)(self, *args, **kwargs)
        finally:
            self._depth -= 1
    call.__name__ = name
    return call


for _name in POOL_CALLS:
    setattr(RecordingPool, _name, _recorded(_name))


class Link:
    """Rank 0's side of the step messages, and the watch over the local workers' liveness."""

    def __init__(self, store: dist.Store, procs: list, group: dist.ProcessGroupGloo):
        self.store, self.procs, self.group = store, procs, group
        self.n = 0
        self.failure: str | None = None
        self._stop = threading.Event()
        if procs:
            threading.Thread(target=self._watch, name="edgellm-tp-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for rank, p in enumerate(self.procs, 1):
                if not p.is_alive():
                    self.fail(f"tensor-parallel worker {rank} (pid {p.pid}) exited with code {p.exitcode}; "
                              "restart the engine")
                    return

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            log.error(why)

    def send(self, msg: tuple) -> None:
        if self.failure is not None:
            raise ShardLost(self.failure)
        self.store.set(STEP_KEY.format(self.n), pickle.dumps(msg))
        if self.n:  # every rank has read step n-1: it ran that step's collectives with us
            self.store.delete_key(STEP_KEY.format(self.n - 1))
        self.n += 1

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self.failure is None:
            try:
                self.send(("stop",))
            except Exception:  # noqa: BLE001 - the workers notice their parent going anyway
                pass
            self.failure = "the engine was stopped"
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(timeout)


class DistributedRunner(ModelRunner):
    """Rank 0's ModelRunner: sends each step to the workers, then runs its own shard."""

    def __init__(self, model, pool: RecordingPool, device: str, opt: str, link: Link):
        super().__init__(model, pool, device, opt=per_layer_opt(opt))
        self.link = link

    @property
    def failure(self) -> str | None:
        """Why the engine cannot run (a worker died), or None."""
        return self.link.failure

    def forward(self, tokens: torch.Tensor, step: Step) -> torch.Tensor:
        rows = None if step.logit_rows is None else step.logit_rows.tolist()
        self.link.send(("step", self.pool.take_calls(), tokens.tolist(), step.slots, step.starts, step.lengths, rows))
        try:
            return super().forward(tokens, step)
        except Exception as e:
            time.sleep(0.5)  # let the watchdog name the worker that died
            self.link.fail(f"a tensor-parallel collective failed ({str(e).splitlines()[0][:200]}); restart the engine")
            raise ShardLost(self.link.failure) from e

    def close(self) -> None:
        self.link.close()


def per_layer_opt(opt: str) -> str:
    """O2/O3's fused decode step cannot all-reduce mid-layer: shards run O1 (the per-layer path)."""
    return "O1" if opt in ("O2", "O3") else opt


def shard_count(cfg: ChatConfig, options: EngineOptions) -> int:
    """The engine option, else mlc-chat-config.json's tensor_parallel_shards."""
    return options.tensor_parallel_shards or cfg.tensor_parallel_shards or 1


def make_group(store: dist.Store, rank: int, world: int, host: str | None) -> dist.ProcessGroupGloo:
    """A gloo group over `store` whose collectives time out (collective_timeout); `host` is the local
    address to bind (None: gloo's default device, from the host name)."""
    opts = dist.ProcessGroupGloo._Options()
    device = (dist.ProcessGroupGloo.create_device(hostname=host) if host is not None
              else dist.ProcessGroupGloo.create_default_device())
    opts._devices = [device]
    opts._timeout = datetime.timedelta(seconds=collective_timeout())
    return dist.ProcessGroupGloo(dist.PrefixStore("edgellm/pg", store), rank, world, opts)


def _await(store: dist.Store, key: str, procs: list, what: str) -> None:
    """Wait for `key` while the local workers live; a worker's own error is reported as it wrote it."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        for rank, p in enumerate(procs, 1):
            if store.check([f"edgellm/error/{rank}"]):
                raise UserError(f"tensor-parallel worker {rank}: {store.get(f'edgellm/error/{rank}').decode()}")
            if not p.is_alive():
                raise UserError(f"tensor-parallel worker {rank} exited with code {p.exitcode} while {what}")
        try:
            store.wait([key], datetime.timedelta(seconds=0.5))
            return
        except dist.DistStoreError:
            continue
    raise UserError(f"tensor-parallel workers were not ready after {STARTUP_SECONDS:.0f} s ({what})")


def shard_parts(model_dir: Path, cfg: ChatConfig, options: EngineOptions, device: str, ctx: int,
                rank: int, world: int, group: dist.ProcessGroupGloo, link: Link | None = None):
    """(model, pool, runner) of one rank: its shard with the collectives installed."""
    from edgellm.engine.pool_setup import make_pool
    from edgellm.models.loader import load_model
    from edgellm.models.sharding import install
    from edgellm.quantization.layers import DEFAULT_PRECISION

    model, _ = load_model(model_dir, device=device, use_mmap=options.use_mmap, max_positions=ctx,
                          verify=options.verify_weights, precision=options.precision or DEFAULT_PRECISION,
                          shard=(rank, world))
    plan = model.shard_plan
    install(model, plan, Comm(group, world))
    pool = make_pool(plan.local, cfg, options, device, ctx, RecordingPool if rank == 0 else KVPool)
    if rank == 0:
        return model, pool, DistributedRunner(model, pool, device, options.opt, link)
    return model, pool, ModelRunner(model, pool, device, opt=per_layer_opt(options.opt))


def tensor_parallel_parts(model_dir: Path, cfg: ChatConfig, options: EngineOptions, device: str, ctx: int,
                          shards: int):
    """Rank 0's (model, pool, DistributedRunner); starts the local workers, or joins torchrun's ranks
    (where a rank other than 0 serves steps here and then exits the process)."""
    from edgellm.models.loader import arch_config
    from edgellm.models.sharding import check_shards
    from edgellm.quantization.modes import get_mode

    if device != "cpu":
        raise UserError(f"tensor_parallel_shards={shards} runs on cpu (gloo) only; got device {device}")
    if options.speculative_mode != "disable":
        raise UserError("speculative decoding and tensor_parallel_shards > 1 cannot be combined yet")
    check_shards(arch_config(cfg), get_mode(cfg.quantization, cfg.quantization_layout), shards,
                 str(model_dir / "mlc-chat-config.json"))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        return _torchrun_parts(model_dir, cfg, options, device, ctx, shards)
    threads = options.threads or max(1, (os.cpu_count() or 1) // shards)
    torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, shards, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=STARTUP_SECONDS))
    mp = torch.multiprocessing.get_context("spawn")
    procs = []
    for rank in range(1, shards):
        p = mp.Process(target=worker_main, name=f"edgellm-tp{rank}", daemon=True,
                       args=(rank, shards, "127.0.0.1", port, str(model_dir), cfg, options, device, ctx, threads,
                             os.getpid()))
        p.start()
        procs.append(p)
    try:
        for rank in range(1, shards):
            _await(store, f"edgellm/hello/{rank}", procs, "starting")
        group = make_group(store, 0, shards, "127.0.0.1")
        link = Link(store, procs, group)
        parts = shard_parts(model_dir, cfg, options, device, ctx, 0, shards, group, link)
        for rank in range(1, shards):
            _await(store, f"edgellm/ready/{rank}", procs, "loading its shard")
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return parts


def _torchrun_parts(model_dir, cfg, options, device, ctx, shards):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != shards:
        raise UserError(f"torchrun started {world} processes but tensor_parallel_shards is {shards}")
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("EDGELLM_TP_PORT") or int(os.environ.get("MASTER_PORT", "29500")) + 1)
    store = dist.TCPStore(host, port, world, is_master=rank == 0, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=STARTUP_SECONDS))
    group = make_group(store, rank, world, None)
    if rank != 0:
        _, _, runner = shard_parts(model_dir, cfg, options, device, ctx, rank, world, group)
        store.set(f"edgellm/ready/{rank}", "1")
        serve_steps(store, runner, None)
        os._exit(0)  # not SystemExit: the group's destructors could block on a dead peer
    link = Link(store, [], group)
    parts = shard_parts(model_dir, cfg, options, device, ctx, 0, world, group, link)
    for r in range(1, world):
        _await(store, f"edgellm/ready/{r}", [], "loading its shard")
    return parts


def worker_main(rank: int, world: int, host: str, port: int, model_dir: str, cfg: ChatConfig,
                options: EngineOptions, device: str, ctx: int, threads: int, parent: int) -> None:
    """A local worker process: join the group, load this rank's shard, serve steps until told to stop
    or until the parent process is gone."""
    torch.set_num_threads(threads)
    store = dist.TCPStore(host, port, world, is_master=False, timeout=datetime.timedelta(seconds=60))
    store.set(f"edgellm/hello/{rank}", "1")
    try:
        group = make_group(store, rank, world, host)
        _, _, runner = shard_parts(Path(model_dir), cfg, options, device, ctx, rank, world, group)
    except Exception as e:  # noqa: BLE001 - reported to rank 0 as one line
        store.set(f"edgellm/error/{rank}", f"{type(e).__name__}: {e}")
        os._exit(1)
    store.set(f"edgellm/ready/{rank}", "1")
    code = 1
    try:
        serve_steps(store, runner, parent)
        code = 0
    finally:  # nothing to clean up; the group's destructors could block on a dead peer
        os._exit(code)


def serve_steps(store: dist.Store, runner: ModelRunner, parent: int | None) -> None:
    """A worker's loop: wait for step n, replay its pool calls, run the forward; until "stop", or
    until rank 0 (or, for a local worker, the parent process) is gone."""
    n = 0
    while True:
        key = STEP_KEY.format(n)
        try:
            store.wait([key], datetime.timedelta(seconds=1))
        except dist.DistStoreError as e:
            if "timeout" in str(e).lower() and (parent is None or os.getppid() == parent):
                continue  # idle: no step yet
            return
        except Exception:  # noqa: BLE001 - the store (rank 0) is gone
            return
        msg = pickle.loads(store.get(key))
        n += 1
        if msg[0] == "stop":
            return
        _, calls, ids, slots, starts, lengths, rows = msg
        for name, args, kwargs in calls:
            getattr(runner.pool, name)(*args, **kwargs)
        step = Step(slots, starts, lengths, logit_rows=None if rows is None else torch.tensor(rows, dtype=torch.long))
        runner.forward(torch.tensor(ids, dtype=torch.long), step)

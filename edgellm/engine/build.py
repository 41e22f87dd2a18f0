"""`build_engine`: the one place that wires a converted model directory into an EngineCore.

model dir -> chat config -> (eager model + KVPool + ModelRunner) or (compiled library + SlotLedger)
          -> Scheduler -> EngineCore
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgellm.config import ChatConfig, load_chat_config
from edgellm.engine.core import EngineCore
from edgellm.engine.distributed import shard_count
from edgellm.engine.kv_pool import KVPool, SlotLedger
from edgellm.engine.options import EngineOptions
from edgellm.engine.pool_setup import make_pool
from edgellm.engine.runner import ModelRunner
from edgellm.engine.sampler import Sampler
from edgellm.engine.scheduler import Scheduler
from edgellm.engine.speculative import Speculator
from edgellm.errors import UserError
from edgellm.models.loader import arch_config, load_model, runtime_context
from edgellm.models.lora import LoraSet
from edgellm.models.registry import get_family
from edgellm.quantization.layers import DEFAULT_PRECISION


def pick_device(device: str | None) -> str:
    """'auto' -> cuda, mps or cpu (what this machine has); otherwise checked."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {device!r}; choose from auto, cpu, cuda, mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device cuda requested but CUDA is not available")
    return device


def build_engine(model_dir: str | Path, options: EngineOptions, device: str = "cpu",
                 model_lib: str | Path | None = None, config: ChatConfig | None = None) -> EngineCore:
    """An EngineCore for a converted model directory (and optionally a compiled model library)."""
    model_dir = Path(model_dir)
    if options.threads:  # asked for explicitly; otherwise the process's setting stands
        torch.set_num_threads(options.threads)
    cfg = config or load_chat_config(model_dir)
    arch = arch_config(cfg)
    ctx = options.context_window_size or runtime_context(cfg, arch)
    chunk = options.prefill_chunk_size or cfg.prefill_chunk_size or 2048
    if model_lib is not None and shard_count(cfg, options) > 1:
        raise UserError("tensor_parallel_shards > 1 runs the eager engine; drop --model-lib")
    if model_lib is not None:  # the library's runner keeps its own weights and caches
        from edgellm.compile.runtime import load_library

        if options.speculative_mode != "disable":
            raise UserError("speculative decoding runs on the eager engine; drop --model-lib or "
                            "speculative_mode")
        if options.lora_adapters:
            raise UserError("LoRA adapters at run time need the eager engine; drop --model-lib or --lora")
        ledger = SlotLedger()
        runner = load_library(model_lib, model_dir, cfg, arch, device, options.num_sequences, ledger)
        scheduler = Scheduler(ledger, options.num_sequences, chunk, options.reuse_kv)
        return EngineCore(runner, scheduler, Sampler(), min(ctx, runner.context_window))
    shards = shard_count(cfg, options)
    if shards > 1 and options.lora_adapters:
        raise UserError("LoRA adapters at run time are not split over shards; drop --lora or "
                        "tensor_parallel_shards (or merge the adapter at convert: --lora-adapter)")
    if shards > 1:  # rank 0 of a tensor-parallel group (edgellm.engine.distributed)
        from edgellm.engine.distributed import tensor_parallel_parts

        model, pool, runner = tensor_parallel_parts(model_dir, cfg, options, device, ctx, shards)
        return EngineCore(runner, Scheduler(pool, options.num_sequences, chunk, options.reuse_kv), Sampler(), ctx,
                          model=model)
    model, pool, runner = eager_parts(model_dir, cfg, options, device, ctx)
    speculator = None
    if options.speculative_mode == "ngram":
        speculator = Speculator("ngram", options.spec_draft_length)
    elif options.speculative_mode == "small_draft":
        draft_dir = Path(options.additional_models[0])
        draft_cfg = load_chat_config(draft_dir)
        check_same_vocabulary(model_dir, cfg, draft_dir, draft_cfg)
        _, draft_pool, draft_runner = eager_parts(draft_dir, draft_cfg, options, device, ctx, fused_catch_up=8)
        speculator = Speculator("small_draft", options.spec_draft_length, draft_runner, draft_pool)
    scheduler = Scheduler(pool, options.num_sequences, chunk, options.reuse_kv)
    core = EngineCore(runner, scheduler, Sampler(), ctx, model=model, speculator=speculator)
    core.lora = runner.lora = LoraSet(model, get_family(cfg.model_type), cfg.model_type)
    for name, path in options.lora_adapters.items():
        core.lora.add(core.lora.read(name, path))
    return core


def eager_parts(model_dir: Path, cfg: ChatConfig, options: EngineOptions, device: str, ctx: int,
                fused_catch_up: int = 1) -> tuple[torch.nn.Module, KVPool, ModelRunner]:
    """An eager model with its own KVPool (the options' budget and KV dtype) and ModelRunner."""
    model, _ = load_model(model_dir, device=device, use_mmap=options.use_mmap, max_positions=ctx,
                          verify=options.verify_weights, precision=options.precision or DEFAULT_PRECISION)
    if options.memory == "high" and (device != "cpu" or options.opt == "O0"):
        from edgellm.compile.lowering import float_model  # no native kernels: float weights are faster

        model = float_model(model)
    pool = make_pool(model.cfg, cfg, options, device, ctx)
    return model, pool, ModelRunner(model, pool, device, opt=options.opt, fused_catch_up=fused_catch_up)


def _vocab(model_dir: Path) -> dict | None:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    tok = json.loads(path.read_text(encoding="utf-8"))
    return {"vocab": (tok.get("model") or {}).get("vocab"),
            "added": sorted((t.get("id"), t.get("content")) for t in tok.get("added_tokens") or [])}


def check_same_vocabulary(target_dir: Path, target: ChatConfig, draft_dir: Path, draft: ChatConfig) -> None:
    """A draft model must speak the target's token ids: same vocabulary size and tokenizer."""
    if target.vocab_size != draft.vocab_size:
        raise UserError(f"the draft model {draft_dir} has a vocabulary of {draft.vocab_size} tokens but the "
                        f"target has {target.vocab_size}: small_draft needs the same tokenizer")
    if _vocab(target_dir) != _vocab(draft_dir):
        raise UserError(f"the draft model {draft_dir} has a different tokenizer than the target "
                        f"{target_dir}: small_draft needs the same token ids")

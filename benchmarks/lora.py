"""Decode speed with run-time LoRA adapters vs the adapter merged at conversion (issue 20).

SmolLM2-135M-Instruct (the bundled GGUF) in q4f16_1, random r=16 adapters on every linear layer of the
decoder (q/k/v/o, gate/up/down), a batch of 8 sequences:

    merged      the adapter merged into the weights at convert (the fused native decode step)
    0 adapters  the unmerged base, no request uses an adapter (the fused native decode step)
    1 adapter   all 8 requests use the same adapter (eager step: base kernels + one low-rank update)
    4 adapters  requests use 4 adapters in turn (eager step: base kernels + 4 grouped low-rank updates)

The configurations run interleaved, repetition by repetition, so a loaded machine slows them alike; only
the ratios mean something.

    python benchmarks/lora.py [--batch 8] [--prompt-len 64] [--gen-len 32] [--repeat 2] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from vs_llamacpp import smollm2_gguf  # benchmarks/ is on the path when this runs as a script

from edgellm.bench import BenchSession
from edgellm.config import load_chat_config
from edgellm.models.loader import arch_config
from edgellm.prepare import prepare_model
from edgellm.weights.convert import convert_weight

TARGETS = {"self_attn.q_proj": ("hidden", "q"), "self_attn.k_proj": ("hidden", "kv"),
           "self_attn.v_proj": ("hidden", "kv"), "self_attn.o_proj": ("q", "hidden"),
           "mlp.gate_proj": ("hidden", "inter"), "mlp.up_proj": ("hidden", "inter"),
           "mlp.down_proj": ("inter", "hidden")}


def write_adapter(out: Path, arch, rank: int, seed: int) -> Path:
    """A random PEFT LoRA adapter (A and B non-zero) on every linear layer of a llama-shaped model."""
    g = torch.Generator().manual_seed(seed)
    dims = {"hidden": arch.hidden_size, "q": arch.num_heads * arch.head_dim,
            "kv": arch.num_kv_heads * arch.head_dim, "inter": arch.intermediate_size}
    tensors = {}
    for layer in range(arch.num_layers):
        for module, (fan_in, fan_out) in TARGETS.items():
            p = f"base_model.model.model.layers.{layer}.{module}."
            tensors[p + "lora_A.weight"] = torch.randn(rank, dims[fan_in], generator=g) / dims[fan_in] ** 0.5
            tensors[p + "lora_B.weight"] = torch.randn(dims[fan_out], rank, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": [m.split(".")[1] for m in TARGETS], "bias": "none", "fan_in_fan_out": False}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=None, help="keep the adapters and the merged model here (reused next time)")
    args = ap.parse_args()

    base = prepare_model(None, quantization="q4f16_1")
    arch = arch_config(load_chat_config(base))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="edgellm-lora-bench-"))
    try:
        adapters = {f"a{i}": str(write_adapter(work / f"a{i}", arch, args.rank, i)) for i in range(4)}
        merged = work / "merged"
        if not (merged / "tensor-cache.json").is_file():
            print("converting the merged model ...", flush=True)
            convert_weight(smollm2_gguf(), "q4f16_1", merged, lora_adapter=adapters["a0"], progress=False)
        for f in base.iterdir():  # the chat config and tokenizer of the base
            if f.is_file() and not (merged / f.name).exists():
                shutil.copy(f, merged / f.name)
        kw = dict(threads=args.threads, batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
                  log=lambda m: None)
        s_merged = BenchSession(str(merged), **kw)
        s_base = BenchSession(str(base), lora_adapters=adapters, **kw)
        all4 = list(s_base.adapters)
        configs = {"merged": (s_merged, []), "0 adapters": (s_base, []), "1 adapter": (s_base, all4[:1]),
                   "4 adapters": (s_base, all4)}
        tg: dict[str, list[float]] = {name: [] for name in configs}
        for rep in range(args.repeat + 1):  # the first round warms up
            for name, (session, use) in configs.items():
                session.adapters = use
                _, speed = session.run_once()
                print(f"  round {rep} {name}: {speed:.1f} tok/s{' (warm-up)' if not rep else ''}", flush=True)
                if rep:
                    tg[name].append(speed)
        ref = statistics.mean(tg["merged"])
        print(f"SmolLM2-135M q4f16_1, batch {args.batch}, r={args.rank} on all linear layers, "
              f"{s_base.threads} threads, {args.repeat} interleaved repetitions (decode tokens/s)")
        for name, values in tg.items():
            mean = statistics.mean(values)
            print(f"  {name:11s} {mean:8.1f} tok/s  ({mean / ref:.2f}x merged)")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Write a converted model directory with random weights in a real model's shape (for speed tests).

    python benchmarks/random_model.py qwen2.5-1.5b --quantization q4f16_1 -o /tmp/qwen-1.5b-random

The directory loads like any converted model (mlc-chat-config.json, tensor-cache.json, shards) and
runs with `edgellm bench DIR`. Weights are random codes with scales chosen so activations stay in
range; there is no tokenizer (bench feeds token ids). Streams tensor by tensor: memory stays near
one tensor.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

PRESETS: dict[str, dict] = {
    "qwen2.5-1.5b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "vocab_size": 151936, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "bos_token_id": 151643, "eos_token_id": 151645, "use_sliding_window": False},
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "vocab_size": 151936, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "bos_token_id": 151643, "eos_token_id": 151645, "use_sliding_window": False},
    "smollm2-135m": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2},
}


def make_random_model(preset: str | dict, quantization: str, out: str | Path, *, context: int = 4096,
                      seed: int = 0) -> Path:
    from edgellm.models.loader import build_model, expected_tensors
    from edgellm.models.mapping import to_disk_name
    from edgellm.models.registry import get_family
    from edgellm.quantization.modes import get_mode
    from edgellm.weights.tensor_cache import ShardWriter

    hf = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    mode = get_mode(quantization)
    family = get_family(hf["model_type"])
    arch = family.parse_config(hf)
    model = build_model(family, arch, mode, 16)
    want = expected_tensors(model)
    g = torch.Generator().manual_seed(seed)
    writer = ShardWriter(out)
    dt = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[mode.model_dtype]
    for name, (shape, kind) in want.items():
        if kind == "quant":
            n, k = shape
            base = name[: -len(".weight")]
            if mode.quantized:
                pshape = mode.packed_shape(n, k)
                if mode.kind == "group":
                    q = torch.randint(-2**31, 2**31 - 1, pshape, dtype=torch.int32, generator=g)
                    spread = 4.3  # std of a uniform code minus its offset, 4-bit
                else:
                    q = torch.randint(-127, 128, pshape, dtype=torch.int8, generator=g)
                    spread = 73.0
                s = torch.full((n, mode.num_groups(k)), 0.7 / (spread * math.sqrt(k)), dtype=mode.model_dtype)
                writer.add(to_disk_name(family, base + ".q_weight"), q, "uint32" if mode.kind == "group" else "int8",
                           logical_numel=n * k)
                writer.add(to_disk_name(family, base + ".q_scale"), s, dt, 0)
            continue
        if name.endswith(".weight") and ("norm" in name or "ln" in name.split(".")[-2]):
            t = torch.ones(shape, dtype=mode.model_dtype)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, dtype=mode.model_dtype)
        else:
            t = (torch.randn(shape, generator=g) / math.sqrt(shape[-1])).to(mode.model_dtype)
        writer.add(to_disk_name(family, name), t, dt)
    writer.close()
    cfg = {
        "model_type": hf["model_type"], "quantization": quantization, "model_config": hf,
        "vocab_size": hf["vocab_size"], "context_window_size": context, "sliding_window_size": -1,
        "prefill_chunk_size": 2048, "attention_sink_size": -1, "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1, "max_batch_size": 8, "temperature": 1.0, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "repetition_penalty": 1.0, "top_p": 1.0, "conv_template": "LM",
        "pad_token_id": 0, "bos_token_id": hf.get("bos_token_id", 1), "eos_token_id": hf.get("eos_token_id", 2),
        "tokenizer_files": [], "tokenizer_info": {}, "version": "0.1.0",
    }
    (out / "mlc-chat-config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("--quantization", default="q4f16_1")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    out = make_random_model(args.preset, args.quantization, args.output, context=args.context)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

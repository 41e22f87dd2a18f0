"""GPTQ and AWQ checkpoints: dequantized on read, requantized by convert_weight, same logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

from tests.helpers import convert, run_logits, write_tokenizer

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GROUP = 32


def _quantize(w: torch.Tensor, g_idx: torch.Tensor):
    """Asymmetric 4-bit per group (groups chosen by g_idx over K): integer codes, zeros, scales."""
    wt = w.t()  # [K, N]
    groups = int(g_idx.max()) + 1
    scales = torch.zeros(groups, wt.shape[1])
    zeros = torch.zeros(groups, wt.shape[1], dtype=torch.int32)
    for g in range(groups):
        rows = wt[g_idx == g]
        lo, hi = rows.min(0).values, rows.max(0).values
        scales[g] = ((hi - lo) / 15).clamp(min=1e-8).half().float()
        zeros[g] = torch.round(-lo / scales[g]).clamp(0, 15).int()
    q = torch.clamp(torch.round(wt / scales[g_idx]) + zeros[g_idx], 0, 15).int()
    deq = ((q - zeros[g_idx]).float() * scales[g_idx]).t()
    return q, zeros, scales.half(), deq


def _pack_along_rows(v: torch.Tensor) -> torch.Tensor:  # [K, N] -> [K/8, N]
    out = torch.zeros(v.shape[0] // 8, v.shape[1], dtype=torch.int64)
    for j in range(8):
        out |= v[j::8].long() << (4 * j)
    return torch.where(out >= 2**31, out - 2**32, out).int()


def _pack_along_cols(v: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:  # [R, N] -> [R, N/8]
    out = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for i, col in enumerate(order):
        out |= v[:, col::8].long() << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).int()


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_prequantized_checkpoint_converts_exactly(fmt, tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = tf.LlamaForCausalLM(cfg).eval()
    tensors = {}
    for name, t in model.state_dict().items():
        prefix = name.rsplit(".", 1)[0]
        if not any(prefix.endswith(lin) for lin in LINEARS):
            tensors[name] = t.clone()
            continue
        k = t.shape[1]
        if fmt == "gptq":  # act-order: groups are a permutation of K
            g_idx = (torch.randperm(k) // GROUP).int()
        else:
            g_idx = (torch.arange(k) // GROUP).int()
        q, zeros, scales, deq = _quantize(t, g_idx)
        with torch.no_grad():
            t.copy_(deq)  # the reference model computes with exactly the stored weights
        if fmt == "gptq":
            tensors.update({f"{prefix}.qweight": _pack_along_rows(q), f"{prefix}.qzeros": _pack_along_cols(zeros - 1),
                            f"{prefix}.scales": scales, f"{prefix}.g_idx": g_idx})
        else:
            order = (0, 2, 4, 6, 1, 3, 5, 7)
            tensors.update({f"{prefix}.qweight": _pack_along_cols(q, order),
                            f"{prefix}.qzeros": _pack_along_cols(zeros, order), f"{prefix}.scales": scales})
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, hf / "model.safetensors")
    conf = cfg.to_dict()
    conf["quantization_config"] = ({"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True,
                                    "sym": False} if fmt == "gptq" else
                                   {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm"})
    (hf / "config.json").write_text(json.dumps(conf))
    write_tokenizer(hf)
    out = convert(hf, tmp_path / "out", "q0f32", conv_template="chatml")  # source format auto-detected
    ids = torch.randint(5, 384, (24,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(ids[None]).logits[0]
    assert (run_logits(out, ids) - ref).abs().max().item() < 1e-4

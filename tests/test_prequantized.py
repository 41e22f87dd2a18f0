"""GPTQ and AWQ checkpoints: dequantized on read, requantized by convert_weight, same logits; AWQ
kept as it is with q4f16_awq."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

from edgellm.cli.main import main
from tests.helpers import convert, run_logits, save_hf, write_tokenizer

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


def make_checkpoint(fmt: str, tmp_path, half: bool = False):
    """(reference transformers model computing with exactly the stored weights, checkpoint dir).
    half: the float tensors are float16 (as AutoAWQ writes them), so a float16 mode keeps them exactly."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = tf.LlamaForCausalLM(cfg).eval()
    tensors = {}
    for name, t in model.state_dict().items():
        prefix = name.rsplit(".", 1)[0]
        if not any(prefix.endswith(lin) for lin in LINEARS):
            if half:
                with torch.no_grad():
                    t.copy_(t.half().float())
            tensors[name] = t.half() if half else t.clone()
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
    return model, hf


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_prequantized_checkpoint_converts_exactly(fmt, tmp_path):
    model, hf = make_checkpoint(fmt, tmp_path)
    out = convert(hf, tmp_path / "out", "q0f32", conv_template="chatml")  # source format auto-detected
    ids = torch.randint(5, 384, (24,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(ids[None]).logits[0]
    assert (run_logits(out, ids) - ref).abs().max().item() < 1e-4


def test_q4f16_awq_keeps_the_checkpoints_codes_scales_and_zeros(tmp_path, capsys):
    """convert_weight/gen_config --quantization q4f16_awq through the CLI: the AWQ checkpoint's own
    numbers are stored (no requantization), so the logits equal the dequantized reference's."""
    model, hf = make_checkpoint("awq", tmp_path, half=True)
    out = tmp_path / "out"
    for cmd in (["convert_weight", str(hf), "--quantization", "q4f16_awq", "-o", str(out)],
                ["gen_config", str(hf), "--quantization", "q4f16_awq", "--conv-template", "chatml", "-o", str(out)]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0, capsys.readouterr().err
    chat_cfg = json.loads((out / "mlc-chat-config.json").read_text())
    assert chat_cfg["quantization"] == "q4f16_awq"
    assert chat_cfg["quantization_layout"] == {"group_size": GROUP}  # the checkpoint's, not q4f16_awq's 128
    names = {r["name"] for s in json.loads((out / "tensor-cache.json").read_text())["records"] for r in s["records"]}
    assert "model.layers.0.self_attn.qkv_proj.q_zero" in names and "model.embed_tokens.weight" in names
    ids = torch.randint(5, 384, (24,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(ids[None]).logits[0]
    assert (run_logits(out, ids) - ref).abs().max().item() < 1e-4
    # the same checkpoint through q4f16_1 is requantized: visibly different logits
    requant = convert(hf, tmp_path / "requant", "q4f16_1")
    assert (run_logits(requant, ids) - ref).abs().max().item() > 1e-3


def test_q4f16_awq_refuses_other_checkpoints(tmp_path, capsys):
    _, hf = make_checkpoint("gptq", tmp_path)
    for src, needle in ((hf, "this is a gptq checkpoint"), (tmp_path / "float", "not an AWQ checkpoint")):
        if src.name == "float":
            save_hf(tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                                                       num_hidden_layers=1, num_attention_heads=4)), src)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["convert_weight", str(src), "--quantization", "q4f16_awq", "-o", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
        assert not (tmp_path / "x").exists()

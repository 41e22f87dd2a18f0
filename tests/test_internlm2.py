"""InternLM2 (no transformers class): a random Llama with grouped-query attention, rewritten into
InternLM2's checkpoint layout (grouped `wqkv`, w1/w2/w3, its own names and config.json), converts
to MLC's names and gives the Llama's logits (1e-4) and greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

from edgellm.weights.tensor_cache import read_tensors
from tests.helpers import convert, greedy, hf_greedy, run_logits, write_tokenizer
from tests.test_models_parity import disk_names, mlc_names

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 16, 2


def llama(bias: bool) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=384, hidden_size=HEADS * HEAD_DIM, intermediate_size=128,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=256, rope_theta=50000.0, tie_word_embeddings=False,
                         attention_bias=bias, pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms at 1 and biases at 0 would hide a wrong mapping
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def grouped_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """InternLM2's layout: per KV head g, its query heads, then k_g, then v_g."""
    g = HEADS // KV_HEADS
    qs = q.reshape(KV_HEADS, g, HEAD_DIM, -1)
    ks, vs = k.reshape(KV_HEADS, 1, HEAD_DIM, -1), v.reshape(KV_HEADS, 1, HEAD_DIM, -1)
    return torch.cat([qs, ks, vs], dim=1).reshape(-1, *q.shape[1:])


def internlm2_state(sd: dict[str, torch.Tensor], bias: bool) -> dict[str, torch.Tensor]:
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "model.norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(LAYERS):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        suffixes = ["weight", "bias"] if bias else ["weight"]
        for s in suffixes:
            out[dst + f"attention.wqkv.{s}"] = grouped_wqkv(
                *(sd[src + f"self_attn.{p}_proj.{s}"] for p in "qkv"))
            out[dst + f"attention.wo.{s}"] = sd[src + f"self_attn.o_proj.{s}"]
        for ours, theirs in [("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
                             ("mlp.down_proj", "feed_forward.w2"), ("input_layernorm", "attention_norm"),
                             ("post_attention_layernorm", "ffn_norm")]:
            out[dst + theirs + ".weight"] = sd[src + ours + ".weight"]
    return {k: v.contiguous() for k, v in out.items()}


def write_internlm2(model: tf.LlamaForCausalLM, bias: bool, out) -> None:
    c = model.config
    out.mkdir(parents=True)
    save_file(internlm2_state(model.state_dict(), bias), out / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(out)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": c.rms_norm_eps,
        "bias": bias, "rope_theta": 50000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "tie_word_embeddings": False, "use_cache": True, "attn_implementation": "eager",
        "bos_token_id": 3, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32"}))


@pytest.mark.parametrize("bias", [False, True])
def test_internlm2_matches_llama(bias, tmp_path):
    model = llama(bias)
    write_internlm2(model, bias, tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "out", "q0f32", conv_template="chatml")
    ids = torch.randint(5, 384, (40,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids[None]).logits[0].float()
    assert (run_logits(out, ids) - ref).abs().max().item() < 1e-4
    assert (run_logits(out, ids, chunk=9) - ref).abs().max().item() < 1e-4
    assert greedy(out, ids, 20) == hf_greedy(model, ids, 20)

    extra = ("attention.wqkv.bias", "attention.wo.bias") if bias else ()
    assert disk_names(out) == mlc_names("internlm2", LAYERS, False, extra)
    # wqkv is regrouped to [all q; all k; all v] on disk, as MLC writes it.
    stored, sd = dict(read_tensors(out)), model.state_dict()
    qkv = torch.cat([sd[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(stored["model.layers.1.attention.wqkv.weight"], qkv)
    gate_up = torch.cat([sd[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(stored["model.layers.0.feed_forward.gate_up_proj.weight"], gate_up)


def test_internlm2_output_is_quantized_even_in_q4f16_2(tmp_path):
    """MLC keeps lm_head/embed_out in float16 for q4f16_2, but not InternLM2's `output`."""
    from edgellm.weights.convert import convert_weight

    write_internlm2(llama(False), False, tmp_path / "hf")
    convert_weight(tmp_path / "hf", "q4f16_2", tmp_path / "out", progress=False)
    names = disk_names(tmp_path / "out")
    assert {"output.q_weight", "output.q_scale", "model.tok_embeddings.weight",
            "model.layers.0.attention.wqkv.q_weight"} <= names
    assert "output.weight" not in names

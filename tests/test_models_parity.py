"""Every family: a random tiny transformers model, converted with q0f32, gives the same logits
(1e-4) and the same 20 greedy tokens as transformers."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from tests.helpers import convert, greedy, hf_greedy, run_logits, save_hf

COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

# name -> (config class, model class, config overrides)
CASES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama-tied-llama3rope": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        tie_word_embeddings=True, num_hidden_layers=3,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        rope_theta=500000.0)),
}


def build(name: str, tmp_path):
    cfg_cls, model_cls, over = CASES[name]
    torch.manual_seed(0)
    cfg = cfg_cls(**{**COMMON, **over})
    model = model_cls(cfg).eval()
    # Random init puts norms at 1 and biases at 0: perturb them so a wrong mapping shows.
    with torch.no_grad():
        for _pname, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf_dir = save_hf(model, tmp_path / "hf")
    return model, hf_dir


@pytest.mark.parametrize("name", list(CASES))
def test_q0f32_logits_and_greedy_match_transformers(name, tmp_path):
    model, hf_dir = build(name, tmp_path)
    out = convert(hf_dir, tmp_path / "out", "q0f32", conv_template="auto")
    ids = torch.randint(5, 384, (40,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids[None]).logits[0].float()
    ours = run_logits(out, ids)
    assert (ours - ref).abs().max().item() < 1e-4
    chunked = run_logits(out, ids, chunk=7)  # prefill in chunks through the KV cache
    assert (chunked - ref).abs().max().item() < 1e-4
    assert greedy(out, ids, 20) == hf_greedy(model, ids, 20)

"""Every family: a random tiny transformers model, converted with q0f32, gives the same logits
(1e-4) and the same 20 greedy tokens as transformers; the converted directory uses MLC-LLM's
tensor names (see docs/formats.md, "Model directory")."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgellm.models.registry import get_family
from edgellm.weights.tensor_cache import read_tensors
from tests.helpers import convert, greedy, hf_greedy, run_logits, save_hf

COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
              bos_token_id=3, eos_token_id=2)
WINDOW = 16  # shorter than the 40-token prompt, so the sliding window matters
# LongRoPE with an original context above the 60 positions the test uses: the short factors and
# the attention factor sqrt(1 + ln(256/128) / ln(128)) apply.
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.9, 2.6],
            "long_factor": [1.5, 2.5, 4.0, 7.0], "rope_theta": 10000.0, "partial_rotary_factor": 0.5}

# name -> (config class, model class, config overrides); None drops a COMMON key.
CASES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama-tied-llama3rope": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        tie_word_embeddings=True, num_hidden_layers=3,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        rope_theta=500000.0)),
    "mistral-window": (tf.MistralConfig, tf.MistralForCausalLM, dict(
        sliding_window=WINDOW, tie_word_embeddings=False, num_hidden_layers=3)),
    "qwen2-untied": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "qwen2-tied": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3-tied": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(tie_word_embeddings=True, head_dim=32)),
    "qwen3-untied-bias": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(
        tie_word_embeddings=False, head_dim=8, attention_bias=True)),
    "phi3-longrope-partial": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(
        tie_word_embeddings=False, rope_scaling=LONGROPE, partial_rotary_factor=0.5,
        original_max_position_embeddings=128)),
    "phi3-tied-window": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(
        tie_word_embeddings=True, sliding_window=WINDOW)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(
        num_hidden_layers=3, head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
        attn_logit_softcapping=0.5, final_logit_softcapping=0.3)),
    "gpt_neox-parallel": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(
        num_key_value_heads=None, use_parallel_residual=True, rotary_pct=0.25, rotary_emb_base=5000)),
    "gpt_neox-sequential": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(
        num_key_value_heads=None, use_parallel_residual=False, rotary_pct=0.5, hidden_act="gelu_new")),
}

# MLC-LLM's tensor names (unquantized): model-wide ones and per-layer ones ({i} = layer index).
_LLAMA = ["input_layernorm.weight", "self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
          "post_attention_layernorm.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"]
_QWEN = [n.replace("qkv_proj", "c_attn") for n in _LLAMA]
_PHI3 = ["ln.weight", "mixer.qkv_proj.weight", "mixer.out_proj.weight", "post_attention_layernorm.weight",
         "mlp.gate_up_proj.weight", "mlp.down_proj.weight"]
_NEOX = [m + s for m in ["input_layernorm", "post_attention_layernorm", "attention.query_key_value",
                         "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
         for s in (".weight", ".bias")]
_INTERNLM2 = ["attention_norm.weight", "attention.wqkv.weight", "attention.wo.weight", "ffn_norm.weight",
              "feed_forward.gate_up_proj.weight", "feed_forward.w2.weight"]
_GLOBAL = ["model.embed_tokens.weight", "model.norm.weight"]
MLC_NAMES = {  # model_type -> (model-wide names, layer prefix, per-layer names)
    "llama": (_GLOBAL, "model.layers.{i}.", _LLAMA),
    "mistral": (_GLOBAL, "model.layers.{i}.", _LLAMA),
    "qwen2": (_GLOBAL, "model.layers.{i}.", _QWEN + ["self_attn.c_attn.bias"]),
    "qwen3": (_GLOBAL, "model.layers.{i}.", _QWEN + ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]),
    "phi3": (["transformer.embd.weight", "transformer.norm.weight"], "transformer.h.{i}.", _PHI3),
    "gemma2": (_GLOBAL, "model.layers.{i}.",
               _LLAMA + ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"]),
    "gpt_neox": (["gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm.weight",
                  "gpt_neox.final_layer_norm.bias", "embed_out.weight"], "gpt_neox.layers.{i}.", _NEOX),
    "internlm2": (["model.tok_embeddings.weight", "model.norm.weight", "output.weight"], "model.layers.{i}.",
                  _INTERNLM2),
}


def mlc_names(model_type: str, layers: int, lm_head: bool, extra_layer: tuple[str, ...] = ()) -> set[str]:
    """The names MLC-LLM's converter writes for a q0 model of this family."""
    model_wide, prefix, per_layer = MLC_NAMES[model_type]
    names = set(model_wide) | ({"lm_head.weight"} if lm_head else set())
    return names | {(prefix + n).format(i=i) for n in [*per_layer, *extra_layer] for i in range(layers)}


def disk_names(out) -> set[str]:
    manifest = json.loads((out / "tensor-cache.json").read_text())
    return {r["name"] for shard in manifest["records"] for r in shard["records"]}


def build(name: str, tmp_path):
    cfg_cls, model_cls, over = CASES[name]
    torch.manual_seed(0)
    kwargs = {k: v for k, v in {**COMMON, **over}.items() if v is not None}
    model = model_cls(cfg_cls(**kwargs)).eval()
    # Random init puts norms at 1 (gemma: 0) and biases at 0: perturb them so a wrong mapping shows.
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

    cfg = model.config
    model_type = get_family(cfg.model_type).__name__.rsplit(".", 1)[1]
    qwen3_bias = model_type == "qwen3" and cfg.attention_bias
    extra = ("self_attn.c_attn.bias", "self_attn.o_proj.bias") if qwen3_bias else ()
    lm_head = not cfg.tie_word_embeddings and model_type not in ("gpt_neox", "gemma2")
    assert disk_names(out) == mlc_names(model_type, cfg.num_hidden_layers, lm_head, extra)


def test_gemma2_norms_are_stored_plus_one(tmp_path):
    model, hf_dir = build("gemma2", tmp_path)
    out = tmp_path / "out"
    from edgellm.weights.convert import convert_weight

    convert_weight(hf_dir, "q0f32", out, progress=False)
    stored = dict(read_tensors(out))
    hf = model.state_dict()
    for name in ("model.norm.weight", "model.layers.1.input_layernorm.weight",
                 "model.layers.0.post_feedforward_layernorm.weight"):
        assert torch.equal(stored[name], hf[name] + 1), name


def test_gemma2_sliding_layers_without_layer_types():
    from edgellm.models import gemma2

    cfg = dict(COMMON, num_hidden_layers=4, head_dim=16, sliding_window=WINDOW)
    assert gemma2.parse_config(cfg).windows == [WINDOW, None, WINDOW, None]
    types = ["full_attention", "sliding_attention", "full_attention", "full_attention"]
    assert gemma2.parse_config(dict(cfg, layer_types=types)).windows == [None, WINDOW, None, None]


# model_config dicts as MLC-LLM's gen_config writes them (and two HF config.json quirks), with the
# ArchConfig fields they must give. Sizes are the real models'; only parse_config runs.
_F48 = [1.0 + i / 16 for i in range(48)]
MLC_CONFIGS = {
    "mistral-7b-v0.1": ("mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_hidden_layers=32,
        rms_norm_eps=1e-5, vocab_size=32000, position_embedding_base=10000.0, num_key_value_heads=8,
        head_dim=128, context_window_size=-1, sliding_window_size=4096, prefill_chunk_size=4096,
        attention_sink_size=4), dict(windows=[4096] * 32, max_position_embeddings=32768, num_kv_heads=8)),
    "qwen2.5-0.5b": ("qwen2", dict(
        hidden_act="silu", hidden_size=896, intermediate_size=4864, num_attention_heads=14,
        num_hidden_layers=24, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
        vocab_size=151936, tie_word_embeddings=True, context_window_size=32768, prefill_chunk_size=2048,
        head_dim=64, dtype="bfloat16"),
        dict(attention_bias=True, o_bias=False, tie_word_embeddings=True, max_position_embeddings=32768,
             head_dim=64, windows=[None] * 24, rope_theta=1e6)),
    "qwen3-0.6b": ("qwen3", dict(
        hidden_act="silu", hidden_size=1024, intermediate_size=3072, attention_bias=False,
        num_attention_heads=16, num_hidden_layers=28, num_key_value_heads=8, rms_norm_eps=1e-6,
        rope_theta=1000000, vocab_size=151936, tie_word_embeddings=True, context_window_size=40960,
        prefill_chunk_size=2048, head_dim=128),
        dict(qk_norm=True, head_dim=128, attention_bias=False, rope_theta=1e6)),
    "phi-3-mini-128k": ("phi3", dict(
        model_type="phi3", hidden_size=3072, vocab_size=32064, num_hidden_layers=32, num_attention_heads=32,
        intermediate_size=8192, rms_norm_eps=1e-5, num_key_value_heads=32, max_position_embeddings=131072,
        position_embedding_base=10000.0, original_max_position_embeddings=4096, context_window_size=131072,
        rope_scaling={"type": "longrope", "rope_type": "longrope", "long_factor": _F48, "short_factor": _F48,
                      "max_position_embeddings": 131072, "original_max_position_embeddings": 4096},
        head_dim=96, partial_rotary_factor=1.0),
        dict(rot_dim=96, windows=[None] * 32, max_position_embeddings=131072)),
    "phi-3-mini-128k-hf-su": ("phi3", dict(  # HF config.json of the first 128k release
        hidden_size=3072, vocab_size=32064, num_hidden_layers=32, num_attention_heads=32,
        intermediate_size=8192, rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=10000.0,
        original_max_position_embeddings=4096, sliding_window=262144,
        rope_scaling={"type": "su", "long_factor": _F48, "short_factor": _F48}),
        dict(windows=[262144] * 32, num_kv_heads=32)),
    "gemma-2-2b": ("gemma2", dict(
        hidden_size=2304, intermediate_size=9216, attention_bias=False, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, num_hidden_layers=26, rms_norm_eps=1e-6, vocab_size=256000,
        hidden_activation="gelu_pytorch_tanh", position_embedding_base=10000.0, context_window_size=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
        sliding_window=4096),
        dict(windows=[4096, None] * 13, query_scale=1 / 16, attn_softcap=50.0, final_softcap=30.0,
             tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh", max_position_embeddings=4096)),
    "redpajama-3b": ("gpt_neox", dict(
        use_parallel_residual=False, hidden_size=2560, intermediate_size=10240, num_attention_heads=32,
        num_hidden_layers=32, layer_norm_eps=1e-5, vocab_size=50432, rotary_pct=1.0,
        position_embedding_base=10000, context_window_size=2048, head_dim=80, ffn_out_dtype="float32"),
        dict(rot_dim=80, max_position_embeddings=2048, extra={"use_parallel_residual": False})),
    "redpajama-3b-hf": ("gpt_neox", dict(
        use_parallel_residual=False, hidden_size=2560, intermediate_size=10240, num_attention_heads=32,
        num_hidden_layers=32, layer_norm_eps=1e-5, vocab_size=50432, rotary_pct=0.25, rotary_emb_base=20000,
        max_position_embeddings=2048, tie_word_embeddings=False), dict(rot_dim=20, rope_theta=20000)),
    "internlm2.5-7b": ("internlm2", dict(
        vocab_size=92544, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rms_norm_eps=1e-5, intermediate_size=14336, bias=False, use_cache=True,
        rope_theta=1000000, pad_token_id=2, bos_token_id=1, eos_token_id=2, context_window_size=32768,
        head_dim=128), dict(num_kv_heads=8, attention_bias=False, max_position_embeddings=32768,
                                rope_theta=1e6)),
}


@pytest.mark.parametrize("name", list(MLC_CONFIGS))
def test_parse_mlc_and_hf_model_configs(name):
    model_type, model_config, want = MLC_CONFIGS[name]
    arch = get_family(model_type).parse_config(model_config)
    want = {"rope_theta": 10000, **want}
    for key, value in want.items():
        got = arch.rope["rope_theta"] if key == "rope_theta" else getattr(arch, key)
        assert got == value, key
    if model_type == "phi3":  # LongRoPE's attention factor comes from 131072 / 4096
        assert arch.rope["rope_type"] == "longrope"
        assert arch.rope["original_max_position_embeddings"] == 4096
        assert abs(arch.rope["attention_factor"] - (1 + math.log(32) / math.log(4096)) ** 0.5) < 1e-9


@pytest.mark.parametrize("name, quantization, present, absent", [
    ("qwen2-untied", "q4f16_1", ["model.layers.0.self_attn.c_attn.q_weight", "lm_head.q_weight",
                                 "model.layers.0.self_attn.c_attn.q_scale", "model.embed_tokens.q_weight",
                                 "model.layers.0.self_attn.c_attn.bias"],
     ["model.layers.0.self_attn.c_attn.weight"]),
    ("phi3-tied-window", "q4f16_1", ["transformer.embd.q_weight", "transformer.h.1.mixer.qkv_proj.q_weight",
                                     "transformer.h.1.mixer.out_proj.q_scale", "transformer.h.1.ln.weight"],
     ["lm_head.q_weight", "lm_head.weight"]),
    ("gpt_neox-parallel", "q4f16_2", ["embed_out.weight", "gpt_neox.embed_in.weight",
                                      "gpt_neox.layers.0.attention.query_key_value.q_weight",
                                      "gpt_neox.layers.0.mlp.dense_4h_to_h.bias"], ["embed_out.q_weight"]),
])
def test_quantized_disk_names(name, quantization, present, absent, tmp_path):
    from edgellm.weights.convert import convert_weight

    _, hf_dir = build(name, tmp_path)
    convert_weight(hf_dir, quantization, tmp_path / "out", progress=False)
    names = disk_names(tmp_path / "out")
    assert set(present) <= names and not set(absent) & names


@pytest.mark.parametrize("model_type, hf_window, want_chat, override, want_windows", [
    # MLC's Mistral and Gemma 2 configs carry HF's window; a chat-config window turns Mistral's on everywhere.
    ("mistral", None, -1, 8, [8, 8, 8, 8]),
    ("mistral", WINDOW, WINDOW, 8, [8, 8, 8, 8]),
    ("gemma2", WINDOW, WINDOW, 8, [8, None, 8, None]),
    # Other families: no window in the chat config; an override only resizes layers that already slide.
    ("llama", None, -1, 8, [None] * 4),
    ("qwen2", WINDOW, -1, 8, [None] * 4),  # qwen2 slides only with use_sliding_window
    ("phi3", WINDOW, -1, 8, [8, 8, 8, 8]),
])
def test_sliding_window_family_hooks(model_type, hf_window, want_chat, override, want_windows, tmp_path):
    """gen_config writes the family's window into mlc-chat-config.json; the loader applies a chat
    config's sliding_window_size the family's way."""
    from edgellm.config import ChatConfig
    from edgellm.gen_config import gen_config
    from edgellm.models.loader import arch_config
    from tests.helpers import write_tokenizer

    hf = dict(COMMON, model_type=model_type, num_hidden_layers=4, head_dim=16)
    if hf_window:
        hf["sliding_window"] = hf_window
    write_tokenizer(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    chat = gen_config(tmp_path / "hf", "q0f32", "chatml", tmp_path / "out")
    assert chat.sliding_window_size == want_chat
    cfg = ChatConfig(model_type, "q0f32", hf, 384, sliding_window_size=override)
    assert arch_config(cfg).windows == want_windows

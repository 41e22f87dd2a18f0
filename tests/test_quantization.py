"""Quantization: bit-exact packing (hand-made test vectors) and quantized models that compute
exactly what the on-disk format stores.

Formats (../shared/SPEC.md and docs/formats.md, "Quantization modes" / "Quantization"): groups of
consecutive K elements, scale = max|w| / max_int in the model dtype, code = round(w / scale +
max_int) with ties to even (the offset is added *before* rounding, as MLC-LLM does), clamped to
[0, 2 max_int]; code r of a word sits at bits r*bits .. r*bits+bits-1 (lowest first); codes
past K (padding of the last group) are 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf

from edgellm.quantization.modes import get_mode
from edgellm.quantization.pack import dequantize, quantize, unpack
from edgellm.weights.tensor_cache import read_tensors
from tests.helpers import convert, greedy, hf_greedy, run_logits, save_hf


def u32(words: torch.Tensor) -> list[list[int]]:
    """int32 words as the unsigned values MLC's uint32 records hold."""
    return (words.to(torch.int64) & 0xFFFFFFFF).tolist()


def f16_bits(t: torch.Tensor) -> list[list[int]]:
    return (t.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF).tolist()


# --------------------------------------------------------------------------------------------
# 1. Hand-made bit-level test vectors
# --------------------------------------------------------------------------------------------

# q4f16_1, row 0 of a 3x64 matrix. Group 0 (k 0..31) has max|w| = 3.5 -> scale 0.5 (f16 0x3800),
# so every w below is (code - 7) * 0.5 exactly. Group 1 (k 32..63) has max|w| = 1.75 -> scale
# 0.25 (f16 0x3400); its third word holds values off the grid and exact .5 ties.
Q4_ROW0_CODES = [
    1, 2, 3, 4, 5, 6, 7, 8,  # word 0 -> 0x87654321 (code j at bits 4j..4j+3)
    9, 10, 11, 12, 13, 14, 0, 7,  # word 1 -> 0x70EDCBA9
    7, 7, 7, 7, 7, 7, 7, 7,  # word 2 -> 0x77777777
    14, 0, 14, 0, 7, 7, 7, 7,  # word 3 -> 0x77770E0E
]
Q4_ROW0_G1 = (
    [-1.75, -1.5, -1.25, -1.0, -0.75, -0.5, -0.25, 0.0]  # codes 0..7 -> 0x76543210
    + [0.0] * 7 + [1.75]  # codes 7 x7, 14 -> 0xE7777777
    # w/0.25 + 7 = 7.4, 7.8, 7.5, 6.5, 8.5, 5.5, 14, 0 -> codes 7, 8, 8, 6, 8, 6, 14, 0 (ties to
    # even *after* adding the offset; round(w/scale) + 7 would give 7, 8, 7, 7, 9, 5, ...)
    + [0.1, 0.2, 0.125, -0.125, 0.375, -0.375, 1.75, -1.75]  # -> 0x0E686887
    + [0.0] * 8  # -> 0x77777777
)


def q4_vector_matrix() -> torch.Tensor:
    row0 = [(c - 7) * 0.5 for c in Q4_ROW0_CODES] + Q4_ROW0_G1
    return torch.tensor([row0, [0.0] * 64, [-v for v in row0]], dtype=torch.float32)


Q4_EXPECTED_WORDS = [
    [0x87654321, 0x70EDCBA9, 0x77777777, 0x77770E0E, 0x76543210, 0xE7777777, 0x0E686887, 0x77777777],
    [0] * 8,  # an all-zero group: scale 0 and code 0 (it dequantizes to 0 whatever the code)
    # row 2 = -row 0: codes 14 - c off the ties; -0.1, -0.2, -0.125, 0.125, -0.375, 0.375, -1.75,
    # 1.75 -> 6.6, 6.2, 6.5, 7.5, 5.5, 8.5 -> codes 7, 6, 6, 8, 6, 8, 0, 14 -> 0xE0868667
    [0x6789ABCD, 0x7E012345, 0x77777777, 0x7777E0E0, 0x789ABCDE, 0x07777777, 0xE0868667, 0x77777777],
]
Q4_EXPECTED_SCALES = [[0x3800, 0x3400], [0x0000, 0x0000], [0x3800, 0x3400]]


def test_q4f16_1_test_vectors():
    mode = get_mode("q4f16_1")
    w = q4_vector_matrix()
    q, s = quantize(w, mode)
    assert q.shape == (3, 8) and s.shape == (3, 2) and s.dtype == torch.float16
    assert [[hex(x) for x in row] for row in u32(q)] == \
        [[hex(x) for x in row] for row in Q4_EXPECTED_WORDS]
    assert f16_bits(s) == Q4_EXPECTED_SCALES
    # Decoding reads code r of word j at bits 4r..4r+3 and gives (code - 7) * scale.
    codes = unpack(q, mode)
    assert codes[0, :32].tolist() == Q4_ROW0_CODES
    assert codes[0, 48:56].tolist() == [7, 8, 8, 6, 8, 6, 14, 0]
    deq = dequantize(q, s, mode, 64)
    expected = torch.tensor(Q4_ROW0_CODES + codes[0, 32:].tolist(), dtype=torch.float32) - 7
    expected = expected * torch.tensor([0.5] * 32 + [0.25] * 32)
    assert torch.equal(deq[0], expected)
    assert torch.equal(deq[1], torch.zeros(64))


def test_q4f16_1_padding_codes_are_zero():
    """K = 40: the second group has 8 real elements; the 24 padding codes are 0, not 7."""
    mode = get_mode("q4f16_1")
    row = [3.5] + [0.0] * 31 + [-1.0, 1.0] + [0.0] * 6
    q, s = quantize(torch.tensor([row]), mode)
    assert q.shape == (1, 8) and s.shape == (1, 2)
    # scale of group 1 = f16(1/7) = 1170/8192 = 0x3092; -1/scale = -7.0017 -> f16 -7.0 -> code 0.
    assert u32(q) == [[0x7777777E, 0x77777777, 0x77777777, 0x77777777,
                       0x777777E0, 0x00000000, 0x00000000, 0x00000000]]
    assert f16_bits(s) == [[0x3800, 0x3092]]
    deq = dequantize(q, s, mode, 40)
    assert deq.shape == (1, 40)
    assert deq[0, 32].item() == -7 * 1170 / 8192 and deq[0, 33].item() == 7 * 1170 / 8192


def test_q3f16_1_test_vectors():
    """int3, group 40, 10 codes per word (bits 3r..3r+2, top 2 bits 0), offset 3; K = 50."""
    mode = get_mode("q3f16_1")
    g0 = ([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 0.0, 0.0, 0.0]  # codes 0,1,2,3,4,5,6,3,3,3
          + [0.0] * 10  # codes 3 x10
          + [1.5, -1.5, 1.5, -1.5] + [0.0] * 6  # codes 6,0,6,0,3,...
          # w/0.5 + 3 = 3.5, 2.5, 4.5, 1.5 -> ties to even: 4, 2, 4, 2
          + [0.25, -0.25, 0.75, -0.75] + [0.0] * 6)
    g1 = [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0]  # scale 1.0, codes 0..6,3,3,3
    q, s = quantize(torch.tensor([g0 + g1]), mode)
    assert q.shape == (1, 8) and s.shape == (1, 2)
    # A word written in octal shows its ten 3-bit codes, last code first.
    assert [[oct(x) for x in row] for row in u32(q)] == [[
        oct(0o3336543210), oct(0o3333333333), oct(0o3333330606), oct(0o3333332424),
        oct(0o3336543210), "0o0", "0o0", "0o0"]]  # 30 padding codes -> 0
    assert f16_bits(s) == [[0x3800, 0x3C00]]
    deq = dequantize(q, s, mode, 50)
    assert deq.shape == (1, 50)
    assert deq[0, :30].tolist() == g0[:30] and deq[0, 40:].tolist() == g1
    assert deq[0, 30:34].tolist() == [0.5, -0.5, 0.5, -0.5]  # codes 4, 2, 4, 2


def test_q8f16_1_test_vector():
    """int8 symmetric: q = round(w / scale), scale = max|w| / 127 per group of 32; K = 40."""
    mode = get_mode("q8f16_1")
    row = [31.75, -31.75, 0.1, 0.4, -0.4, 1.0] + [0.0] * 26 + [127.0, -0.7, 2.6, 3.4] + [0.0] * 4
    q, s = quantize(torch.tensor([row]), mode)
    assert q.dtype == torch.int8 and q.shape == (1, 64)
    assert q[0].tolist() == [127, -127, 0, 2, -2, 4] + [0] * 26 + [127, -1, 3, 3] + [0] * 28
    assert f16_bits(s) == [[0x3400, 0x3C00]]
    deq = dequantize(q, s, mode, 40)
    assert deq[0, :6].tolist() == [31.75, -31.75, 0.0, 0.5, -0.5, 1.0]


@pytest.mark.parametrize("name,k", [("q4f16_1", 100), ("q4f32_1", 72), ("q3f16_1", 100),
                                    ("q3f16_1", 72), ("q4f16_2", 40)])
def test_quantize_matches_independent_reference(name, k):
    """Random matrices (with many exact ties) against a numpy re-implementation of docs/formats.md's formula."""
    from tests.test_mlc_dir import mlc_group_quantize

    g = torch.Generator().manual_seed(k)
    w = torch.randn(37, k, generator=g) * 0.05
    # Values that land exactly on .5 after dividing by the scale and adding the offset.
    w[:, 1::3] = torch.round(w[:, 1::3] * 64) / 64
    w[:, 0] = 0.25  # a group max every row shares
    mode = get_mode(name)
    q, s = quantize(w, mode)
    ref_q, ref_s = mlc_group_quantize(w.numpy(), mode.bits, mode.group_size,
                                      "float32" if name == "q4f32_1" else "float16")
    assert u32(q) == ref_q.astype("int64").tolist()
    assert torch.equal(s, torch.from_numpy(ref_s))


# --------------------------------------------------------------------------------------------
# 2. Quantized models compute exactly what the directory stores
# --------------------------------------------------------------------------------------------

SHAPES = {
    # K multiple of 32 but not of 40 (q3 pads every layer)
    "h64": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    # hidden 72 (72 = 2*32 + 8, 40 + 32) and intermediate 200 (= 6*32 + 8, = 5*40): partial groups
    "h72": dict(hidden_size=72, intermediate_size=200, num_attention_heads=4, num_key_value_heads=2),
}


def tiny_llama(tmp_path: Path, shape: str = "h72", tied: bool = False, seed: int = 0, **over):
    """A random tiny transformers Llama with perturbed norms, saved with a real tokenizer."""
    torch.manual_seed(seed)
    base = dict(vocab_size=384, num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=tied)
    cfg = tf.LlamaConfig(**{**base, **SHAPES[shape], **over})
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf_dir = save_hf(model, tmp_path / "hf")
    return model, hf_dir


def hf_state_from_dir(model_dir: Path, hf_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformers state dict the converted directory stands for.

    Quantized tensors are dequantized with the format's formula (pack.dequantize), fused tensors
    are split back into HF names. Also checks that every padding code past K is 0.
    """
    chat = json.loads((model_dir / "mlc-chat-config.json").read_text())
    mode = get_mode(chat["quantization"])
    cfg = hf_model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    tensors = dict(read_tensors(model_dir))
    ref = hf_model.state_dict()
    ours: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".q_scale"):
            continue
        if name.endswith(".q_weight"):
            base = name[: -len(".q_weight")]
            codes = unpack(t, mode)
            w = dequantize(t, tensors[base + ".q_scale"], mode, codes.shape[1], torch.float32)
            ours[base + ".weight"] = (w, codes)
        else:
            ours[name] = (t.float(), None)
    state = {}
    for name, (w, codes) in ours.items():
        if ".qkv_proj." in name:
            q_rows, kv_rows = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
            parts = dict(zip(("q_proj", "k_proj", "v_proj"), w.split([q_rows, kv_rows, kv_rows])))
            pieces = {name.replace("qkv_proj", p): t for p, t in parts.items()}
        elif ".gate_up_proj." in name:
            gate, up = w.chunk(2)
            pieces = {name.replace("gate_up_proj", "gate_proj"): gate,
                      name.replace("gate_up_proj", "up_proj"): up}
        else:
            pieces = {name: w}
        for hf_name, t in pieces.items():
            assert hf_name in ref, f"{hf_name} is not a transformers weight"
            k = ref[hf_name].shape[-1]
            if codes is not None:
                assert (codes[:, k:] == 0).all(), f"{name}: padding codes past K={k} are not 0"
                t = t[:, :k]
            state[hf_name] = t
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    assert set(state) == set(ref), set(state) ^ set(ref)
    return state


def assert_matches_hf(out: Path, hf_model: torch.nn.Module, tol: float = 1e-3, n_greedy: int = 12):
    """Load the directory's weights into transformers; our logits and greedy tokens equal its."""
    hf_model.load_state_dict(hf_state_from_dir(out, hf_model), strict=True)
    ids = torch.randint(5, 384, (24,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = hf_model(ids[None]).logits[0].float()
    ours = run_logits(out, ids)
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < tol, f"max |logit diff| {err}"
    if n_greedy:
        assert greedy(out, ids, n_greedy) == hf_greedy(hf_model, ids, n_greedy)


QUANT_CASES = [("q4f16_1", "h64", False), ("q4f16_1", "h72", False), ("q4f16_1", "h72", True),
               ("q4f32_1", "h72", False), ("q3f16_1", "h64", False), ("q3f16_1", "h72", True),
               ("q8f16_1", "h72", False), ("q4f16_2", "h72", False), ("q4f16_2", "h64", True)]


@pytest.mark.parametrize("quant,shape,tied", QUANT_CASES,
                         ids=[f"{q}-{s}{'-tied' if t else ''}" for q, s, t in QUANT_CASES])
def test_quantized_model_computes_stored_weights(quant, shape, tied, tmp_path):
    model, hf_dir = tiny_llama(tmp_path, shape, tied)
    out = convert(hf_dir, tmp_path / "out", quant, conv_template="chatml")
    tensors = dict(read_tensors(out))
    mode = get_mode(quant)
    emb_quantized = "model.embed_tokens.q_weight" in tensors
    assert emb_quantized == mode.quantize_embedding
    if mode.kind == "group":
        words = mode.packed_shape(1, model.config.intermediate_size)[1]
        assert tensors["model.layers.0.mlp.down_proj.q_weight"].shape == (model.config.hidden_size, words)
    assert ("lm_head.q_weight" in tensors or "lm_head.weight" in tensors) == (not tied)
    assert_matches_hf(out, model)


def test_quantization_actually_changes_weights(tmp_path):
    """Guard for the test above: the dequantized weights differ from the originals."""
    model, hf_dir = tiny_llama(tmp_path, "h72")
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    out = convert(hf_dir, tmp_path / "out", "q3f16_1", conv_template="chatml")
    state = hf_state_from_dir(out, model)
    w0 = "model.layers.0.mlp.down_proj.weight"
    diff = (state[w0] - orig[w0]).abs()
    assert diff.max() > 1e-3
    # ... but stay within half a quantization step of the originals (max|w|/3 / 2 per group).
    step = orig[w0].abs().max() / 3
    assert diff.max() <= step / 2 + 1e-6


# The modes ../shared/SPEC.md lists. MLC's names say what is stored: q<bits>f<dtype>_<variant> holds codes of
# <bits> bits (0: none), with scales and every unquantized tensor in <dtype>.
SPEC_MODES = ["q0f32", "q0f16", "q0bf16", "q4f16_1", "q4f32_1", "q4f16_2", "q3f16_1", "q8f16_1"]
NAME_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("name", SPEC_MODES)
def test_each_mode_stores_what_its_name_says(name):
    """Every SPEC mode exists and quantizes as its name and ../shared/SPEC.md's formula say: group modes pack
    <bits>-bit codes 32 / bits to a word, lowest bits first, `w = (q - max_int) * scale`; q8f16_1 keeps
    int8 codes in [-127, 127] with `w = q * scale`; a round trip is within half a step."""
    mode = get_mode(name)
    bits, dtype = int(name[1]), NAME_DTYPES[name[2:].split("_")[0]]
    assert mode.model_dtype == dtype
    if bits == 0:  # nothing quantized: conversion writes the weights in this dtype (test_convert.py)
        assert not mode.quantized
        return
    k, gs = 100, mode.group_size  # 100 is a multiple of neither 32 nor 40: the last group is padded
    groups = -(-k // gs)
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(bits)) * 0.1
    w[1] = 0.0  # an all-zero row
    q, s = quantize(w, mode)
    assert s.dtype == dtype and s.shape == (6, groups)
    if mode.kind == "group":
        assert q.dtype == torch.int32 and q.shape == (6, groups * gs // (32 // bits))
        words = q.to(torch.int64) & 0xFFFFFFFF
        codes = torch.stack([(words >> (bits * j)) & (2**bits - 1) for j in range(32 // bits)], -1).view(6, -1)
        max_int = 2 ** (bits - 1) - 1
        assert codes.max() <= 2 * max_int and (codes[:, k:] == 0).all()
        values, top = codes - max_int, max_int
    else:
        assert q.dtype == torch.int8 and q.shape == (6, groups * gs)
        assert q.abs().max() <= 127
        values, top = q.to(torch.int64), 127
    step = s.float().repeat_interleave(gs, dim=1)
    formula = (values.double() * step.double())[:, :k]
    got = dequantize(q, s, mode, k, torch.float32)
    assert torch.allclose(got.double(), formula, rtol=1e-3, atol=1e-6)
    # half a step, plus the model dtype's rounding of the scale and of w / scale (up to `top` steps)
    assert ((got - w).abs() <= (0.5 + top * torch.finfo(dtype).eps) * step[:, :k]).all()
    assert (got[1] == 0).all()

"""The speed paths compute the same function as the reference.

- native quantized kernels (repacked weights) at precision=high equal the float32 dequantized
  reference within 1e-3, per layer and as whole-model logits, for q4f16_1, q4f32_1, q3f16_1 and
  q8f16_1 (precision=normal, 8-bit activations: tests/test_int8_gemm.py);
- --opt O0 (reference) and O2 (repacked kernels + fused decode step) give identical greedy
  tokens, on a tiny q4f16_1 model and on the real SmolLM2 q4f16_1 model;
- decoding several sequences in one batch equals decoding each alone.
No timing is asserted here (see `edgellm bench` and benchmarks/vs_llamacpp.py).
"""

from __future__ import annotations

import pytest
import torch

from edgellm.engine.build import build_engine
from edgellm.engine.options import make_options
from edgellm.engine.request import Request, SamplingParams
from edgellm.models.loader import load_model
from edgellm.quantization import kernels
from edgellm.quantization.layers import QuantEmbedding, QuantLinear, repack_model
from edgellm.quantization.modes import get_mode
from edgellm.quantization.pack import dequantize, quantize
from tests.helpers import convert, forward, kv_pool, run_logits, save_hf

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"native kernels unavailable: {kernels.unavailable_reason()}")

QUANTS = ["q4f16_1", "q4f32_1", "q3f16_1", "q8f16_1"]
TOL = 1e-3


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
    assert err <= tol, err
    return err


# ---- per layer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("n,k", [(100, 200), (96, 64), (1536, 576), (40, 1000)])
def test_kernel_matches_dequantized_reference(quant, n, k):
    mode = get_mode(quant)
    torch.manual_seed(n + k)
    w = torch.randn(n, k) * torch.linspace(0.2, 3.0, k)  # groups of different scales
    qw, qs = quantize(w, mode)
    ref_w = dequantize(qw, qs, mode, k, torch.float32)
    bias = torch.randn(n)
    pw = kernels.PackedWeight.from_quantized(qw, qs, mode, n, k, bias, precision="high")
    assert torch.equal(pw.dequantize(), ref_w)
    ids = torch.tensor([[0, n - 1], [n // 2, 3]])
    assert torch.equal(pw.gather(ids), ref_w[ids])
    for m in (1, 2, 3, 4, 5, 8, 9, 33):  # fused integer product up to 8 rows, dequantize + GEMM beyond
        x = torch.randn(m, k) * 3
        x[0, : min(k, 7)] = 0.0  # an all-zero start of a group
        ref = x @ ref_w.T + bias
        got = pw.linear(x)
        assert got.shape == ref.shape
        _close(got, ref, 1e-4)  # 16-bit activations: about 1e-5
        if m <= pw.GEMV_MAX_ROWS:  # a row's result does not depend on the rows batched with it
            for i in range(m):
                assert torch.equal(got[i], pw.linear(x[i:i + 1])[0])


def test_layers_repack_in_place_and_free_disk_buffers():
    mode = get_mode("q4f16_1")
    lin = QuantLinear(64, 48, True, mode)
    emb = QuantEmbedding(48, 64, mode)
    w = torch.randn(48, 64)
    qw, qs = quantize(w, mode)
    for m in (lin, emb):
        m.q_weight.copy_(qw)
        m.q_scale.copy_(qs)
    lin.bias.data.normal_()
    x = torch.randn(3, 64)
    ref_lin, ref_logits, ref_rows = lin(x), emb.as_linear(x), emb(torch.tensor([[1, 2], [3, 47]]))
    lin.precision = emb.precision = "high"
    lin.repack()
    emb.repack()
    assert lin.q_weight is None and emb.q_weight is None and "q_weight" not in lin.state_dict()
    _close(lin(x), ref_lin, 1e-4)
    _close(emb.as_linear(x), ref_logits, 1e-4)
    assert torch.equal(emb(torch.tensor([[1, 2], [3, 47]])), ref_rows)
    assert torch.equal(lin.dequantized_weight(), dequantize(qw, qs, mode, 64, torch.float32))


# ---- tiny models ------------------------------------------------------------------------------------
def _tiny_family(kind: str, out, seed: int = 1, **shape):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=3, eos_token_id=2, pad_token_id=0)
    common.update(shape)
    if kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=True))
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False))
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=8, tie_word_embeddings=False))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=False))
    with torch.no_grad():  # peaked logits: greedy choices are not decided by float noise
        model.lm_head.weight.mul_(40.0)
    return save_hf(model.eval(), out)


@pytest.fixture(scope="module")
def tiny_llama_hf(tmp_path_factory):
    return _tiny_family("llama", tmp_path_factory.mktemp("speed") / "llama_hf")


@pytest.fixture(scope="module")
def tiny_quantized(tiny_llama_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("speed_q")
    return {q: convert(tiny_llama_hf, root / q, q) for q in QUANTS + ["q0f32"]}


def generate(model_dir, prompts: list[list[int]], n: int, opt: str, *, max_seqs: int = 8, chunk: int = 16,
             kv_dtype: torch.dtype = torch.float32, precision: str = "high"):
    """Greedy tokens and the logits of every sampled position, stepping the engine's own core
    (built with the engine option `precision`, as Engine builds it)."""
    opts = make_options({"opt": opt, "max_num_sequence": max_seqs, "prefill_chunk_size": chunk, "reuse_kv": False,
                         "max_total_seq_length": 4096, "kv_cache_dtype": str(kv_dtype).replace("torch.", ""),
                         "precision": precision})
    core = build_engine(model_dir, opts, "cpu")
    runner = core.runner
    if runner.model is not None:  # the option reached every quantized layer, before the fused step copied them
        assert {m.precision for m in runner.model.modules() if hasattr(m, "precision")} <= {precision}
    logits: dict[int, list[torch.Tensor]] = {}
    fused_steps = 0
    run_step = runner.step

    def recording_step(chunks):  # the runner's own step, remembering each sampled row's logits
        nonlocal fused_steps
        fused_steps += runner.fused is not None and all(c.length == 1 for c in chunks)
        out = run_step(chunks)
        for row, c in enumerate(c for c in chunks if c.completes):
            logits.setdefault(id(c.seq), []).append(out[row])
        return out

    runner.step = recording_step
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    reqs = [Request(str(i), p, params) for i, p in enumerate(prompts)]
    for r in reqs:
        core.add(r)
    while core.has_work:
        core.step()
    seqs = [r.sequences[0] for r in reqs]
    return [s.output_ids for s in seqs], [torch.stack(logits[id(s)]) for s in seqs], runner, fused_steps


PROMPTS = [[3, 17, 99, 5, 250, 31, 8, 77, 120, 64, 11], [3, 200, 201, 9], list(range(5, 40)),
           [(7 * i) % 380 + 4 for i in range(200)]]  # long enough for attention split into key ranges


@pytest.mark.parametrize("quant", QUANTS)
def test_whole_model_logits_match_reference(quant, tiny_quantized):
    d = tiny_quantized[quant]
    ids = torch.tensor(PROMPTS[2])
    ref = run_logits(d, ids)  # O0: dequantize every call
    model, cfg = load_model(d, precision="high")
    assert repack_model(model) > 0
    for chunk in (len(ids), 5, 1):  # GEMM path, few-row integer path, one row at a time
        pool, slot = kv_pool(model, cfg.context_window_size)
        outs = []
        with torch.inference_mode():
            for s in range(0, len(ids), chunk):
                outs.append(forward(model, pool, slot, ids[s:s + chunk], s))
        _close(torch.cat(outs), ref)


def _fused_matches_reference(model_dir, prompts: list[list[int]], n: int, tol: float = 1e-3,
                             **kwargs) -> list[torch.Tensor]:
    """O2 takes the fused step and gives O0's greedy tokens and logits (within `tol`); returns O0's logits."""
    ref_tokens, ref_logits, _, _ = generate(model_dir, prompts, n, "O0", **kwargs)
    tokens, logits, runner, fused = generate(model_dir, prompts, n, "O2", **kwargs)
    assert runner.fused is not None and fused > 0
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits):
        _close(a, b, tol)
    return ref_logits


@pytest.mark.parametrize("quant", QUANTS + ["q0f32"])
def test_fused_decode_matches_reference(quant, tiny_quantized):
    _fused_matches_reference(tiny_quantized[quant], PROMPTS, 12)


@pytest.mark.parametrize("quant", ["q4f16_1", "q8f16_1", "q0f32"])
def test_fused_step_computes_the_tail(quant, tiny_quantized):
    """The final norm and the output matrix run inside the native step (its logits are the ones
    test_fused_decode_matches_reference compares with O0's), for quantized and float heads alike."""
    _, _, runner, fused = generate(tiny_quantized[quant], PROMPTS[:2], 4, "O2")
    assert fused > 0 and runner.fused.desc.fn_kind == 0 and runner.fused.head is not None
    # and the embedding lookup, where it is a repacked table (q0f32 keeps torch's nn.Embedding)
    assert (runner.fused.embed is not None) == (quant != "q0f32")


def test_fused_step_rejects_an_unknown_token(tiny_quantized):
    """A token id beyond the embedding table fails that step with a clear error (no read out of bounds)."""
    _, _, runner, _ = generate(tiny_quantized["q4f16_1"], PROMPTS[:1], 2, "O2")
    n = runner.fused.embed.n

    class Seq:
        slot, prompt_ids, output_ids = 0, [n + 5], []

    class Chunk:
        seq, start = Seq(), 0

    with pytest.raises(IndexError, match="out of range"):
        runner.fused([Chunk()])


def test_fused_step_logits_stay_the_callers(tiny_quantized):
    """The logits a native step returns are not overwritten by the next step (the engine's fallback that
    runs a failed batch's requests one by one concatenates several steps' logits)."""
    _, _, runner, fused = generate(tiny_quantized["q4f16_1"], PROMPTS[:2], 2, "O2")
    assert fused > 0

    class Seq:  # one token at position 0: it attends only to itself (no cache rows left unwritten)
        slot, prompt_ids, output_ids = 0, [5], []

    class Chunk:
        seq, start = Seq(), 0

    slot = runner.pool.new_slot()
    Seq.slot = slot
    assert runner.pool.reserve(slot, 0, 1)
    first = runner.fused([Chunk()])
    kept = first.clone()
    Seq.prompt_ids = [200]
    second = runner.fused([Chunk()])
    assert torch.equal(first, kept) and not torch.equal(first, second)


def test_kv_pool_growth_keeps_computed_positions(tiny_quantized):
    """A prompt prefilled in chunks across several cache growths decodes like one whole-prompt prefill."""
    from tests.helpers import greedy

    d = tiny_quantized["q0f32"]
    tokens, _, _, _ = generate(d, [PROMPTS[3]], 8, "O0", chunk=16)
    assert tokens[0] == greedy(d, torch.tensor(PROMPTS[3]), 8)


def test_o0_o1_o2_same_greedy_tokens_tiny_q4(tiny_quantized):
    d = tiny_quantized["q4f16_1"]
    ref, _, _, _ = generate(d, PROMPTS, 24, "O0")
    for opt in ("O1", "O2"):
        got, _, _, _ = generate(d, PROMPTS, 24, opt)
        assert got == ref, opt


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_fused_decode_other_llama_families(kind, tmp_path):
    d = convert(_tiny_family(kind, tmp_path / "hf"), tmp_path / "q4", "q4f16_1")
    prompts = [list(range(3, 30)), [3, 44, 45]]  # the first is longer than mistral's window of 8
    _fused_matches_reference(d, prompts, 10)


@pytest.mark.parametrize("precision", ["high", "normal"])
def test_batched_decode_equals_single(tiny_quantized, precision):
    d = tiny_quantized["q4f16_1"]
    for opt in ("O1", "O2"):
        batch_tokens, batch_logits, _, _ = generate(d, PROMPTS, 16, opt, max_seqs=8, precision=precision)
        for i, p in enumerate(PROMPTS):
            tokens, logits, _, _ = generate(d, [p], 16, opt, max_seqs=1, precision=precision)
            assert tokens[0] == batch_tokens[i]
            _close(logits[0], batch_logits[i], 1e-4)  # prefill rows may take another product path


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("kind", ["q4", "mistral"])
def test_fused_decode_kv_cache_types(kind, kv_dtype, tiny_quantized, tmp_path):
    """float16 and int8 keys/values (int8: rows of D codes and a float32 scale): the native step gives the
    reference path's tokens and logits, also with a sliding window that shifts rows; both stay near float32."""
    if kind == "q4":
        d, prompts = tiny_quantized["q4f16_1"], PROMPTS
    else:
        d = convert(_tiny_family("mistral", tmp_path / "hf"), tmp_path / "q4", "q4f16_1")
        prompts = [list(range(3, 30)), [3, 44, 45]]
    _, f32_logits, _, _ = generate(d, prompts, 10, "O0")
    ref_logits = _fused_matches_reference(d, prompts, 10, kv_dtype=kv_dtype)
    # int8 rounds each key and value to 1/254 of its row's largest entry; on these random models that
    # moves the logits by about 0.3% of their largest magnitude (float16: about 0.01%)
    for a, b in zip(ref_logits, f32_logits):
        _close(a, b, 0.02)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (2, 1), (6, 2), (4, 1)],
                         ids=["d64-rep2", "d64-rep1", "d128-rep2", "d64-rep3", "d64-rep4"])
def test_fused_decode_real_head_dims(heads, kv_dtype, tmp_path):
    """Head dims 64 and 128 (real models' sizes) have attention code of their own (attention.cpp: qk16 and
    qk8_heads, the keys converted once for all the heads of a group, values summed for up to 3 or 6 heads
    at once): O2 gives O0's tokens and logits for every cache element type, over prompts longer than a
    16-key block."""
    n_heads, n_kv = heads
    hf = _tiny_family("llama", tmp_path / "hf", hidden_size=max(256, 64 * n_heads), num_attention_heads=n_heads,
                      num_key_value_heads=n_kv)
    d = convert(hf, tmp_path / "q4", "q4f16_1")
    # int8 rows: the native step applies a row's scale to its whole dot product, the reference to each
    # dequantized element; with 128 dimensions the two part by about 1.3e-3 of the largest logit
    tol = 2e-3 if kv_dtype == torch.int8 else 1e-3
    _fused_matches_reference(d, [PROMPTS[3], PROMPTS[2], [3, 5]], 6, tol=tol, kv_dtype=kv_dtype)


# ---- the real model ---------------------------------------------------------------------------------------
@pytest.mark.slow  # the real model
def test_smollm2_q4_o0_and_o2_same_greedy_tokens(smollm2_q4):
    prompts = [[1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 3458, 282, 4649, 314],
               [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 28, 7018, 457, 2]]
    ref_tokens, ref_logits, _, _ = generate(smollm2_q4, prompts, 12, "O0", chunk=64)
    tokens, logits, runner, fused = generate(smollm2_q4, prompts, 12, "O2", chunk=64)
    assert runner.fused is not None and fused > 0
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits):
        assert (a - b).abs().max().item() < 1e-3 * max(1.0, b.abs().max().item())


@pytest.mark.slow  # the real model
def test_smollm2_engine_o2_chat_matches_o0(smollm2_q4):
    from edgellm import Engine

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    texts = {}
    for opt in ("O0", "O2"):
        with Engine(str(smollm2_q4), opt=opt) as eng:
            r = eng.chat.completions.create(messages=msgs, temperature=0, max_tokens=12)
            texts[opt] = r.choices[0].message.content
    assert texts["O0"] == texts["O2"] and "Paris" in texts["O2"]


# ---- every family: O2 is O0 --------------------------------------------------------------------------------
def test_native_argmax_is_numpys():
    """The decode step's own argmax (greedy tokens) picks what numpy's does: the first of equal maxima,
    the first NaN of a row that has one, index 0 of a row of -inf; any row length."""
    torch.manual_seed(0)
    for n in (1, 5, 8, 9, 15, 16, 17, 33, 49152):  # both vector widths and their tails
        x = torch.randn(6, n)
        x[1] = 0.5  # all equal: index 0
        x[2, n // 3:] = x[2].max() + 1  # ties after the first maximum
        x[3] = float("-inf")
        x[4, n // 2] = float("nan")
        x[4, n - 1] = float("nan")
        x[5, n - 1] = float("inf")
        assert kernels.argmax_rows(x) == x.numpy().argmax(axis=-1).tolist(), n

"""export-gguf: every family round-trips through GGUF (transformers reads the file where it can and
gives the HF model's logits; edgellm converts it back to the same greedy tokens), quantized modes
map exactly onto GGUF blocks, the tokenizer survives, and the real SmolLM2 export runs in llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer

from edgellm.errors import UserError
from edgellm.gen_config import gen_config
from edgellm.models.mapping import HFMapper
from edgellm.models.registry import get_family
from edgellm.quantization.modes import get_mode
from edgellm.quantization.pack import dequantize
from edgellm.weights.convert import convert_weight
from edgellm.weights.gguf_reader import GGUFSource
from edgellm.weights.gguf_writer import export_gguf
from edgellm.weights.tensor_cache import read_tensors
from tests.helpers import convert, greedy, run_logits, save_hf
from tests.test_internlm2 import llama as internlm2_reference
from tests.test_internlm2 import write_internlm2

COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
              bos_token_id=3, eos_token_id=2)
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.9, 2.6],
            "long_factor": [1.5, 2.5, 4.0, 7.0], "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
# name -> (config class, model class, overrides, transformers reads the GGUF back). transformers'
# GGUF loader knows llama, mistral, qwen2, qwen3, phi3 and gemma2, but not gptneox or internlm2, and
# it ignores rope scaling (llama3's rope_freqs, phi3's longrope factors) and partial rotary; it reads
# qwen3's head_dim as Qwen3Config's default 128 and gemma2's query_pre_attn_scalar and soft-caps as
# Gemma2Config's defaults. Cases with those features are checked through edgellm only.
CASES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(tie_word_embeddings=False), True),
    "llama-tied-llama3rope": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        tie_word_embeddings=True, rope_scaling=LLAMA3, rope_theta=500000.0), False),
    "mistral-window": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=16, tie_word_embeddings=False),
                       True),
    "qwen2-tied": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=True, rope_theta=1e6), True),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(tie_word_embeddings=False, head_dim=128), True),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(tie_word_embeddings=False), True),
    "phi3-tied-longrope-partial": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(
        tie_word_embeddings=True, rope_scaling=LONGROPE, partial_rotary_factor=0.5,
        original_max_position_embeddings=128), False),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(head_dim=256, query_pre_attn_scalar=256,
                                                          sliding_window=16), True),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(
        num_key_value_heads=None, use_parallel_residual=False, rotary_pct=0.5), False),
}
MULTILINGUAL = ("The capital of France is Paris. 小明比小红年龄大。 Ελληνικά, русский, हिन्दी, café 👍🏽 "
                "<|im_start|>user\nIt's 12345 o'clock!<|im_end|>\n  def f(x):\n\treturn x")
IDS = torch.randint(5, 384, (24,), generator=torch.Generator().manual_seed(1))


def build(name: str, tmp_path):
    """(reference model, HF directory): a random tiny model with perturbed norms and biases."""
    if name == "internlm2":
        model = internlm2_reference(bias=False)
        write_internlm2(model, False, tmp_path / "hf")
        return model, tmp_path / "hf"
    cfg_cls, model_cls, over, _ = CASES[name]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{k: v for k, v in {**COMMON, **over}.items() if v is not None})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
        if getattr(model, "lm_head", None) is not None and not model.config.tie_word_embeddings:
            model.lm_head.weight.mul_(20.0)  # peaked logits: greedy choices not decided by float noise
    return model, save_hf(model, tmp_path / "hf")


def dequantized(model_dir, mode) -> dict[str, torch.Tensor]:
    """A converted directory's weights as float32 (exactly (q - offset) * scale for quantized ones)."""
    expected, records = {}, dict(read_tensors(model_dir))
    for name, t in records.items():
        if name.endswith(".q_weight"):
            base = name[: -len(".q_weight")]
            k = t.shape[1] * (mode.elems_per_word if mode.kind == "group" else 1)
            expected[base + ".weight"] = dequantize(t, records[base + ".q_scale"], mode, k)
        elif not name.endswith(".q_scale"):
            expected[name] = t.float()
    return expected


def from_gguf(path, out):
    convert_weight(path, "q0f32", out, progress=False)
    gen_config(path, "q0f32", "chatml", out)
    return out


@pytest.mark.parametrize("name", [*CASES, "internlm2"])
def test_round_trip(name, tmp_path):
    model, hf_dir = build(name, tmp_path)
    ours = convert(hf_dir, tmp_path / "q0", "q0f32")
    path = tmp_path / "gguf" / "model.gguf"
    summary = export_gguf(ours, path, "f32")
    assert set(summary["types"]) == {"F32"}

    if name != "internlm2" and CASES[name][3]:
        ref = model(IDS[None, :12]).logits[0]
        read = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
        with torch.inference_mode():
            got = read(IDS[None, :12]).logits[0]
        assert (got - ref).abs().max().item() < 1e-4

    back = from_gguf(path, tmp_path / "back")
    assert json.loads((back / "mlc-chat-config.json").read_text())["model_type"] == \
        json.loads((ours / "mlc-chat-config.json").read_text())["model_type"]
    assert (run_logits(back, IDS) - run_logits(ours, IDS)).abs().max().item() < 1e-5
    assert greedy(back, IDS, 8) == greedy(ours, IDS, 8)

    # The exported vocabulary rebuilt (as edgellm and llama.cpp read it) encodes like the source.
    source = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    rebuilt = Tokenizer.from_file(str(back / "tokenizer.json"))
    assert rebuilt.encode(MULTILINGUAL).ids == source.encode(MULTILINGUAL).ids


@pytest.mark.parametrize(("quantization", "gguf_type", "kind"), [
    ("q4f16_1", "q4_0", gguf.GGMLQuantizationType.Q4_0),
    ("q4f16_1", "q8_0", gguf.GGMLQuantizationType.Q8_0),
    ("q8f16_1", "q8_0", gguf.GGMLQuantizationType.Q8_0),
])
def test_quantized_export_is_exact(tiny_hf, tmp_path, quantization, gguf_type, kind):
    # q4f16_1 codes q in 0..14 with w = (q - 7) * scale become Q4_0 nibbles q + 1 with d = scale
    # (or Q8_0 values q - 7); q8f16_1 is Q8_0's layout. Read back, every weight is bit-identical.
    ours = convert(tiny_hf, tmp_path / "q", quantization)
    path = tmp_path / "model.gguf"
    export_gguf(ours, path, gguf_type)
    tensors = gguf.GGUFReader(path).tensors
    assert {t.tensor_type for t in tensors if len(t.shape) == 2} == {kind}
    assert {t.tensor_type for t in tensors if len(t.shape) == 1} == {gguf.GGMLQuantizationType.F32}

    back = tmp_path / "back"
    convert_weight(path, "q0f32", back, progress=False)
    expected = dequantized(ours, get_mode(quantization))
    got = dict(read_tensors(back))
    assert set(got) == set(expected)
    for name, t in got.items():
        assert torch.equal(t, expected[name]), name


def test_mlc_written_directory_exports_like_ours(tmp_path):
    # A q4f16_1 directory written the way MLC-LLM writes it (tests/test_mlc_dir.py: its names,
    # ndarray-cache.json, unaligned records) exports the same GGUF tensors as our own conversion.
    from tests.test_mlc_dir import write_mlc_dir
    from tests.test_quantization import tiny_llama

    model, hf_dir = tiny_llama(tmp_path, "h64", vocab_size=385, rope_theta=50000.0)
    hf = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    mlc = tmp_path / "mlc"
    write_mlc_dir(mlc, hf, json.loads((hf_dir / "config.json").read_text()), "q4f16_1", hf_dir)
    ours = convert(hf_dir, tmp_path / "ours", "q4f16_1")
    export_gguf(mlc, tmp_path / "mlc.gguf", "q4_0")
    export_gguf(ours, tmp_path / "ours.gguf", "q4_0")
    a, b = ({t.name: t for t in gguf.GGUFReader(tmp_path / f"{n}.gguf").tensors} for n in ("mlc", "ours"))
    assert set(a) == set(b) and len(a) == 3 + 9 * 2  # MLC writes them in another order
    assert {a[n].tensor_type.name for n in a} == {"F32", "Q4_0"}
    for name, x in a.items():
        assert x.tensor_type == b[name].tensor_type and bytes(x.data) == bytes(b[name].data), name


def test_q4_1_export_bound(tiny_model_q4, tmp_path):
    # Q4_1 stores w = n * d + m: n = q, d = scale exactly, m = -7 * scale rounded to float16, so each
    # weight is off by at most half a float16 ulp of 7 * scale.
    path = tmp_path / "model.gguf"
    export_gguf(tiny_model_q4, path, "q4_1")
    src = GGUFSource(path)
    mode = get_mode("q4f16_1")
    records = dict(read_tensors(tiny_model_q4))
    t = records["model.layers.0.mlp.down_proj.q_weight"]
    scale = records["model.layers.0.mlp.down_proj.q_scale"]
    want = dequantize(t, scale, mode, 128)
    got = dict(src.iter_tensors())["model.layers.0.mlp.down_proj.weight"]
    ulp = torch.finfo(torch.float16).eps * (7 * scale.float()).abs().repeat_interleave(32, dim=1)
    assert ((got - want).abs() <= ulp / 2 + 1e-12).all()


def test_cli_export_and_errors(tiny_model, tmp_path, capsys):
    from edgellm.cli.main import main

    path = tmp_path / "tiny.gguf"
    run = [sys.executable, "-m", "edgellm", "export-gguf", str(tiny_model), "-o", str(path), "--type", "q8_0"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Wrote" in done.stdout and path.stat().st_size > 0
    for argv, message in (
        (["export_gguf", str(tiny_model), "-o", str(path), "--type", "q5_k", "--force"],
         "error: GGUF type 'q5_k' is not supported (supported: q4_0, q4_1, q8_0, f16, f32)"),
        (["export-gguf", str(tiny_model), "-o", str(path)], "already exists; choose another name or pass --force"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.strip().count("\n") == 0 and message in err  # one line


def test_refusals(tiny_model, tmp_path):
    with pytest.raises(UserError, match="no such model directory"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    # A tokenizer whose pre-tokenization no llama.cpp pre-tokenizer reproduces.
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in tiny_model.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    data = json.loads((odd / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Whitespace"}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                 "use_regex": False}]}
    (odd / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"splits text like none of llama.cpp's.*supported pre-tokenizers: .*qwen35"):
        export_gguf(odd, tmp_path / "odd.gguf")
    data["model"] = {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}
    (odd / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="tokenizer model 'WordLevel' cannot be written to GGUF"):
        export_gguf(odd, tmp_path / "odd.gguf")
    assert not (tmp_path / "odd.gguf").exists()


def test_gemma2_query_scale_llama_cpp_cannot_state(tmp_path):
    cfg = tf.Gemma2Config(**COMMON, head_dim=32, query_pre_attn_scalar=24)
    torch.manual_seed(0)
    hf_dir = save_hf(tf.Gemma2ForCausalLM(cfg).eval(), tmp_path / "hf")
    ours = convert(hf_dir, tmp_path / "q0", "q0f32")
    with pytest.raises(UserError, match="gemma2 query_pre_attn_scalar 24.0 cannot be stated in GGUF"):
        export_gguf(ours, tmp_path / "g.gguf", "f32")


@pytest.fixture(scope="module")
def smollm2_q4_0(smollm2_q4, tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2_gguf") / "smollm2-q4_0.gguf"
    summary = export_gguf(smollm2_q4, path, "q4_0")
    assert summary["types"] == {"Q4_0": 211, "F32": 61}  # 30 layers x 7 linears + embedding; norms
    return path


@pytest.mark.slow
def test_smollm2_q4_0_in_llama_cpp(smollm2_q4_0):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(smollm2_q4_0), n_ctx=512, n_threads=2, verbose=False, seed=0)
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=24, temperature=0.0)
    assert "Paris" in reply["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_smollm2_q4_0_weights_read_back_bit_identical(smollm2_q4, smollm2_q4_0):
    # Every weight of the real model, read back from the export (q/k rows un-permuted, q/k/v and
    # gate/up fused again), equals the dequantized q4f16_1 weight bit for bit.
    src = GGUFSource(smollm2_q4_0)
    family = get_family(src.hf_config["model_type"])
    mapper = HFMapper(family, family.parse_config(src.hf_config))
    expected = dequantized(smollm2_q4, get_mode("q4f16_1"))
    seen = set()
    for hf_name, tensor in src.iter_tensors():
        for name, t in mapper.feed(hf_name, tensor):
            assert torch.equal(t, expected[name]), name
            seen.add(name)
    assert seen == set(expected)


def test_sentencepiece_style_tokenizer_exports_as_llama_vocab(tmp_path):
    # A SentencePiece BPE vocabulary as tokenizer.json (byte fallback, "▁" spaces) exports as
    # llama.cpp's "llama" model with merge ranks as scores; rebuilt from the GGUF keys it still
    # encodes like sentencepiece itself.
    import io
    import random

    from edgellm.config import ChatConfig
    from edgellm.weights.gguf_tokenizer import build_tokenizer
    from edgellm.weights.gguf_vocab import tokenizer_metadata
    from tests.test_gguf_reader import _spm_vocab

    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog hello world model python code return value class".split()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]),
        model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
        eos_id=2, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

    class Meta(dict):  # collects what _spm_vocab writes, as a GGUF reader would return it
        def __getattr__(self, name):
            key = {"add_tokenizer_model": "model", "add_token_list": "tokens", "add_token_scores": "scores",
                   "add_token_types": "token_type", "add_unk_token_id": "unknown_token_id",
                   "add_bos_token_id": "bos_token_id", "add_eos_token_id": "eos_token_id"}[name]
            return lambda value: self.__setitem__(f"tokenizer.ggml.{key}", value)

    first = Meta()
    _spm_vocab(first, sp)
    tokenizer_json, config = build_tokenizer(dict(first), "spm.gguf")
    (tmp_path / "tokenizer.json").write_text(tokenizer_json)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = ChatConfig(model_type="llama", quantization="q0f32", model_config={}, vocab_size=400)
    meta = tokenizer_metadata(tmp_path, cfg, 400)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.token_type"][3:259] == [6] * 256  # <0x00>..<0xFF> are byte tokens
    rebuilt = Tokenizer.from_str(build_tokenizer(meta, "export.gguf")[0])
    for text in ["hello world", "the lazy fox", "  two  spaces", "中文 and émoji 😀", "helloworld", "Hello World",
                 "return value;\n\tclass Foo", "quick.brown,fox!"]:
        assert rebuilt.encode(text).ids == [1, *sp.encode(text)], text


@pytest.mark.slow
def test_smollm2_q4_0_tokenizer_and_template_survive(smollm2_q4, smollm2_q4_0, tmp_path):
    from edgellm.weights.gguf_vocab import PROBES

    src = GGUFSource(smollm2_q4_0)
    assert src.meta.get("tokenizer.ggml.pre") == "smollm"
    src.write_tokenizer(tmp_path)
    source = Tokenizer.from_file(str(smollm2_q4 / "tokenizer.json"))
    rebuilt = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [MULTILINGUAL, *PROBES]:
        assert rebuilt.encode(text).ids == source.encode(text).ids, text
    before = json.loads((smollm2_q4 / "tokenizer_config.json").read_text())
    after = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "chat_template"):
        assert after.get(key) == before.get(key), key

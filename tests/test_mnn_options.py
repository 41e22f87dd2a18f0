"""MNN-LLM's runtime options: kvcache_mmap + tmp_path, backend_type, memory, quant_qkv, precision, and an
MNN-style config.json given to chat / bench as the options of the model directory it sits in."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from edgellm import Engine
from edgellm.errors import UserError
from tests.test_chat_cli import _env

PROMPT = [5, 17, 200, 33, 90, 4, 250, 11]


def tokens(eng: Engine, n: int = 12) -> list[int]:
    r = eng.completions.create(prompt=PROMPT, max_tokens=n, temperature=0, ignore_eos=True, logprobs=1,
                               return_tokens_as_token_ids=True)
    return [int(t.split(":", 1)[1]) for t in r.choices[0].logprobs.tokens]


@pytest.fixture(scope="module")
def reference(tiny_model) -> list[int]:
    with Engine(str(tiny_model)) as eng:
        return tokens(eng)


def _mapped_kv_files() -> list[str]:
    with open("/proc/self/maps") as f:
        return [ln for ln in f if "edgellm-kv-" in ln]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_kvcache_mmap_keeps_the_cache_in_files_under_tmp_path(tiny_model, reference, tmp_path):
    with Engine(str(tiny_model), kvcache_mmap=True, tmp_path=str(tmp_path), reuse_kv=True) as eng:
        assert tokens(eng) == reference
        maps = _mapped_kv_files()
        assert maps and all(str(tmp_path) in ln for ln in maps)  # the kept prefix's KV lives in those files
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_memory_backend_precision_quant_qkv(tiny_model, reference):
    with Engine(str(tiny_model), memory="high", opt="O0", backend_type="cpu", precision="low") as eng:
        assert eng.device == "cpu" and tokens(eng) == reference
    with Engine(str(tiny_model), quant_qkv=3) as eng:
        assert eng.pool.dtype == torch.int8


@pytest.mark.parametrize("opts,needle", [
    ({"memory": "medium"}, "memory must be low or high"),
    ({"backend_type": "opencl"}, "backend_type 'opencl'"),
    ({"quant_qkv": 7}, "quant_qkv must be 0, 1, 2, 3 or 4"),
    ({"kvcache_mmap": True, "tmp_path": "/definitely/not/here"}, "no such directory"),
])
def test_bad_values_are_clear_errors(tiny_model, opts, needle):
    with pytest.raises(UserError, match=needle):
        Engine(str(tiny_model), **opts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_backend_cuda_without_cuda(tiny_model):
    with pytest.raises(UserError, match="CUDA"):
        Engine(str(tiny_model), backend_type="cuda")


def test_mnn_config_json_is_read_as_runtime_options(tiny_model, tmp_path):
    model = tmp_path / "model_dir"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text(json.dumps({
        "llm_model": "qwen2-1.5b-int4.mnn", "llm_weight": "qwen2-1.5b-int4.mnn.weight", "backend_type": "cpu",
        "thread_num": 2, "precision": "low", "memory": "low", "max_new_tokens": 5, "kvcache_mmap": True,
        "tmp_path": str(tmp_path), "quant_qkv": 1}))
    r = subprocess.run([sys.executable, "-m", "edgellm", "chat", str(model / "config.json")], input="hello\n/stats\n",
                       capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr
    assert "prefill:" in r.stdout
    (model / "config.json").write_text(json.dumps({"llm_model": "x.mnn", "memory": "huge"}))
    r = subprocess.run([sys.executable, "-m", "edgellm", "chat", str(model / "config.json")], input="hello\n",
                       capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 2 and "memory must be low or high" in r.stderr


def test_bench_reads_the_mnn_config(tiny_model, tmp_path):
    model = tmp_path / "model_dir"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text(json.dumps({"llm_model": "llm.mnn", "llm_weight": "llm.mnn.weight",
                                                   "backend_type": "cpu", "thread_num": 1, "quant_qkv": 1}))
    r = subprocess.run([sys.executable, "-m", "edgellm", "bench", str(model / "config.json"), "--prompt-len", "8",
                        "--gen-len", "4", "--repeat", "1", "--no-bandwidth", "--json"],
                       capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["threads"] == 1 and report["kv_cache_dtype"] == "int8"

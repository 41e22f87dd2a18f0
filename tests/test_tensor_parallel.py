"""tensor_parallel_shards on torch.distributed (gloo): every family split over 2 ranks computes what
1 rank does; the real SmolLM2 served over 2 processes answers and batches; a dead worker fails the
running request within seconds and turns /health to 503; the workers die with their parent; a model
that cannot be split is refused at load with one line."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import torch.distributed as dist

from edgellm.api.engine import Engine
from edgellm.engine.distributed import Comm, make_group
from edgellm.errors import UserError
from tests.helpers import convert
from tests.test_internlm2 import llama as internlm2_reference
from tests.test_internlm2 import write_internlm2
from tests.test_models_parity import build
from tests.tp_ranks import free_port, rank1, run_model

# One case per family; every shape splits at whole q4 groups over 2 ranks (2 heads x head_dim >= 32).
FAMILIES = ["llama", "mistral-window", "qwen2-tied", "qwen3-tied", "phi3-tied-window", "gemma2",
            "gpt_neox-parallel"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tp_families")
    dirs = []
    for name in FAMILIES:
        _, hf = build(name, root / name)
        dirs += [convert(hf, root / name / q, q) for q in ("q0f32", "q4f16_1")]
    write_internlm2(internlm2_reference(bias=True), True, root / "internlm2" / "hf")
    dirs += [convert(root / "internlm2" / "hf", root / "internlm2" / q, q) for q in ("q0f32", "q4f16_1")]
    return dirs


def test_every_family_two_shards_match_one(family_dirs):
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    worker = torch.multiprocessing.get_context("spawn").Process(
        target=rank1, args=(port, [str(d) for d in family_dirs]), daemon=True)
    worker.start()
    try:
        store.wait(["edgellm/hello/1"], datetime.timedelta(seconds=60))
        comm = Comm(make_group(store, 0, 2, "127.0.0.1"), 2)
        for d in family_dirs:
            whole, split = run_model(d, None, None), run_model(d, 0, comm)
            tol = 1e-4 if d.name == "q0f32" else 2e-3  # q4: the shards' partial sums add in another order
            for a, b in zip(whole, split):
                assert (a - b).abs().max().item() < tol, d
            assert [x[-1].argmax().item() for x in whole] == [x[-1].argmax().item() for x in split], d
        worker.join(30)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()


def test_unsplittable_models_are_refused_in_one_line(tiny_model, tiny_model_q4):
    # 4 query heads over 2 kv heads cannot go 3 ways; over 4 ranks a q4 group (32 columns) would
    # straddle two shards (one 16-wide head each). Refused before any worker starts.
    for model, shards, words in ((tiny_model, 3, "cannot split 4 query heads over 2 key-value heads"),
                                 (tiny_model_q4, 4, "would straddle two shards")):
        with pytest.raises(UserError) as e:
            Engine(str(model), tensor_parallel_shards=shards)
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="tensor_parallel_shards must be positive"):
        Engine(str(tiny_model), tensor_parallel_shards=0)
    with pytest.raises(UserError, match="LoRA adapters at run time are not split over shards"):
        Engine(str(tiny_model), tensor_parallel_shards=2, lora_adapters={"a": str(tiny_model)})


def test_gen_config_records_the_shards_or_refuses(tiny_hf, tmp_path, capsys):
    from edgellm.cli.main import main

    with pytest.raises(SystemExit) as ok:
        main(["gen_config", str(tiny_hf), "--quantization", "q0f32", "--conv-template", "chatml",
              "--tensor-parallel-shards", "2", "-o", str(tmp_path / "two")])
    assert ok.value.code == 0
    assert json.loads((tmp_path / "two" / "mlc-chat-config.json").read_text())["tensor_parallel_shards"] == 2
    with pytest.raises(SystemExit) as e:
        main(["gen_config", str(tiny_hf), "--quantization", "q4f16_1", "--conv-template", "chatml",
              "--tensor-parallel-shards", "4", "-o", str(tmp_path / "four")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "would straddle two shards" in err and err.count("\n") == 1
    assert not (tmp_path / "four").exists()


@pytest.fixture(scope="module")
def tiny_two_shards(tiny_hf, tmp_path_factory) -> Path:
    """The tiny llama with tensor_parallel_shards=2 recorded in its mlc-chat-config.json."""
    return convert(tiny_hf, tmp_path_factory.mktemp("tiny_tp2") / "model", "q0f32", tensor_parallel_shards=2)


ORPHAN = """
import sys, multiprocessing
from edgellm.api.engine import Engine
e = Engine(sys.argv[1], context_window_size=128)  # the shard count comes from mlc-chat-config.json
print(*[p.pid for p in multiprocessing.active_children() if p.name.startswith("edgellm-tp")], flush=True)
sys.stdin.read()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_workers_die_with_their_parent(tiny_two_shards):
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN, str(tiny_two_shards)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        assert _alive(pid)
        proc.kill()  # no clean-up code runs in the parent
        deadline = time.time() + 10
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
def test_smollm2_on_two_processes_answers_batches_and_fails_cleanly(smollm2_q4):
    from tests.test_serve import Server

    server = Server(smollm2_q4, "--overrides", "tensor_parallel_shards=2;max_num_sequence=4;context_window_size=512")
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        ask = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=16)
        assert "Paris" in r.choices[0].message.content

        before = server.metrics()
        answers: list[str] = []
        threads = [threading.Thread(target=lambda: answers.append(client.chat.completions.create(
            model=model, messages=ask, temperature=0, max_tokens=12).choices[0].message.content)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        after = server.metrics()
        tokens = after["generation_tokens_total"] - before["generation_tokens_total"]
        assert len(answers) == 3 and all("Paris" in a for a in answers)
        assert after["steps_total"] - before["steps_total"] < tokens  # decoded together, not one by one

        with pytest.raises(openai.APIStatusError) as refused:  # shards run only in the engine's steps
            client.embeddings.create(model=model, input="hello")
        assert refused.value.status_code == 400 and "tensor_parallel_shards" in str(refused.value)

        worker = next(int(p) for p in _children(server.proc.pid) if b"multiprocessing" in _cmdline(int(p))
                      and b"resource_tracker" not in _cmdline(int(p)))
        story = [{"role": "user", "content": "Tell a long story."}]
        stream = client.chat.completions.create(model=model, messages=story, max_tokens=400, stream=True,
                                                temperature=0)
        next(iter(stream))
        os.kill(worker, signal.SIGKILL)
        t0 = time.time()
        with pytest.raises(Exception) as e:
            for _ in stream:
                pass
        assert time.time() - t0 < 10
        assert "tensor-parallel" in str(e.value)
        health = httpx.get(server.base + "/health", timeout=5)
        assert health.status_code == 503 and "worker 1" in health.json()["error"]
    finally:
        server.stop()


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()

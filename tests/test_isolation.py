"""No request can hurt another (issue 18, items 1-5): bad requests are refused before the scheduler,
a failing step fails only its own requests, the KV budget never livelocks, terminate() never strands a
caller, and per-request preparation is bounded. Well-formed requests running beside them complete with
exactly their normal output."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import pytest

from edgellm import AsyncEngine, Engine
from edgellm.engine.build import build_engine
from edgellm.engine.options import make_options
from edgellm.engine.request import Request, SamplingParams
from edgellm.errors import BadRequestError, EngineTerminatedError

GOOD = ["Hello there!", "What is the capital of France?", "def add(a, b):", "1 2 3 4 5"]


def msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _greedy(eng: Engine, text: str) -> str:
    r = eng.chat.completions.create(messages=msgs(text), temperature=0, max_tokens=16)
    return r.choices[0].message.content


def _beside(eng: Engine, bad) -> dict[str, str]:
    """Run the good prompts on threads while `bad()` runs; their outputs."""
    out: dict[str, str] = {}
    threads = [threading.Thread(target=lambda t=t: out.__setitem__(t, _greedy(eng, t))) for t in GOOD]
    for th in threads:
        th.start()
    bad()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads)
    return out


@pytest.fixture(scope="module")
def calm(tiny_model) -> dict[str, str]:
    with Engine(str(tiny_model)) as eng:
        return {t: _greedy(eng, t) for t in GOOD}


@pytest.fixture(scope="module")
def odd_model(tiny_model, tmp_path_factory):
    """The tiny model with a config claiming 1000 tokens (the embedding has 384) and a chat template that
    renders only the messages' text (so an empty message is an empty prompt)."""
    d = tmp_path_factory.mktemp("odd") / "model"
    shutil.copytree(tiny_model, d)
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    cfg = json.loads((d / "mlc-chat-config.json").read_text())
    cfg.update(vocab_size=1000, conv_template="auto")
    (d / "mlc-chat-config.json").write_text(json.dumps(cfg))
    return d


def test_bad_requests_are_refused_before_the_scheduler(odd_model, calm):
    with Engine(str(odd_model), max_num_sequence=8) as eng:
        errors: list[BaseException] = []

        def bad():
            for call in (lambda: eng.chat.completions.create(messages=msgs(""), max_tokens=4),
                         lambda: eng.completions.create(prompt=[3, 500, 7], max_tokens=4),
                         lambda: eng.completions.create(prompt=[3, 5], max_tokens=4, logit_bias={700: 1})):
                with pytest.raises(BadRequestError) as e:
                    call()
                errors.append(e.value)

        good = _beside(eng, bad)
        assert "empty prompt" in str(errors[0])
        assert "500" in str(errors[1]) and "384" in str(errors[1])
        assert "700" in str(errors[2])
        assert eng.metrics()["requests_failed"] == 0
    # this template renders the same messages differently: compare with this model's own calm run
    with Engine(str(odd_model)) as eng:
        assert good == {t: _greedy(eng, t) for t in GOOD}
    assert set(calm) == set(good)


def test_a_failing_step_fails_only_its_request(tiny_model):
    """A request that breaks the model (an id past the embedding, let in below the frontend) fails alone."""
    opts = make_options({"max_num_sequence": 8, "reuse_kv": False})
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def run(prompts):
        core = build_engine(tiny_model, opts, "cpu")
        reqs = [Request(str(i), p, params) for i, p in enumerate(prompts)]
        for r in reqs:
            core.add(r)
        while core.has_work:
            core.step()
        return reqs

    good = [[3, 17, 99, 5], [3, 200, 201, 9, 11], list(range(5, 40))]
    alone = [r.sequences[0].output_ids for r in run(good)]
    reqs = run(good[:1] + [[3, 10**6, 4]] + good[1:])
    assert reqs[1].error is not None and reqs[1].sequences[0].finish_reason == "abort"
    assert [r.error for r in reqs[:1] + reqs[2:]] == [None] * 3
    assert [r.sequences[0].output_ids for r in reqs[:1] + reqs[2:]] == alone


def test_kv_budget_refuses_or_finishes_never_spins(tiny_model, calm):
    with Engine(str(tiny_model), max_total_seq_length=256, max_num_sequence=8) as eng:
        t = time.monotonic()
        with pytest.raises(BadRequestError, match="KV cache budget") as e:
            eng.completions.create(prompt=list(range(5, 305)), max_tokens=4)
        assert "300" in str(e.value)
        r = eng.completions.create(prompt=list(range(5, 25)), max_tokens=400, ignore_eos=True, temperature=0)
        assert r.choices[0].finish_reason == "length" and 100 < r.usage.completion_tokens < 400
        assert time.monotonic() - t < 60
        good = _beside(eng, lambda: eng.completions.create(prompt=list(range(5, 25)), max_tokens=400,
                                                          ignore_eos=True, temperature=0))
        assert good == calm
        m = eng.metrics()
        assert m["requests_running"] == 0 and m["kv_cache_tokens_active"] == 0


def test_terminate_racing_submissions_never_blocks(tiny_model):
    eng = Engine(str(tiny_model), max_num_sequence=8)
    outcomes: list[str] = []

    stop = time.monotonic() + 20  # submit until terminated (a fast engine finishes any fixed number first)

    def submit():
        while time.monotonic() < stop:
            try:
                eng.chat.completions.create(messages=msgs("hi"), max_tokens=8)
                outcomes.append("ok")
            except EngineTerminatedError:
                outcomes.append("terminated")
                return

    threads = [threading.Thread(target=submit) for _ in range(24)]
    for th in threads:
        th.start()
    time.sleep(0.5)
    eng.terminate()
    deadline = time.monotonic() + 15
    for th in threads:
        th.join(timeout=max(0.1, deadline - time.monotonic()))
    assert not any(th.is_alive() for th in threads)
    assert "terminated" in outcomes
    t = time.monotonic()
    with pytest.raises(EngineTerminatedError):
        eng.reset()
    with pytest.raises(EngineTerminatedError):
        eng.chat.completions.create(messages=msgs("hi"), max_tokens=4)
    assert time.monotonic() - t < 1


@pytest.fixture(scope="module")
def hostile_template_model(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile") / "model"
    shutil.copytree(tiny_model, d)
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok["chat_template"] = ("{% if messages[0]['content'] == 'loop' %}{% for i in range(100000) %}"
                            "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
                            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}<|im_start|>assistant\n")
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    cfg = json.loads((d / "mlc-chat-config.json").read_text())
    cfg["conv_template"] = "auto"
    (d / "mlc-chat-config.json").write_text(json.dumps(cfg))
    return d


def test_request_preparation_is_bounded(hostile_template_model):
    huge_enum = {"type": "object", "properties": {"k": {"enum": [f"value-{i}" for i in range(100_000)]}}}

    async def main():
        async with AsyncEngine(str(hostile_template_model), max_num_sequence=8) as eng:
            async def good():
                r = await eng.chat.completions.create(messages=msgs("Hello there!"), temperature=0, max_tokens=8)
                return r.choices[0].message.content

            calm = await good()
            t = time.monotonic()
            bad = [eng.chat.completions.create(messages=msgs("loop"), max_tokens=4),
                   eng.chat.completions.create(messages=msgs("x"), max_tokens=4, response_format={
                       "type": "json_schema", "json_schema": {"name": "e", "schema": huge_enum}}),
                   eng.chat.completions.create(messages=msgs("x"), max_tokens=4,
                                               stop=[f"s{i}" for i in range(200_000)])]
            results = await asyncio.gather(*bad, good(), return_exceptions=True)
            assert time.monotonic() - t < 20
            assert all(isinstance(e, BadRequestError) for e in results[:3]), results[:3]
            assert "loops" in str(results[0]) and "schema" in str(results[1]) and "stop" in str(results[2])
            assert results[3] == calm

    asyncio.run(main())


def test_a_failing_decode_step_fails_only_its_request(tiny_model):
    """A batched native decode step that one sequence breaks (a token past the embedding in its output,
    put there below the engine) is rerun request by request: the others keep their greedy tokens."""
    opts = make_options({"max_num_sequence": 8, "reuse_kv": False})
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[3, 17, 99, 5], [3, 200, 201, 9, 11], list(range(5, 40))]

    def run(break_one: bool):
        core = build_engine(tiny_model, opts, "cpu")
        assert core.runner.fused is not None  # the native decode step is what is under test
        reqs = [Request(str(i), p, params) for i, p in enumerate(prompts)]
        for r in reqs:
            core.add(r)
        steps = 0
        while core.has_work:
            core.step()
            steps += 1
            if break_one and steps == 3:
                reqs[1].sequences[0].output_ids[-1] = 10**6
        return reqs

    alone = [r.sequences[0].output_ids for r in run(False)]
    reqs = run(True)
    assert reqs[1].error is not None and reqs[1].sequences[0].finish_reason == "abort"
    assert [r.error for r in (reqs[0], reqs[2])] == [None, None]
    assert [reqs[0].sequences[0].output_ids, reqs[2].sequences[0].output_ids] == [alone[0], alone[2]]

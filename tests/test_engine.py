"""The Engine API on a tiny model: batching is invisible, KV reuse, sampling options, errors."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from edgellm import AsyncEngine, Engine
from edgellm.errors import BadRequestError, ContextWindowError, EngineTerminatedError
from edgellm.models.loader import load_model
from tests.helpers import forward, kv_pool

PROMPTS = [
    "Hello there!", "What is the capital of France?", "def add(a, b):", "小明比小红年龄大",
    "Tell me a story about a dragon and a knight who became friends.", "1 2 3 4 5",
    "Emoji time 👍🏽", "The quick brown fox jumps over the lazy dog. " * 3,
]


def msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = Engine(str(tiny_model), max_num_sequence=8, prefill_chunk_size=32)
    yield eng
    eng.terminate()


def token_ids(r) -> list[int]:
    return [int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens]


def greedy_chat(eng, text: str, n: int = 24) -> tuple[str, list]:
    r = eng.chat.completions.create(messages=msgs(text), temperature=0, max_tokens=n, logprobs=True)
    return r.choices[0].message.content, [t.token for t in r.choices[0].logprobs.content]


def test_matches_step_by_step_reference(engine, tiny_model):
    """The engine's greedy tokens equal a plain one-sequence loop over the model."""
    prompt = engine.chat_prompt(msgs(PROMPTS[1]))
    model, cfg = load_model(tiny_model)
    pool, slot = kv_pool(model, 512)
    ref, pos = [], len(prompt)
    with torch.inference_mode():
        logits = forward(model, pool, slot, torch.tensor(prompt), 0, last_only=True)
        for _ in range(12):
            ref.append(int(logits[-1].argmax()))
            logits = forward(model, pool, slot, torch.tensor(ref[-1:]), pos)
            pos += 1
    r = engine.completions.create(prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True, logprobs=0,
                                  return_tokens_as_token_ids=True)
    assert token_ids(r) == ref


def test_batching_is_invisible_threads(engine):
    alone = [greedy_chat(engine, p) for p in PROMPTS]
    results: dict[int, tuple] = {}

    def worker(i: int) -> None:
        results[i] = greedy_chat(engine, PROMPTS[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(PROMPTS))] == alone
    assert engine.metrics()["requests_running"] == 0


def test_batching_is_invisible_async_long_prompts(tiny_model):
    """8 concurrent requests with prompts longer than prefill_chunk_size (32)."""
    long_prompts = [(p + ' ') * 3 for p in PROMPTS[:-1]] + ['The quick brown fox jumps. ' * 5]

    async def run() -> tuple[list, list]:
        async with AsyncEngine(str(tiny_model), max_num_sequence=8, prefill_chunk_size=32) as eng:
            async def one(p):
                r = await eng.chat.completions.create(messages=msgs(p), temperature=0, max_tokens=16)
                return r.choices[0].message.content
            alone = [await one(p) for p in long_prompts]
            together = await asyncio.gather(*(one(p) for p in long_prompts))
            assert eng.metrics()["requests_running"] == 0
            return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone
    assert any(alone)


def test_async_stream_equals_non_stream(tiny_model):
    async def run():
        async with AsyncEngine(str(tiny_model)) as eng:
            full = await eng.chat.completions.create(messages=msgs("Hello there!"), temperature=0, max_tokens=20)
            stream = await eng.chat.completions.create(messages=msgs("Hello there!"), temperature=0, max_tokens=20,
                                                       stream=True, stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            return full, chunks

    full, chunks = asyncio.run(run())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"


def test_reuse_kv_multi_turn(tiny_model):
    def chat(reuse: bool):
        with Engine(str(tiny_model), reuse_kv=reuse) as eng:
            history, replies, cached = [], [], []
            for turn in ["Hello there!", "Tell me more about it.", "And then?"]:
                history.append({"role": "user", "content": turn})
                r = eng.chat.completions.create(messages=history, temperature=0, max_tokens=12)
                reply = r.choices[0].message.content
                history.append({"role": "assistant", "content": reply})
                replies.append(reply)
                cached.append(r.usage.prompt_tokens_details.cached_tokens)
            return replies, cached

    with_reuse, cached = chat(True)
    without, no_cache = chat(False)
    assert with_reuse == without
    assert cached[1] > 0 and cached[2] > 0
    assert no_cache == [0, 0, 0]


def test_seeded_sampling_reproducible_and_batch_independent(engine):
    kw = dict(messages=msgs("Tell me a story"), temperature=2.0, top_p=0.95, max_tokens=16, seed=1234,
              ignore_eos=True)
    a = engine.chat.completions.create(**kw).choices[0].message.content
    b = engine.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(engine.chat.completions.create(**kw)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.choices[0].message.content for r in out} == {a}
    c = engine.chat.completions.create(**{**kw, "seed": 99}).choices[0].message.content
    d = engine.chat.completions.create(**{**kw, "seed": 100}).choices[0].message.content
    assert len({a, c, d}) > 1


def test_top_k_1_equals_greedy(engine):
    g = engine.chat.completions.create(messages=msgs("Hello"), temperature=0, max_tokens=16)
    k = engine.chat.completions.create(messages=msgs("Hello"), temperature=1.5, top_k=1, max_tokens=16, seed=5)
    assert g.choices[0].message.content == k.choices[0].message.content


def test_logit_bias_bans_token(engine):
    prompt = engine.chat_prompt(msgs("Hello"))
    kw = dict(prompt=prompt, temperature=0, max_tokens=8, logprobs=0, ignore_eos=True,
              return_tokens_as_token_ids=True)
    first = token_ids(engine.completions.create(**kw))[0]
    assert first not in token_ids(engine.completions.create(**kw, logit_bias={first: -100}))


def test_stop_string_spanning_tokens(engine):
    prompt = engine.chat_prompt(msgs("Tell me a story"))
    full = engine.completions.create(prompt=prompt, temperature=0, max_tokens=24, ignore_eos=True,
                                     logprobs=0)
    toks = full.choices[0].logprobs.tokens
    text = full.choices[0].text
    # a stop string made of the end of token 3 and the start of token 4 (both non-empty)
    i = next(i for i in range(3, len(toks) - 1) if len(toks[i]) >= 1 and len(toks[i + 1]) >= 1
             and toks[i].strip() and toks[i + 1].strip())
    offset = sum(len(t) for t in toks[:i])
    stop = text[offset + len(toks[i]) - 1: offset + len(toks[i]) + 1]
    cut = engine.completions.create(prompt=prompt, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    assert stop not in cut.choices[0].text


def test_n_choices(engine):
    r = engine.chat.completions.create(messages=msgs("Hello"), n=3, temperature=1.0, max_tokens=8, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    g = engine.chat.completions.create(messages=msgs("Hello"), n=3, temperature=0, max_tokens=8)
    assert len({c.message.content for c in g.choices}) == 1


def test_logprobs_equal_log_softmax(engine, tiny_model):
    prompt = engine.chat_prompt(msgs("Hello"))
    r = engine.completions.create(prompt=prompt, temperature=0, max_tokens=1, logprobs=5,
                                  return_tokens_as_token_ids=True)
    model, _ = load_model(tiny_model)
    pool, slot = kv_pool(model, 512)
    with torch.inference_mode():
        logits = forward(model, pool, slot, torch.tensor(prompt), 0, last_only=True)[-1]
    lp = torch.log_softmax(logits, -1)
    top = r.choices[0].logprobs.top_logprobs[0]
    vals, ids = lp.topk(5)
    assert len(top) == 5
    for tid, v in zip(ids.tolist(), vals.tolist()):
        assert abs(top[f"token_id:{tid}"] - v) < 1e-4
    assert abs(r.choices[0].logprobs.token_logprobs[0] - vals[0].item()) < 1e-4


def test_length_and_window(engine):
    r = engine.chat.completions.create(messages=msgs("Hello"), temperature=0, max_tokens=3, ignore_eos=True)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    prompt = engine.chat_prompt(msgs("hi"))
    r = engine.completions.create(prompt=prompt, temperature=0, max_tokens=2000, ignore_eos=True)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == engine.context_window


@pytest.mark.parametrize("kwargs, param", [
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
    (dict(messages=msgs("hi"), temperature=-0.5), "temperature"),
    (dict(messages=msgs("hi"), top_p=0), "top_p"),
    (dict(messages=msgs("hi"), top_p=1.5), "top_p"),
    (dict(messages=msgs("hi"), n=0), "n"),
    (dict(messages=msgs("hi"), max_tokens=0), "max_tokens"),
    (dict(messages=msgs("hi"), max_tokens=-3), "max_tokens"),
    (dict(messages=msgs("hi"), logit_bias={"5": 500}), "logit_bias"),
])
def test_bad_requests_are_clear_and_harmless(engine, kwargs, param):
    with pytest.raises(BadRequestError) as e:
        engine.chat.completions.create(**kwargs)
    assert param in str(e.value) or e.value.param == param
    ok = engine.chat.completions.create(messages=msgs("Hello"), temperature=0, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_prompt_over_window_refused_with_both_numbers(engine):
    long = "The quick brown fox jumps over the lazy dog. " * 200
    with pytest.raises(ContextWindowError) as e:
        engine.chat.completions.create(messages=msgs(long), max_tokens=4)
    assert str(engine.context_window) in str(e.value) and str(e.value.prompt_tokens) in str(e.value)
    assert engine.chat.completions.create(messages=msgs("Hello"), max_tokens=2).choices


def test_request_after_terminate(tiny_model):
    eng = Engine(str(tiny_model))
    eng.terminate()
    with pytest.raises(EngineTerminatedError):
        eng.chat.completions.create(messages=msgs("hi"))


def test_stream_break_frees_kv(engine):
    stream = engine.chat.completions.create(messages=msgs("Tell me a story"), temperature=0, max_tokens=200,
                                            ignore_eos=True, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    import time

    for _ in range(100):
        m = engine.metrics()
        if m["requests_running"] == 0 and m["kv_cache_sequences"] == 0:
            break
        time.sleep(0.02)
    assert m["requests_running"] == 0 and m["kv_cache_sequences"] == 0
    assert m["requests_cancelled"] >= 1


def test_json_response_format(engine):
    import json

    r = engine.chat.completions.create(messages=msgs("Give me JSON"), temperature=0, max_tokens=64,
                                       response_format={"type": "json_object"})
    c = r.choices[0]
    assert c.message.content.lstrip()[:1] in ("{", "[")  # any JSON, maybe cut by max_tokens
    if c.finish_reason == "stop":
        json.loads(c.message.content)
    # A schema whose language is finite (xgrammar makes a top-level enum one literal per value, with no
    # free whitespace): the grammar must complete within these tokens, then only a stop token is allowed.
    people = [{"name": "Ann", "age": 30}, {"name": "Bob", "age": 41}]
    schema = {"enum": people}
    r = engine.chat.completions.create(messages=msgs("A person"), temperature=0, max_tokens=120,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "p", "schema": schema}})
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")
    assert r.choices[0].finish_reason == "stop"
    obj = json.loads(text)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)
    assert obj in people


def test_seed_001_snippet_runs_with_only_the_import_changed(tiny_model):
    from edgellm import AsyncMLCEngine, MLCEngine

    assert MLCEngine is Engine and AsyncMLCEngine is AsyncEngine
    engine = MLCEngine(model=str(tiny_model))
    r = engine.chat.completions.create(messages=[{"role": "user", "content": "hello"}])
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    engine.terminate()


def test_kv_cache_dtype_follows_the_model_and_int8_works(tiny_model, tiny_model_q4):
    """auto: float16 keys/values for a model stored in float16 (as MLC-LLM), float32 otherwise; int8
    (kv_cache_dtype=int8 or MNN's quant_qkv) holds a quarter of float32's bytes and still serves."""
    from edgellm.errors import UserError

    cases = ((tiny_model, {}, torch.float32), (tiny_model_q4, {}, torch.float16),
             (tiny_model_q4, {"kv_cache_dtype": "float32"}, torch.float32),
             (tiny_model_q4, {"quant_qkv": 0}, torch.float16),
             (tiny_model_q4, {"quant_qkv": 1}, torch.int8), (tiny_model_q4, {"kv_cache_dtype": "int8"}, torch.int8))
    per_token = {}
    for model, opts, want in cases:
        with Engine(str(model), max_num_sequence=1, **opts) as eng:
            assert eng.pool.dtype == want
            per_token[want] = eng.pool.bytes_per_token
            r = eng.chat.completions.create(messages=msgs("Hello"), temperature=0, max_tokens=4, ignore_eos=True)
            assert r.usage.completion_tokens == 4
    assert per_token[torch.int8] < per_token[torch.float32] / 3
    with pytest.raises(UserError, match="kv_cache_dtype"):
        Engine(str(tiny_model_q4), kv_cache_dtype="int4")


@pytest.mark.parametrize("windows", [[None, None, None], [None, 6, None]])
def test_kv_growth_keeps_what_was_computed_and_its_budget(windows):
    """A sequence's KV regions grow (all layers in one tensor without windows, layer by layer with them):
    the computed positions survive every growth, the pool's byte count follows, and freeing returns it."""
    from edgellm.engine.kv_pool import KVPool

    pool = KVPool(3, 2, 4, windows, 4096, torch.float32)
    slot = pool.new_slot()
    kv = pool.seqs[slot]
    written = 0
    for end in (5, 17, 18, 40, 41, 100, 300):
        assert pool.reserve(slot, written, end)
        for layer in range(3):
            keys = torch.arange(written, end, dtype=torch.float32)[None, :, None].expand(2, -1, 4)
            i0 = written - kv.base[layer]
            kv.k[layer][:, i0:i0 + end - written] = keys
            kv.v[layer][:, i0:i0 + end - written] = -keys
        written = end
        pool.set_length(slot, end)
        for layer in range(3):
            first = kv.base[layer]  # a windowed layer keeps only its last positions
            assert first == 0 or windows[layer] is not None
            got = kv.k[layer][0, :end - first, 0]
            assert torch.equal(got, torch.arange(first, end, dtype=torch.float32)), (end, layer)
            assert torch.equal(kv.v[layer][1, :end - first, 3], -got)
        assert pool.used_bytes == kv.nbytes
        assert (kv.k_all is not None) == all(w is None for w in windows)
    pool.free(slot)
    assert pool.used_bytes == 0


def test_kv_room_grows_toward_the_expected_length_within_the_budget():
    """A sequence that may reach `expect` positions (prompt + max_tokens) gets that room at once when the
    budget holds it (a decode then never stops to copy its cache), never more than 4x what it needs, and
    just what it needs when the budget is tight."""
    from edgellm.engine.kv_pool import KVPool

    pool = KVPool(3, 2, 4, [None] * 3, 4096, torch.float32)
    slot = pool.new_slot()
    assert pool.reserve(slot, 0, 50, expect=50 + 128)
    cap = pool.seqs[slot].k[0].shape[1]
    assert cap >= 178
    for end in range(51, 179):  # decoding to the expected length: no regrowth
        assert pool.reserve(slot, end - 1, end, expect=178)
        assert pool.seqs[slot].k[0].shape[1] == cap
    other = pool.new_slot()
    assert pool.reserve(other, 0, 40, expect=40 + 100_000)
    assert 160 <= pool.seqs[other].k[0].shape[1] <= 4 * 40 + 16
    tight = KVPool(3, 2, 4, [None] * 3, 48, torch.float32)
    slot = tight.new_slot()
    assert tight.reserve(slot, 0, 40, expect=168)
    assert 40 <= tight.seqs[slot].k[0].shape[1] <= 48
    assert not tight.reserve(slot, 40, 60, expect=168)

"""Speculative decoding (ngram prompt lookup and a small draft model): the outputs are the target's own.

Greedy: token-for-token identical to decoding without it (alone, batched with plain requests, across
KV cache dtypes). Sampling: rejection sampling keeps the target distribution (chi-square tests).
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections import Counter

import pytest
import torch

from edgellm import Engine
from edgellm.engine.build import build_engine
from edgellm.engine.options import make_options
from edgellm.engine.request import Request, SamplingParams
from edgellm.engine.sampler import Sampler
from edgellm.engine.speculative import SpecState, Speculator, ngram_draft
from edgellm.errors import UserError
from edgellm.serve.metrics import render_prometheus
from tests.conftest import _tiny_llama
from tests.helpers import convert, run_logits

PROMPTS = [
    "The capital of France is Paris. The capital of France is",
    "Hello! How can I help you today? Hello! How can I",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):",
    "1 2 3 4 5 1 2 3 4 5 1 2 3",
    "小明比小红年龄大，小红比小华年龄大。",
    "Emoji: 👍🏽 😀 🎉 and numbers 0123456789",
    "Tell me a story about a dragon and a knight who became friends.",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
    """A 1-layer random llama with the same tokenizer as `tiny_model` (a draft that is mostly wrong)."""
    hf = _tiny_llama(tmp_path_factory.mktemp("draft") / "hf", seed=1, layers=1)
    return convert(hf, tmp_path_factory.mktemp("draft_q0") / "model", "q0f32", conv_template="chatml",
                   prefill_chunk_size=32)


def complete(eng: Engine, prompt: str, **kw):
    kw = {"max_tokens": 32, "temperature": 0, "ignore_eos": True, **kw}
    return eng.completions.create(prompt=prompt, **kw)


def outputs(eng: Engine, **kw) -> list[tuple[str, str]]:
    rs = [complete(eng, p, **kw) for p in PROMPTS]
    return [(r.choices[0].text, r.choices[0].finish_reason) for r in rs]


def drafted(eng: Engine) -> tuple[int, int]:
    m = eng.metrics()
    return m["spec_draft_tokens_total"], m["spec_accepted_tokens_total"]


@pytest.mark.parametrize("kv", ["float32", "float16", "int8"])
def test_greedy_is_identical_with_ngram_and_small_draft(tiny_model, tiny_model_q4, tiny_draft, kv):
    with Engine(str(tiny_model), kv_cache_dtype=kv) as eng:
        plain = outputs(eng)
    modes = [("ngram", {}), ("small_draft", {"additional_models": str(tiny_model_q4)}),
             ("small_draft", {"additional_models": [str(tiny_draft)]})]
    for mode, extra in modes:
        with Engine(str(tiny_model), kv_cache_dtype=kv, speculative_mode=mode, **extra) as eng:
            assert outputs(eng) == plain, (mode, extra)
            n_draft, n_acc = drafted(eng)
            assert n_draft > 0
            if extra.get("additional_models") != [str(tiny_draft)]:  # the quantized twin and prompt lookup hit
                assert n_acc > 0, (mode, n_draft)


@pytest.mark.parametrize("mode", ["ngram", "small_draft"])
def test_concurrent_mix_of_speculative_and_plain(tiny_model, tiny_model_q4, mode):
    with Engine(str(tiny_model)) as eng:
        plain = outputs(eng)
    extra = {"additional_models": str(tiny_model_q4)} if mode == "small_draft" else {}
    with Engine(str(tiny_model), max_num_sequence=4, speculative_mode=mode, **extra) as eng:
        results: dict[int, tuple] = {}

        def run(i: int) -> None:
            r = complete(eng, PROMPTS[i], speculative=i % 2 == 0)
            results[i] = ((r.choices[0].text, r.choices[0].finish_reason), r.usage.extra or {})

        for batch in (range(0, 4), range(4, 8)):
            threads = [threading.Thread(target=run, args=(i,)) for i in batch]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert [results[i][0] for i in range(8)] == plain
        assert all("draft_tokens" not in results[i][1] for i in range(1, 8, 2))  # speculative=False
        assert sum(results[i][1].get("draft_tokens", 0) for i in range(0, 8, 2)) > 0


def test_stop_conditions_inside_an_accepted_run(tiny_model):
    """max_tokens, stop token ids and stop strings cut a multi-token run exactly where plain decoding stops."""
    prompt = "1 2 3 4 5 1 2 3 4 5 1 2 3 4 5 1 2 3"
    with Engine(str(tiny_model)) as eng:
        ref = complete(eng, prompt, max_tokens=40, logprobs=0, return_tokens_as_token_ids=True)
    ids = [int(t.split(":")[1]) for t in ref.choices[0].logprobs.tokens]
    text = ref.choices[0].text
    cases = [{"max_tokens": 7}, {"max_tokens": 13}, {"stop_token_ids": [ids[9]]}, {"stop": [text[12:15]]}]
    with Engine(str(tiny_model)) as eng:
        want = [complete(eng, prompt, **{"max_tokens": 40, **c}) for c in cases]
    with Engine(str(tiny_model), speculative_mode="ngram", spec_draft_length=6) as eng:
        got = [complete(eng, prompt, **{"max_tokens": 40, **c}) for c in cases]
        assert drafted(eng)[1] > 0
    for c, w, g in zip(cases, want, got):
        assert (g.choices[0].text, g.choices[0].finish_reason) == (w.choices[0].text, w.choices[0].finish_reason), c
        assert g.usage.completion_tokens == w.usage.completion_tokens, c


def test_usage_metrics_logprobs_and_unspeculated_requests(tiny_model):
    prompt = PROMPTS[3]
    with Engine(str(tiny_model)) as eng:
        ref = complete(eng, prompt, logprobs=2)
        pen = complete(eng, prompt, repetition_penalty=1.3)
    with Engine(str(tiny_model), speculative_mode="ngram") as eng:
        r = complete(eng, prompt, logprobs=2)
        assert r.choices[0].text == ref.choices[0].text
        for a, b in zip(r.choices[0].logprobs.token_logprobs, ref.choices[0].logprobs.token_logprobs):
            assert a == pytest.approx(b, abs=1e-4)
        assert r.choices[0].logprobs.tokens == ref.choices[0].logprobs.tokens
        assert r.choices[0].logprobs.top_logprobs[5].keys() == ref.choices[0].logprobs.top_logprobs[5].keys()
        u = r.usage.extra
        assert u["draft_tokens"] >= u["accepted_draft_tokens"] > 0
        assert u["acceptance_rate"] == pytest.approx(u["accepted_draft_tokens"] / u["draft_tokens"])
        # penalties depend on every earlier token: such requests are not speculated, and stay exact
        p = complete(eng, prompt, repetition_penalty=1.3)
        assert p.choices[0].text == pen.choices[0].text and "draft_tokens" not in (p.usage.extra or {})
        m = eng.metrics()
        assert m["spec_draft_tokens_total"] == u["draft_tokens"]
        assert m["spec_acceptance_rate"] == pytest.approx(u["acceptance_rate"])
        text = render_prometheus(m)
        assert f"edgellm_spec_accepted_tokens_total {u['accepted_draft_tokens']:.0f}" in text


def test_ngram_draft():
    assert ngram_draft([1, 2, 3, 4, 9, 2, 3], 2) == [4, 9]  # the 2-gram (2, 3) recurs
    assert ngram_draft([5, 1, 7, 1, 8, 6, 1], 3) == [8, 6, 1]  # the latest occurrence of (1,)
    assert ngram_draft([1, 2, 3], 4) == []


# ---- sampling keeps the target distribution ------------------------------------------------------
def chi_square_ok(counts: Counter, probs: dict, n: int) -> tuple[float, float]:
    """(statistic, critical value at p = 0.001) with cells of expected count < 5 pooled."""
    stat, df, pool_obs, pool_exp = 0.0, -1, 0, 0.0
    for key, p in probs.items():
        e = p * n
        if e < 5:
            pool_obs, pool_exp = pool_obs + counts.get(key, 0), pool_exp + e
            continue
        stat, df = stat + (counts.get(key, 0) - e) ** 2 / e, df + 1
    outside = n - sum(counts.get(k, 0) for k in probs)
    pool_obs, pool_exp = pool_obs + outside, pool_exp + max(n - sum(probs.values()) * n, 0.0)
    if pool_exp > 0:
        stat, df = stat + (pool_obs - pool_exp) ** 2 / pool_exp, df + 1
    z = 3.09  # Wilson-Hilferty approximation of the chi-square quantile
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


class _Seq:
    def __init__(self, params, seed):
        self.params, self.generator, self.spec = params, torch.Generator().manual_seed(seed), SpecState(k=3)


@pytest.mark.parametrize("draft_kind", ["point_mass", "model"])
def test_rejection_sampling_keeps_the_target_distribution(draft_kind):
    """The first verified token's histogram over many seeded draws equals the target's probabilities."""
    torch.manual_seed(0)
    params = SamplingParams(temperature=1.0, top_k=6)
    target = torch.randn(3, 32) * 2  # logits of the 1 + 2 verified rows
    p0 = Sampler.probs(target[0], params)
    p0 = p0 / p0.sum()
    q = torch.softmax(torch.randn(32) * 2, -1)
    draft_tok = int(p0.argmax())  # a draft the target likes: acceptances and rejections both happen
    spec = Speculator("ngram" if draft_kind == "point_mass" else "small_draft", 3)
    counts: Counter = Counter()
    n = 4000
    for seed in range(n):
        seq = _Seq(params, seed)
        if draft_kind == "model":
            d0 = int(torch.multinomial(q, 1, generator=seq.generator))
            seq.spec.q = [q, q]
            draft = [d0, 3]
        else:
            draft = [draft_tok, 3]
        tokens, _ = spec.verify(seq, draft, target)
        counts[tokens[0]] += 1
    stat, crit = chi_square_ok(counts, {i: float(p0[i]) for i in range(32) if p0[i] > 0}, n)
    assert stat < crit, (stat, crit)


@pytest.mark.slow
def test_speculative_sampling_of_a_tiny_model_keeps_its_distribution(tiny_model, tiny_model_q4):
    """Joint histogram of the first two sampled tokens (the second is verified) vs the target's softmax."""
    prompt = [10, 50, 70, 90, 33, 21]
    params = dict(temperature=1.0, top_k=3)
    sp = SamplingParams(**params)
    first = Sampler.probs(run_logits(tiny_model, torch.tensor(prompt))[-1], sp)
    first = first / first.sum()
    joint = {}
    for t1 in first.nonzero().flatten().tolist():
        second = Sampler.probs(run_logits(tiny_model, torch.tensor(prompt + [t1]))[-1], sp)
        second = second / second.sum()
        for t2 in second.nonzero().flatten().tolist():
            joint[(t1, t2)] = float(first[t1] * second[t2])
    n = 800
    for draft in (tiny_model_q4,):  # the quantized twin: drafts both accepted and rejected
        opts = make_options({"speculative_mode": "small_draft", "additional_models": str(draft),
                             "max_num_sequence": 32, "spec_draft_length": 2})
        core = build_engine(tiny_model, opts)
        reqs = [Request(f"r{i}", prompt, SamplingParams(**params, seed=i, max_tokens=4)) for i in range(n)]
        for r in reqs:
            core.add(r)
        while core.has_work:
            core.step()
        counts = Counter(tuple(r.sequences[0].output_ids[:2]) for r in reqs)
        c = core.metrics.counters
        assert c["spec_draft_tokens_total"] > c["spec_accepted_tokens_total"] > 0
        stat, crit = chi_square_ok(counts, joint, n)
        assert stat < crit, (draft.name, stat, crit)
        again = Request("again", prompt, SamplingParams(**params, seed=7, max_tokens=4))
        core.add(again)
        while core.has_work:
            core.step()
        assert again.sequences[0].output_ids == reqs[7].sequences[0].output_ids  # seeded: reproducible


# ---- bad configurations get one clear error -----------------------------------------------------
def test_bad_speculative_options_are_clear(tiny_model, tiny_draft, tmp_path):
    with pytest.raises(UserError, match="speculative_mode must be one of"):
        make_options({"speculative_mode": "eagle9"})
    with pytest.raises(UserError, match="needs a draft model"):
        make_options({"speculative_mode": "small_draft"})
    with pytest.raises(UserError, match="spec_draft_length must be positive"):
        make_options({"speculative_mode": "ngram", "spec_draft_length": "0"})
    with pytest.raises(UserError, match="no such file"):
        Engine(str(tiny_model), speculative_mode="small_draft", additional_models=str(tmp_path / "nope"))
    other = tmp_path / "other_vocab"
    shutil.copytree(tiny_draft, other)
    cfg = json.loads((other / "mlc-chat-config.json").read_text())
    cfg["vocab_size"] = 500
    (other / "mlc-chat-config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="vocabulary of 500 tokens"):
        Engine(str(tiny_model), speculative_mode="small_draft", additional_models=str(other))
    renamed = tmp_path / "other_tokenizer"
    shutil.copytree(tiny_draft, renamed)
    tok = json.loads((renamed / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (renamed / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match="different tokenizer"):
        Engine(str(tiny_model), speculative_mode="small_draft", additional_models=str(renamed))


def test_cli_flags_reach_the_engine(tiny_model):
    import argparse

    from edgellm.cli import chat, serve
    from edgellm.engine.options import speculative_overrides

    for mod in (chat, serve):
        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        args = p.parse_args([str(tiny_model), "--speculative-mode", "small_draft", "--additional-models", "a", "b"])
        assert speculative_overrides(args) == {"speculative_mode": "small_draft", "additional_models": ["a", "b"]}
        with pytest.raises(SystemExit):
            p.parse_args([str(tiny_model), "--speculative-mode", "lookahead"])


@pytest.mark.slow
def test_smollm2_ngram_answers_paris_like_plain_greedy(smollm2_q4):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    texts = []
    for opts in ({}, {"speculative_mode": "ngram"}):
        with Engine(str(smollm2_q4), **opts) as eng:
            r = eng.chat.completions.create(messages=msgs, temperature=0, max_tokens=48)
            texts.append(r.choices[0].message.content)
    assert "Paris" in texts[1]
    assert texts[1] == texts[0]

"""Checks of MLC-LLM's tests/python/serve/server/test_server.py, re-stated against `edgellm serve`.

Adapted: MLC's error shape ({"object": "error"} / 422 "detail") is checked as the OpenAI error
object (4xx); MLC sends the role in every chat delta, OpenAI (and we) only in the first; its
top-logprobs limits (5) are ours (20); `owned_by` is not checked; its debug endpoint is MLC's own.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import error, is_json_prefix, post, sse

PROMPT = "What is the meaning of life?"
CHATS = [
    [{"role": "user", "content": "Hello! Our project is MLC LLM."}],
    [{"role": "user", "content": "Hello! Our project is MLC LLM."},
     {"role": "assistant", "content": "Hello! It's great to hear about your project, MLC LLM."},
     {"role": "user", "content": "What is the name of our project?"}],
    [{"role": "system", "content": "You are a helpful assistant. You always end your response with an emoji."},
     {"role": "user", "content": "Hello! Our project is MLC LLM."}],
]
STREAM = pytest.mark.parametrize("stream", [False, True])


def completion(base, model, stream, n=1, is_chat=False, finish=("stop", "length"), tokens=None, json_out=False,
               **body):
    """A (streamed or whole) request checked as MLC's check_openai_*_response does; the choices' texts."""
    path = "/v1/chat/completions" if is_chat else "/v1/completions"
    body = {"model": model, "stream": stream, **({"n": n} if n > 1 else {}), **body}
    obj = "chat.completion" if is_chat else "text_completion"
    texts, reasons = [""] * n, [None] * n
    if stream:
        events = sse(base, path, body)
        for ev in events:
            assert ev["model"] == model and ev["object"] == (obj + ".chunk" if is_chat else obj)
            for c in ev["choices"]:
                assert "finish_reason" in c
                texts[c["index"]] += (c["delta"].get("content") or "") if is_chat else c["text"]
                if c["finish_reason"] is not None:
                    assert reasons[c["index"]] is None
                    reasons[c["index"]] = c["finish_reason"]
            if ev.get("usage"):
                u = ev["usage"]
                assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
                if tokens is not None:
                    assert u["completion_tokens"] == tokens
    else:
        r = post(base, path, body)
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["model"] == model and data["object"] == obj and len(data["choices"]) == n
        for c in data["choices"]:
            if is_chat:
                assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
            texts[c["index"]] = c["message"]["content"] if is_chat else c["text"]
            reasons[c["index"]] = c["finish_reason"]
        u = data["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["prompt_tokens"] > 0
        if tokens is not None:
            assert u["completion_tokens"] == tokens * n
    assert all(r in finish for r in reasons), reasons
    if json_out:
        for t, r in zip(texts, reasons):
            assert is_json_prefix(t), t
            try:
                json.loads(t)
            except json.JSONDecodeError:
                assert r == "length"
    return texts


def test_openai_v1_models(base, model):
    data = httpx.get(base + "/v1/models", timeout=30).json()
    assert data["object"] == "list" and len(data["data"]) >= 1
    assert data["data"][0]["id"] == model and data["data"][0]["object"] == "model"


@STREAM
def test_openai_v1_completions(base, model, stream):
    completion(base, model, stream, prompt=PROMPT, max_tokens=16, temperature=0)


@STREAM
def test_openai_v1_completions_openai_package(client, model, stream):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, stream=stream, temperature=0)
    if stream:
        chunks = list(r)
        assert chunks and all(c.model == model for c in chunks)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    else:
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 16


@STREAM
def test_openai_v1_completions_echo(base, model, stream):
    (text,) = completion(base, model, stream, prompt=PROMPT, max_tokens=16, echo=True, temperature=0)
    assert text.startswith(PROMPT)


@STREAM
def test_openai_v1_completions_suffix(base, model, stream):
    r = post(base, "/v1/completions", {"model": model, "prompt": PROMPT, "suffix": " Yes!", "max_tokens": 8,
                                       "stream": stream})
    if r.status_code == 400 and "suffix" in r.json()["error"]["message"]:
        pytest.skip("lacking: `suffix` (fill-in-the-middle) is refused with a 400 naming it")
    (text,) = completion(base, model, stream, prompt=PROMPT, suffix=" Yes!", max_tokens=8)
    assert text.endswith(" Yes!")


@STREAM
def test_openai_v1_completions_stop_str(base, model, stream):
    stop = ["It", "is", "The", "the", ".", ","]
    (text,) = completion(base, model, stream, prompt=PROMPT, max_tokens=64, stop=stop, temperature=0)
    assert not any(s in text for s in stop)


@STREAM
def test_openai_v1_completions_temperature(base, model, stream):
    completion(base, model, stream, prompt=PROMPT, max_tokens=16, temperature=0.0)


@STREAM
def test_openai_v1_completions_json(base, model, stream):
    completion(base, model, stream, prompt="Give me a JSON object.", max_tokens=64, json_out=True,
               response_format={"type": "json_object"})


@STREAM
def test_openai_v1_completions_json_schema(base, model, stream):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    completion(base, model, stream, prompt="A person as JSON:", max_tokens=96, json_out=True,
               response_format={"type": "json_object", "schema": schema})


@STREAM
def test_openai_v1_completions_logit_bias(base, model, stream):
    # the bias must be able to force a token: every step picks token 1234
    (text,) = completion(base, model, stream, prompt=PROMPT, max_tokens=4, logit_bias={"1234": 100.0},
                         temperature=0, tokens=4)
    tok = httpx.post(base + "/detokenize", json={"tokens": [1234]}, timeout=30).json()["content"]
    assert text == tok * 4


@STREAM
def test_openai_v1_completions_presence_frequency_penalty(base, model, stream):
    completion(base, model, stream, prompt=PROMPT, max_tokens=16, frequency_penalty=2.0, presence_penalty=2.0)


def test_openai_v1_completions_seed(base, model):
    body = dict(prompt=PROMPT, max_tokens=24, temperature=1.2, seed=233)
    assert completion(base, model, False, **body) == completion(base, model, False, **body)


@STREAM
def test_openai_v1_completions_prompt_overlong(base, model, stream):
    window = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["max_model_len"]
    r = post(base, "/v1/completions", {"model": model, "prompt": [5] * (window + 16), "max_tokens": 4,
                                       "stream": stream})
    assert str(window) in error(r)["message"]


@STREAM
def test_openai_v1_completions_invalid_logprobs(base, model, stream):
    r = post(base, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 4, "stream": stream,
                                       "logprobs": 21})
    assert error(r)["param"] == "logprobs"


@STREAM
def test_openai_v1_chat_completions_invalid_logprobs(base, model, stream):
    body = {"model": model, "messages": CHATS[0], "max_tokens": 4, "stream": stream, "logprobs": False,
            "top_logprobs": 3}
    assert "logprobs" in error(post(base, "/v1/chat/completions", body))["message"]
    body.update(logprobs=True, top_logprobs=21)
    assert error(post(base, "/v1/chat/completions", body))["param"] == "top_logprobs"


def test_openai_v1_completions_unsupported_args(base, model):
    r = post(base, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 4, "best_of": 2})
    assert "best_of" in error(r)["message"]


def test_openai_v1_completions_request_cancellation(base, model):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(base + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 2048,
                                                    "ignore_eos": True}, timeout=1)
    data = httpx.get(base + "/v1/models", timeout=30).json()
    assert data["object"] == "list" and data["data"][0]["id"] == model
    # and (beyond MLC) the abandoned request stops running
    deadline = time.time() + 20
    while time.time() < deadline:
        running = [ln for ln in httpx.get(base + "/metrics", timeout=30).text.splitlines()
                   if ln.startswith("edgellm_requests_running ")]
        if running and float(running[0].split()[1]) == 0:
            break
        time.sleep(0.2)
    assert float(running[0].split()[1]) == 0


@STREAM
@pytest.mark.parametrize("messages", CHATS, ids=["one", "multi", "system"])
def test_openai_v1_chat_completions(base, model, stream, messages):
    completion(base, model, stream, is_chat=True, messages=messages, max_tokens=24, temperature=0)


@STREAM
@pytest.mark.parametrize("messages", CHATS, ids=["one", "multi", "system"])
def test_openai_v1_chat_completions_n(base, model, stream, messages):
    completion(base, model, stream, n=3, is_chat=True, messages=messages, max_tokens=16, temperature=0.8)


@STREAM
@pytest.mark.parametrize("messages", CHATS, ids=["one", "multi", "system"])
def test_openai_v1_chat_completions_openai_package(client, model, stream, messages):
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=16, stream=stream)
    if stream:
        chunks = [c for c in r if c.choices]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    else:
        assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")


@STREAM
def test_openai_v1_chat_completions_max_tokens(base, model, stream):
    completion(base, model, stream, is_chat=True, messages=CHATS[0], max_tokens=16, ignore_eos=True,
               finish=("length",), tokens=16 if not stream else None)


@STREAM
def test_openai_v1_chat_completions_json(base, model, stream):
    completion(base, model, stream, is_chat=True, max_tokens=64, json_out=True,
               messages=[{"role": "user", "content": "Describe a cat in JSON."}],
               response_format={"type": "json_object"})


@STREAM
def test_openai_v1_chat_completions_json_schema(base, model, stream):
    schema = {"type": "object", "properties": {"size": {"type": "integer"}, "name": {"type": "string"}},
              "required": ["size", "name"]}
    completion(base, model, stream, is_chat=True, max_tokens=96, json_out=True,
               messages=[{"role": "user", "content": "Describe a cat in JSON."}],
               response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}})


@STREAM
def test_openai_v1_chat_completions_ignore_eos(base, model, stream):
    completion(base, model, stream, is_chat=True, messages=CHATS[0], max_tokens=48, ignore_eos=True,
               finish=("length",), stream_options={"include_usage": True} if stream else None, tokens=48)


@STREAM
def test_openai_v1_chat_completions_system_prompt_wrong_pos(base, model, stream):
    messages = [CHATS[0][0], {"role": "system", "content": "You are a helpful assistant."}]
    r = post(base, "/v1/chat/completions", {"model": model, "messages": messages, "stream": stream,
                                            "max_tokens": 4})
    if r.status_code == 200:
        pytest.skip("adapted: a system message after the first is rendered by SmolLM2's template (MLC refuses it)")
    assert "system" in error(r)["message"].lower()


def test_debug_dump_event_trace():
    pytest.skip("server-specific: MLC's /debug/dump_event_trace")


def test_metrics(base):
    text = httpx.get(base + "/metrics", timeout=30).text
    assert "edgellm_time_to_first_token_seconds_sum" in text and "edgellm_requests_total" in text

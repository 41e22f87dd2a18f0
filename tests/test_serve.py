"""`edgellm serve` as a real process, talked to by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow  # real server processes and schemathesis (minutes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *extra: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # /metrics needs the key when the server has one
        self.key = extra[extra.index("--api-key") + 1] if "--api-key" in extra else None
        env = dict(os.environ)
        env.pop("EDGELLM_DEBUG", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "edgellm", "serve", str(model), "--port", str(self.port),
                                      "--log-level", "warning", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def metrics(self) -> dict[str, float]:
        out = {}
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        for line in httpx.get(self.base + "/metrics", headers=headers).text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name.removeprefix("edgellm_")] = float(value)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(tiny_model):
    s = Server(tiny_model, "--overrides", "max_num_sequence=32;max_tokens=48;context_window_size=256")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def model_id(client) -> str:
    return client.models.list().data[0].id


MSG = [{"role": "user", "content": "Hello there!"}]


def test_models_and_chat(client):
    models = client.models.list()
    assert len(models.data) == 1 and models.data[0].object == "model"
    r = client.chat.completions.create(model=model_id(client), messages=MSG, temperature=0, max_tokens=16)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.choices[0].finish_reason in ("stop", "length")


def test_stream_equals_non_stream(client):
    kw = dict(model=model_id(client), messages=MSG, temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert chunks[-1].usage.completion_tokens == 24


def test_completions_token_prompt_and_logprobs(client):
    r = client.completions.create(model=model_id(client), prompt=[5, 6, 7, 8, 9], max_tokens=6, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 3 for t in lp.top_logprobs)
    assert r.usage.prompt_tokens == 5


def test_async_client_streaming(server, client):
    mid = model_id(client)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
        full = await aclient.chat.completions.create(model=mid, messages=MSG, temperature=0, max_tokens=16)
        stream = await aclient.chat.completions.create(model=mid, messages=MSG, temperature=0, max_tokens=16,
                                                       stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await aclient.close()
        return full.choices[0].message.content, text

    full, text = asyncio.run(run())
    assert full == text


def test_32_concurrent_streams_match_alone(server, client):
    mid = model_id(client)
    prompts = [f"Request number {i}: tell me something about {i * 7}" for i in range(32)]
    alone = [client.chat.completions.create(model=mid, messages=[{"role": "user", "content": p}], temperature=0,
                                            max_tokens=12).choices[0].message.content for p in prompts]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)

        async def one(p):
            stream = await aclient.chat.completions.create(model=mid, messages=[{"role": "user", "content": p}],
                                                           temperature=0, max_tokens=12, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        out = await asyncio.gather(*(one(p) for p in prompts))
        await aclient.close()
        return out

    assert asyncio.run(run()) == alone
    assert server.metrics()["requests_running"] == 0


@pytest.fixture(scope="module")
def long_server(tiny_model):
    # a context long enough that a stream cannot be generated to its end before its hang-up is noticed
    # (the tiny model decodes thousands of tokens a second)
    s = Server(tiny_model, "--overrides", "max_num_sequence=8;context_window_size=16384")
    yield s
    s.stop()


def test_disconnects_cancel_and_free_kv(long_server):
    server = long_server
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    mid = model_id(client)
    before = server.metrics()
    body = {"model": mid, "messages": MSG, "max_tokens": 16000, "ignore_eos": True, "stream": True,
            "temperature": 0}
    for _ in range(5):
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for i, _line in enumerate(r.iter_lines()):
                if i >= 6:
                    break  # hang up mid-stream
    deadline = time.time() + 30
    while time.time() < deadline:
        m = server.metrics()
        if m["requests_cancelled"] >= before["requests_cancelled"] + 5 and m["requests_running"] == 0:
            break
        time.sleep(0.2)
    assert m["requests_cancelled"] >= before["requests_cancelled"] + 5
    assert m["requests_running"] == 0 and m["kv_cache_sequences"] == 0
    assert m["kv_cache_bytes_used"] <= before["kv_cache_bytes_used"]
    r = client.chat.completions.create(model=mid, messages=MSG, temperature=0, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_64_streams_half_hang_up(server, client):
    """Issue 18: 64 concurrent streams, 32 of whose clients hang up mid-stream: the 32 others finish
    with the text they get alone, every submitted request is counted finished or cancelled, and the
    KV cache is empty again, all within bounded time."""
    mid = model_id(client)
    prompts = [f"Stream {i}: say something about {i * 3}" for i in range(4)]
    alone = [client.chat.completions.create(model=mid, messages=[{"role": "user", "content": p}], temperature=0,
                                            max_tokens=8).choices[0].message.content for p in prompts]
    before = server.metrics()

    async def survivor(http: httpx.AsyncClient, i: int) -> tuple[str, str | None]:
        body = {"model": mid, "messages": [{"role": "user", "content": prompts[i % 4]}], "max_tokens": 8,
                "temperature": 0, "stream": True}
        text, finish = "", None
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        text += c["delta"].get("content") or ""
                        finish = c["finish_reason"] or finish
        return text, finish

    async def hang_up(http: httpx.AsyncClient, i: int) -> None:
        # long, so that it is still generating when the hang-up is noticed (else it counts as finished)
        body = {"model": mid, "messages": MSG, "max_tokens": 200, "ignore_eos": True, "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = 0
            async for line in r.aiter_lines():
                lines += bool(line)
                if lines >= 2 + i % 3:
                    break  # leaving the block closes the connection mid-stream

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.base, timeout=120, limits=limits) as http:
            jobs = [survivor(http, i // 2) if i % 2 == 0 else hang_up(http, i) for i in range(64)]
            return await asyncio.wait_for(asyncio.gather(*jobs), 240)

    t0 = time.time()
    results = asyncio.run(run())
    survivors = results[0::2]
    assert all(finish in ("stop", "length") for _, finish in survivors)
    assert [text for text, _ in survivors] == [alone[i % 4] for i in range(32)]
    deadline = time.time() + 30
    while time.time() < deadline:
        m = server.metrics()
        if m["requests_running"] + m["requests_waiting"] == 0 and m["kv_cache_sequences"] == 0:
            break
        time.sleep(0.2)
    d = {k: m[k] - before[k] for k in ("requests_total", "requests_finished", "requests_cancelled",
                                       "requests_failed")}
    assert d["requests_total"] == 64 and d["requests_failed"] == 0
    assert d["requests_finished"] + d["requests_cancelled"] == 64  # every request counted once
    # A hang-up whose client read slowly on a loaded machine may have been generated to its end before the
    # server saw the socket close: then it rightly counts as finished. Most are cancelled mid-stream.
    assert d["requests_finished"] >= 32 and d["requests_cancelled"] >= 28
    assert m["requests_running"] == m["requests_waiting"] == 0
    assert m["kv_cache_sequences"] == 0 and m["kv_cache_tokens_active"] == 0
    assert time.time() - t0 < 120


def _err(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in resp.text
    return err


def test_error_statuses(server, client):
    url = server.base + "/v1/chat/completions"
    mid = model_id(client)
    _err(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    _err(httpx.post(url, json={"model": mid}), 400)  # messages missing
    err = _err(httpx.post(url, json={"model": mid, "messages": MSG, "temperature": -1}), 400)
    assert err["param"] == "temperature"
    _err(httpx.post(url, json={"model": mid, "messages": []}), 400)
    _err(httpx.post(url, json={"model": mid, "messages": [{"role": "alien", "content": "x"}]}), 400)
    err = _err(httpx.post(url, json={"model": "no-such-model", "messages": MSG}), 404)
    assert err["code"] == "model_not_found"
    long = "The quick brown fox jumps over the lazy dog. " * 300
    err = _err(httpx.post(url, json={"model": mid, "messages": [{"role": "user", "content": long}]}), 400)
    window = httpx.get(server.base + "/v1/models").json()["data"][0]["max_model_len"]
    assert err["code"] == "context_length_exceeded" and str(window) in err["message"]
    _err(httpx.post(url, content=b"x" * (5 * 1024 * 1024), headers={"content-type": "application/json"}), 413)
    _err(httpx.post(server.base + "/v1/completions", json={"model": mid, "prompt": [10**9]}), 400)
    _err(httpx.get(server.base + "/v1/nothing-here"), 404)
    # still serving
    assert client.chat.completions.create(model=mid, messages=MSG, max_tokens=2).choices


def test_openapi_describes_bodies(server):
    spec = httpx.get(server.base + "/openapi.json").json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = body["$ref"].rsplit("/", 1)[1]
    props = spec["components"]["schemas"][name]["properties"]
    assert {"messages", "temperature", "max_tokens", "stream", "logit_bias", "response_format"} <= set(props)


@pytest.mark.skipif(shutil.which("st") is None and shutil.which("schemathesis") is None,
                    reason="schemathesis is not installed")
def test_schemathesis_finds_no_server_errors(server):
    st = shutil.which("st") or shutil.which("schemathesis")
    r = subprocess.run([st, "run", server.base + "/openapi.json", "--checks", "not_a_server_error",
                        "--max-time", "90", "--workers", "2", "--request-timeout", "60",
                        "--phases", "examples,coverage,fuzzing",
                        "--suppress-health-check", "all", "--no-color"],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:]
    assert httpx.get(server.base + "/health").status_code == 200


def test_api_key(tiny_model):
    s = Server(tiny_model, "--api-key", "sekret")
    try:
        assert httpx.get(s.base + "/v1/models").status_code == 401
        assert httpx.get(s.base + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.get(s.base + "/v1/models", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        c = openai.OpenAI(base_url=s.base + "/v1", api_key="sekret", max_retries=0)
        assert c.chat.completions.create(model=ok.json()["data"][0]["id"], messages=MSG, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base + "/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(s.base + "/health").status_code == 200  # health stays open
    finally:
        s.stop()

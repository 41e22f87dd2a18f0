"""Embeddings, llama.cpp-style /tokenize and /detokenize, and CORS (issue 12) against a real `edgellm serve`."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from tests.test_serve import Server

ORIGIN = "http://ui.example"


@pytest.fixture(scope="module")
def server(tiny_model):
    s = Server(tiny_model, "--overrides", "max_num_sequence=4;max_tokens=16;context_window_size=256",
               "--allowed-origins", ORIGIN)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


TEXTS = ["The capital of France is Paris.", "def add(a, b): return a + b", "小明比小红年龄大 👍🏽"]


def test_embeddings_through_the_official_client(client):
    r = client.embeddings.create(model=client.models.list().data[0].id, input=TEXTS)
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens > len(TEXTS)
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (3, 64)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert float(vecs[0] @ vecs[0]) == pytest.approx(1.0, abs=1e-5)  # cosine of a text with itself
    assert float(vecs[0] @ vecs[1]) < 0.9999
    alone = [client.embeddings.create(model=r.model, input=t).data[0].embedding for t in TEXTS]
    assert np.allclose(np.array(alone), vecs, atol=1e-5)  # the same vector alone and in a batch
    # the SDK asks for base64 by default when numpy is present; ask for floats too, raw
    single = client.embeddings.create(model=r.model, input=TEXTS[0], encoding_format="float")
    assert np.allclose(single.data[0].embedding, vecs[0], atol=1e-6)


def test_embeddings_raw_http_shapes_and_errors(server):
    url = server.base + "/v1/embeddings"
    r = httpx.post(url, json={"input": TEXTS[0], "encoding_format": "base64"}, timeout=60).json()
    vec = np.frombuffer(base64.b64decode(r["data"][0]["embedding"]), dtype="<f4")
    floats = httpx.post(url, json={"input": TEXTS[0]}, timeout=60).json()["data"][0]["embedding"]
    assert np.allclose(vec, floats, atol=1e-6) and r["object"] == "list"
    ids = httpx.post(server.base + "/tokenize", json={"content": TEXTS[0], "add_special": True}).json()["tokens"]
    by_ids = httpx.post(url, json={"input": ids}, timeout=60).json()
    assert np.allclose(by_ids["data"][0]["embedding"], floats, atol=1e-6)
    assert by_ids["usage"] == {"prompt_tokens": len(ids), "total_tokens": len(ids)}
    for body, param in (({"input": "x", "dimensions": 8}, "dimensions"), ({"input": []}, "input"),
                        ({"input": [10**6]}, "input"), ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
                        ({"input": "x", "truncate": True}, "truncate")):
        bad = httpx.post(url, json=body, timeout=30)
        assert bad.status_code == 400, (body, bad.text)
        assert bad.json()["error"]["param"] == param


@pytest.mark.parametrize("text", ["小明比小红年龄大，谁最小？", "Emoji: 👍🏽 😀 🎉!", "plain ascii"])
def test_tokenize_detokenize_round_trip(server, text):
    tokens = httpx.post(server.base + "/tokenize", json={"content": text}).json()["tokens"]
    assert all(isinstance(t, int) for t in tokens)
    assert httpx.post(server.base + "/detokenize", json={"tokens": tokens}).json() == {"content": text}
    pieces = httpx.post(server.base + "/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == tokens
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined.decode() == text


def test_tokenize_errors(server):
    assert httpx.post(server.base + "/detokenize", json={"tokens": [10**7]}).status_code == 400
    assert httpx.post(server.base + "/tokenize", json={"text": "x"}).status_code == 400
    with_special = httpx.post(server.base + "/tokenize", json={"content": "hi", "add_special": True}).json()
    assert isinstance(with_special["tokens"], list)


def test_cors_only_for_allowed_origins(server):
    url = server.base + "/v1/chat/completions"
    pre = httpx.options(url, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                      "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(server.base + "/v1/models", headers={"Origin": ORIGIN})
    assert r.headers.get("access-control-allow-origin") == ORIGIN
    other = httpx.get(server.base + "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    denied = httpx.options(url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert denied.status_code == 400

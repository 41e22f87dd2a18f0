"""Fixtures of the peer conformance suites: one running `edgellm serve`, reached through
EDGELLM_CONFORMANCE_BASE (set by run.py), and helpers shared by the suites."""

from __future__ import annotations

import json
import os
import re

import httpx
import openai
import pytest


@pytest.fixture(scope="session")
def base() -> str:
    url = os.environ.get("EDGELLM_CONFORMANCE_BASE")
    if not url:
        pytest.skip("no server: run benchmarks/conformance/run.py (it sets EDGELLM_CONFORMANCE_BASE)")
    return url


@pytest.fixture(scope="session")
def model(base) -> str:
    return httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]


@pytest.fixture(scope="session")
def client(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def aclient(base) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)


def post(base: str, path: str, body: dict, timeout: float = 300) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=timeout)


def sse(base: str, path: str, body: dict, timeout: float = 300) -> list[dict]:
    """The data objects of an SSE stream (raw: lines read here, not by an SDK); asserts [DONE] ends it."""
    events, done = [], False
    with httpx.stream("POST", base + path, json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            assert not done, "data after [DONE]"
            if line == "data: [DONE]":
                done = True
            else:
                events.append(json.loads(line[6:]))
    assert done
    return events


def error(r: httpx.Response, status: int = 400) -> dict:
    """The OpenAI error object of a refused request."""
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    return err


def is_json_prefix(s: str) -> bool:
    """JSON, or JSON cut short (what is left where the parser stopped may only begin a token)."""
    try:
        json.loads(s)
        return True
    except json.JSONDecodeError as e:
        rest = s[e.pos:]
        if not rest.strip() or any(lit.startswith(rest) for lit in ("true", "false", "null")):
            return True
        if rest[0] == '"':  # an unfinished string: no closing quote after the opening one
            return re.fullmatch(r'"(?:[^"\\]|\\.)*\\?', rest, re.S) is not None
        return re.fullmatch(r"-?\d*\.?\d*(?:[eE][-+]?\d*)?", rest) is not None

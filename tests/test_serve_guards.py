"""Issue 18 items 6 and 10: a real `edgellm serve` against hostile or careless HTTP clients.

Clean 4xx OpenAI errors (never a 500 or a traceback in the log) for lone surrogates and oversize chunked
bodies; the key protects /metrics and /openapi.json; no absolute path leaks; foreign Host headers are
refused on loopback; slow-trickle headers and bodies are cut off in bounded time; max_tokens has a
ceiling and a saturated queue answers 429.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.test_serve import MSG, Server, _err

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def guarded(tiny_model):
    os.environ["EDGELLM_API_KEY"] = KEY  # read by the server (the key stays out of `ps`)
    try:
        s = Server(tiny_model, "--max-tokens-limit", "200", "--max-queue", "1", "--header-timeout", "2",
                   "--body-timeout", "2", "--overrides", "max_num_sequence=1;context_window_size=256")
    finally:
        del os.environ["EDGELLM_API_KEY"]
    yield s
    s.stop()


def test_key_protects_metrics_and_schema_and_no_path_leaks(guarded, tiny_model):
    for path in ("/metrics", "/openapi.json", "/v1/models"):
        assert httpx.get(guarded.base + path).status_code == 401, path
        assert httpx.get(guarded.base + path, headers=AUTH).status_code == 200, path
    for path in ("/docs", "/redoc"):  # FastAPI's pages pull their scripts from a CDN: not served
        assert httpx.get(guarded.base + path, headers=AUTH).status_code == 404
    absolute = str(tiny_model.resolve())
    models = httpx.get(guarded.base + "/v1/models", headers=AUTH).text
    schema = httpx.get(guarded.base + "/openapi.json", headers=AUTH).text
    missing = httpx.post(guarded.base + "/v1/chat/completions", headers=AUTH,
                         json={"model": "nope", "messages": MSG})
    _err(missing, 404)
    for text in (models, schema, missing.text):
        assert absolute not in text and str(tiny_model) not in text
    assert tiny_model.name in models


@pytest.mark.parametrize("host, status", [
    ("evil.example", 400), ("evil.example:{port}", 400), ("localhost:{port}", 200), ("127.0.0.1:{port}", 200),
    ("[::1]:{port}", 200), ("localhost", 200), ("127.0.0.1.evil.example", 400)])
def test_loopback_server_refuses_foreign_host_headers(guarded, host, status):
    r = httpx.get(guarded.base + "/health", headers={"Host": host.format(port=guarded.port)})
    assert r.status_code == status
    if status == 400:
        assert _err(r, 400)["code"] == "invalid_host"


def test_lone_surrogate_and_chunked_oversize_body_are_4xx(guarded):
    url = guarded.base + "/v1/chat/completions"
    body = b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 4}'
    err = _err(httpx.post(url, content=body, headers={**AUTH, "content-type": "application/json"}), 400)
    assert "JSON" in err["message"]

    def chunks():  # 10 MB, chunked: no Content-Length for the server to check first
        for _ in range(160):
            yield b"x" * 65536

    try:
        r = httpx.post(url, content=chunks(), headers={**AUTH, "content-type": "application/json"}, timeout=30)
        _err(r, 413)
    except httpx.WriteError:
        pass  # the server answered and closed while we were still sending: also bounded, not a 400/500
    ok = httpx.post(url, headers=AUTH, json={"messages": MSG, "max_tokens": 2})
    assert ok.status_code == 200


def test_max_tokens_ceiling(guarded):
    url = guarded.base + "/v1/chat/completions"
    err = _err(httpx.post(url, headers=AUTH, json={"messages": MSG, "max_tokens": 201}), 400)
    assert err["param"] == "max_tokens" and "200" in err["message"]
    r = httpx.post(url, headers=AUTH, json={"messages": MSG, "max_tokens": 200, "ignore_eos": True}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 200


def test_saturated_queue_answers_429(guarded):
    url = guarded.base + "/v1/chat/completions"
    body = {"messages": MSG, "max_tokens": 200, "ignore_eos": True, "temperature": 0}

    def one(_):
        return httpx.post(url, headers=AUTH, json=body, timeout=300)

    with ThreadPoolExecutor(8) as pool:  # 1 running + 1 waiting are allowed
        results = list(pool.map(one, range(8)))
    codes = sorted(r.status_code for r in results)
    assert set(codes) <= {200, 429} and codes.count(200) >= 2 and codes.count(429) >= 1, codes
    err = _err(next(r for r in results if r.status_code == 429), 429)
    assert err["type"] == "rate_limit_error"
    # nothing leaked: the slots are free again
    assert httpx.post(url, headers=AUTH, json={"messages": MSG, "max_tokens": 2}, timeout=60).status_code == 200


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    sock.settimeout(seconds)
    got = b""
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True, got
            got += data
    except (TimeoutError, ConnectionResetError):
        return False, got


def test_slow_trickle_headers_and_body_are_cut_off(guarded):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", guarded.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        closed, _ = _closed_within(s, 10)
    assert closed and time.monotonic() - t0 < 6
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", guarded.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mess")
        closed, got = _closed_within(s, 10)
    assert got.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 6, got[:200]


@pytest.mark.parametrize("base", ["HeaderTimeoutProtocol", "HeaderTimeoutHttpToolsProtocol"])
def test_header_timeout_in_both_http_protocols(base):
    """`edgellm serve` runs httptools' parser where installed and h11 where not: both cut off a client
    whose headers never end, on a new connection and on a kept-alive one after a response."""
    import threading

    import uvicorn

    from edgellm.serve import guards

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    protocol = type("P", (getattr(guards, base),), {"header_timeout": 1.0})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, http=protocol, log_level="error",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        for first in (b"", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
            t0 = time.monotonic()
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(first + b"GET / HTTP/1.1\r\nHost: x\r\n")  # a request whose headers never end
                closed, got = _closed_within(s, 8)
            assert closed and time.monotonic() - t0 < 5
            assert got.count(b"200 OK") == (1 if first else 0), got
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_server_log_has_no_traceback(guarded):
    guarded.stop()
    log = guarded.proc.stdout.read()
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]


def test_api_key_file_and_public_metrics(tiny_model, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    s = Server(tiny_model, "--api-key-file", str(key_file), "--public-metrics")
    try:
        assert httpx.get(s.base + "/metrics").status_code == 200
        assert httpx.get(s.base + "/openapi.json").status_code == 200
        assert httpx.get(s.base + "/v1/models").status_code == 401
        assert httpx.get(s.base + "/v1/models", headers={"Authorization": "Bearer from-a-file"}).status_code == 200
    finally:
        s.stop()
    r = subprocess.run([sys.executable, "-m", "edgellm", "serve", str(tiny_model), "--api-key-file",
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "api-key-file" in r.stderr and len(r.stderr.strip().splitlines()) == 1

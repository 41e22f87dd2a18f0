"""What stands between the network and the API: Host names, body size and time, JSON, load shedding.

Pure ASGI middlewares (no buffering of responses, so streams stay streams) and a uvicorn protocol
that closes connections whose request headers trickle in too slowly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time

import pydantic_core
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed: h11 only
    HttpToolsProtocol = None

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """An OpenAI error object."""
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """'[::1]:8000' -> '::1', 'localhost:8000' -> 'localhost'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or ():
        if k == name:
            return v
    return None


class RequestGuard:
    """Host check, a size and time bound on the request body, and JSON a tokenizer can take.

    `loopback_only`: answer 400 to Host headers that are not loopback names (a web page that rebinds
    its DNS name to 127.0.0.1 sends its own name). The body is read whole before the app runs (it is
    at most `limit` bytes): past `limit` 413, slower than `body_timeout` seconds 408, and a JSON body
    that does not parse strictly (lone UTF-16 surrogates included) 400.
    """

    def __init__(self, app, limit: int, body_timeout: float = 60.0, loopback_only: bool = False):
        self.app, self.limit, self.body_timeout, self.loopback_only = app, limit, body_timeout, loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.loopback_only:
            host = host_name((_header(scope, b"host") or b"").decode("latin-1"))
            if not is_loopback(host):
                return await error_response(
                    400, f"Host {host!r} is not allowed: this server listens on loopback and only answers "
                    f"requests for localhost, 127.0.0.1 or [::1]", code="invalid_host")(scope, receive, send)
        length = _header(scope, b"content-length")
        too_big = error_response(413, f"request body exceeds {self.limit} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, seen, more = [], 0, True
        deadline = time.monotonic() + self.body_timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                return await error_response(408, f"request body not received within {self.body_timeout:g} s",
                                            code="request_timeout")(scope, _disconnected, send)
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await too_big(scope, _disconnected, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        ctype = (_header(scope, b"content-type") or b"").lower()
        if body and (b"json" in ctype or not ctype):
            try:
                pydantic_core.from_json(body)
            except ValueError as e:
                return await error_response(400, f"request body is not valid JSON ({e})")(scope, _disconnected, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the real channel (disconnects)

        return await self.app(scope, replay, send)


async def _disconnected():
    return {"type": "http.disconnect"}


class ApiKeyAuth:
    """401 unless 'Authorization: Bearer KEY' on /v1 and the `guarded` paths. Pure ASGI: as an
    `@app.middleware("http")` function it passed every streamed chunk through an extra task and memory
    stream (the event loop's share of a streamed token, which the engine thread waits on for the GIL)."""

    def __init__(self, app, api_key: str | None, guarded: tuple[str, ...]):
        self.app, self.guarded = app, guarded
        self.want = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.want is not None and scope["type"] == "http":
            path = scope["path"]
            if path.startswith("/v1") or path in self.guarded:
                given = _header(scope, b"authorization") or b""
                if not secrets.compare_digest(given, self.want):
                    return await error_response(
                        401, "invalid or missing API key (use 'Authorization: Bearer <key>')",
                        type_="authentication_error", code="invalid_api_key")(scope, receive, send)
        return await self.app(scope, receive, send)


class AdmissionLimit:
    """429 for generation requests beyond `limit` in flight (running + waiting): shed load, do not queue forever.

    Counted at the HTTP layer from when a request arrives to when its response (or stream) ends or
    its client goes away, so the count cannot leak.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit, self.in_flight = app, limit, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            return await error_response(
                429, f"server is busy: {self.in_flight} requests are running or waiting (limit {self.limit}); "
                "retry later", type_="rate_limit_error", code="server_busy")(scope, receive, send)
        self.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class _HeaderTimeout:
    """Mixed into uvicorn's HTTP/1.1 protocols: closes a connection whose request line and headers are
    not complete within `header_timeout` seconds of the connection (or of the previous response):
    slow-trickle clients cannot hold connections open forever. uvicorn only times out idle keep-alive
    connections."""

    header_timeout = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._timed_cycle = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        waiting = self.cycle is None or self.cycle.response_complete  # not mid-response (pipelining)
        if self.cycle is self._timed_cycle and waiting and not self.transport.is_closing():
            self.transport.close()

    def _headers_seen(self) -> None:
        if getattr(self, "_header_timer", None) is not None and self.cycle is not self._timed_cycle:
            self._disarm()  # a new request's headers are complete

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


class HeaderTimeoutProtocol(_HeaderTimeout, H11Protocol):
    """uvicorn's pure-Python (h11) protocol with the header timeout."""

    def handle_events(self) -> None:
        super().handle_events()
        self._headers_seen()


if HttpToolsProtocol is not None:
    class HeaderTimeoutHttpToolsProtocol(_HeaderTimeout, HttpToolsProtocol):
        """uvicorn's httptools (C parser) protocol with the header timeout."""

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._headers_seen()


def header_timeout_protocol(seconds: float) -> type:
    """The HTTP protocol class `edgellm serve` runs: httptools' C parser where it is installed (a
    streamed token costs the event loop about a third less CPU than with h11), else h11."""
    base = HeaderTimeoutProtocol if HttpToolsProtocol is None else HeaderTimeoutHttpToolsProtocol
    return type("Protocol", (base,), {"header_timeout": seconds})

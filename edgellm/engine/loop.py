"""`EngineLoop`: drives an EngineCore on its own thread for callers on other threads.

API threads only enqueue (add, abort, call); the core, the model and the caches are touched by the
loop thread alone. After each step the loop hands every request's outputs to its consumer (the
frontend's output processor, `Request.consumer`), which answers with the choices a stop string
ended; the core finishes those before the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

from edgellm.engine.core import EngineCore
from edgellm.engine.request import Request, SeqOutput
from edgellm.errors import EngineTerminatedError

log = logging.getLogger("edgellm.engine")


class Consumer(Protocol):
    def __call__(self, req: Request, outs: list[SeqOutput]) -> list[int]:
        """Take a step's outputs (on the loop thread; must not block); return choice indices to stop."""


class EngineLoop:
    def __init__(self, core: EngineCore):
        self.core = core
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._closed = False  # set by the loop thread when it exits; guarded by _lock with the inbox
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="edgellm-engine", daemon=True)
        self.thread.start()

    # ---- any thread ------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request; raises EngineTerminatedError once the loop has stopped."""
        self._put("add", request)

    def abort(self, request_id: str) -> None:
        try:
            self._put("abort", request_id)
        except EngineTerminatedError:
            pass  # everything was aborted when the loop stopped

    def _put(self, kind: str, payload: Any) -> None:
        with self._lock:
            if self._closed:
                raise EngineTerminatedError()
            self.inbox.put((kind, payload))
        self._wake.set()

    def call(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run fn() on the loop thread (e.g. clear caches) and return its result."""
        done = threading.Event()
        box: dict = {}
        self._put("call", (fn, box, done))
        if not done.wait(timeout):
            raise TimeoutError(f"the engine did not answer within {timeout:.0f} s")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=timeout)

    # ---- loop thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            self._drain()
            if not self.core.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                results = self.core.step()
            except Exception as e:  # a failed step fails its requests, never the engine
                log.exception("engine step failed")
                for req in list(self.core.requests.values()):
                    self._deliver(req, self.core.abort(req, error=e))
                continue
            for req, outs in results:
                self._deliver(req, outs)
        with self._lock:
            self._closed = True
        self._drain()  # requests queued while stopping are aborted, calls answered
        for req in list(self.core.requests.values()):
            self._deliver(req, self.core.abort(req))

    def _drain(self) -> None:
        while True:
            try:
                kind, payload = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add" and self._closed:
                self._deliver(payload, self.core.abort(payload))
            elif kind == "add":
                self.core.add(payload)
            elif kind == "abort":
                req = self.core.requests.get(payload)
                if req is not None:
                    self._deliver(req, self.core.abort(req))
            elif kind == "call":
                fn, box, done = payload
                try:
                    box["result"] = fn()
                except Exception as e:
                    box["error"] = e
                done.set()

    def _deliver(self, req: Request, outs: list[SeqOutput]) -> None:
        if not outs or req.consumer is None:
            return
        try:
            stops = req.consumer(req, outs)
        except Exception:  # a broken consumer must not stop the engine
            log.exception("request consumer failed")
            if not req.finished:
                self._deliver(req, self.core.abort(req))
            return
        for index in stops or ():
            self.core.finish(req.sequences[index], "stop")

"""What a token costs through the API versus inside the engine step (the model).

    python benchmarks/api_overhead.py [MODEL] [--prompt-len 512] [--gen-len 128] [--rounds 3] [--threads 2]

Alternates, in one process: `edgellm bench`'s measurement (the core stepped directly, no text), a
streaming `Engine.completions.create` (detokenization, stop strings, response objects, the thread
hand-off), the same request non-streaming, and (with --serve) a streaming request to `edgellm serve`'s
app (the same `create_app` and HTTP protocol, in a thread of this process so its steps can be timed)
read by a client in another process; decode tokens/s of each, and the API's cost per token relative to
the bench figure.

It also times every model step (`runner.step`) during each decode, so it reports the time per token
spent *outside* the model step as a fraction of the step ("outside"): sampling, bookkeeping,
detokenizing, response objects and the hand-off between threads. That fraction is far less sensitive
to a loaded machine than tokens/s compared across runs.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from edgellm import Engine
from edgellm.bench import BenchSession


class StepClock:
    """Wraps a runner's `step` to add up the time spent inside it (one instance attribute)."""

    def __init__(self, runner):
        self.total = 0.0
        self.spans: list[tuple[float, float]] = []  # (start, end) of each step, perf_counter (monotonic)
        inner = runner.step

        def step(chunks):
            t = time.perf_counter()
            try:
                return inner(chunks)
            finally:
                end = time.perf_counter()
                self.total += end - t
                self.spans.append((t, end))

        runner.step = step


def api_round(engine: Engine, clock: StepClock, prompt: list[int], gen_len: int, stream: bool) -> tuple[float, float]:
    """(decode tokens/s by wall clock, time outside the model step / time inside) through the Engine API."""
    r = engine.completions.create(prompt=prompt, max_tokens=gen_len + 1, temperature=0, ignore_eos=True,
                                  stream=stream)
    if not stream:
        # usage's own decode rate; the clock split needs the stream's stamps, so take them from usage too
        tps = r.usage.extra["decode_tokens_per_s"]
        return tps, float("nan")
    it = iter(r)
    next(it)  # the first token: prefill done
    clock.total = 0.0
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in it]
    wall = stamps[-2] - t0  # the last chunk carries only the finish reason
    inside = clock.total
    return gen_len / wall, (wall - inside) / inside


def bench_round(bench: BenchSession, clock: StepClock) -> tuple[float, float]:
    """(decode tokens/s, outside/inside the step) of `edgellm bench`'s loop."""
    marks: dict[str, float] = {}
    core_step = bench.core.step

    def step():
        out = core_step()
        if "prefilled" not in marks and out:  # the step that sampled the first token
            marks["prefilled"], marks["inside"] = time.perf_counter(), clock.total
        return out

    bench.core.step = step
    try:
        _, tg = bench.run_once()
        t_end = time.perf_counter()
    finally:
        del bench.core.step
    wall = t_end - marks["prefilled"]
    inside = clock.total - marks["inside"]
    return tg, (wall - inside) / inside


# The client of the serve round: another process (as a user's would be), stdlib only, printing the
# monotonic clock (the same clock as perf_counter on Linux) at the first and at the last text chunk. A
# chunk is not a token (a character of two byte tokens is one chunk): the round counts max_tokens.
CLIENT = """
import http.client, json, sys, time
port, body = int(sys.argv[1]), sys.argv[2]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
r = c.getresponse()
stamps = []
for line in r:
    if line.startswith(b"data: {") and b'"text":""' not in line:
        stamps.append(time.monotonic())
print(json.dumps([stamps[0], stamps[-1]]))
"""


class ServeRound:
    """`edgellm serve`'s app on a free port, in a thread; `round()` streams one request from a client
    process and returns (decode tokens/s, outside/inside the step) over the client's decode window."""

    def __init__(self, model, threads):
        import socket
        import threading

        import uvicorn

        from edgellm.api.async_engine import AsyncEngine
        from edgellm.serve.app import create_app
        from edgellm.serve.guards import header_timeout_protocol

        self.engine = AsyncEngine(model, threads=threads)
        self.clock = StepClock(self.engine.core.runner)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_app(self.engine, loopback_only=True), host="127.0.0.1", port=self.port,
                                log_level="warning", http=header_timeout_protocol(30.0))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.http_cpu_per_token: list[float] = []
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)

    def round(self, prompt: list[int], gen_len: int) -> tuple[float, float]:
        import subprocess
        import sys

        body = json.dumps({"prompt": prompt, "max_tokens": gen_len + 1, "temperature": 0, "ignore_eos": True,
                           "stream": True})
        self.clock.spans.clear()
        cpu0 = self.http_cpu()
        out = subprocess.run([sys.executable, "-c", CLIENT, str(self.port), body], capture_output=True,
                             text=True, timeout=300, check=True)
        first, last = json.loads(out.stdout)
        self.http_cpu_per_token.append((self.http_cpu() - cpu0) / (gen_len + 1))
        inside = sum(min(e, last) - max(s, first) for s, e in self.clock.spans if e > first and s < last)
        return gen_len / (last - first), (last - first - inside) / inside

    def http_cpu(self) -> float:
        """CPU seconds used so far by the HTTP thread (the event loop: request parsing, chunk JSON,
        socket writes), from /proc (Linux); NaN elsewhere."""
        try:
            with open(f"/proc/self/task/{self.thread.native_id}/schedstat") as f:
                return int(f.read().split()[0]) / 1e9  # ns on a CPU
        except OSError:
            return float("nan")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--serve", action="store_true", help="also stream through edgellm serve's HTTP app")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = random.Random(0)
    bench = BenchSession(args.model, prompt_len=args.prompt_len, gen_len=args.gen_len, threads=args.threads,
                         log=lambda *_: None)
    results: dict[str, list[float]] = {"bench_core": [], "engine_stream": [], "engine_nonstream": []}
    outside: dict[str, list[float]] = {"bench_core": [], "engine_stream": []}
    serve = ServeRound(args.model, args.threads) if args.serve else None
    if serve is not None:
        results["serve_stream"], outside["serve_stream"] = [], []
        serve.round([1, 2, 3], 8)  # warm up
    with Engine(args.model, threads=args.threads) as engine:
        vocab = bench.vocab
        bench_clock, api_clock = StepClock(bench.core.runner), StepClock(engine.core.runner)
        bench.run_once()
        for _ in range(args.rounds):
            tps, out = bench_round(bench, bench_clock)
            results["bench_core"].append(tps)
            outside["bench_core"].append(out)
            for key, stream in (("engine_stream", True), ("engine_nonstream", False)):
                prompt = [rng.randrange(vocab) for _ in range(args.prompt_len)]  # fresh: no prefix reuse
                tps, out = api_round(engine, api_clock, prompt, args.gen_len, stream)
                results[key].append(tps)
                if stream:
                    outside[key].append(out)
            if serve is not None:
                tps, out = serve.round([rng.randrange(vocab) for _ in range(args.prompt_len)], args.gen_len)
                results["serve_stream"].append(tps)
                outside["serve_stream"].append(out)
    if serve is not None:
        serve.close()
        report_http = [x * 1e6 for x in serve.http_cpu_per_token]
    best = {k: max(v) for k, v in results.items()}
    report = {"decode_tokens_per_s": results, "best": best,
              "api_over_bench": {k: best["bench_core"] / best[k] for k in results if k != "bench_core"},
              "outside_step_fraction": {k: min(v) for k, v in outside.items()}}
    if serve is not None:
        report["serve_http_thread_cpu_us_per_token"] = report_http
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for k, v in best.items():
        print(f"{k:>18}: {v:7.1f} tok/s (runs: {', '.join(f'{x:.1f}' for x in results[k])})")
    for k, v in report["api_over_bench"].items():
        print(f"a token through {k} costs {v:.2f}x what bench reports")
    for k, v in outside.items():
        print(f"{k:>18}: time outside the model step = {min(v):.1%} of the step "
              f"(runs: {', '.join(f'{x:.1%}' for x in v)})")
    if serve is not None:
        print("serve's HTTP thread: " + ", ".join(f"{x:.0f}" for x in report_http) + " us of CPU per token")


if __name__ == "__main__":
    main()

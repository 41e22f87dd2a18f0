"""Load test of `edgellm serve`: 64 streaming requests at concurrency 8.

    python benchmarks/serve_load.py [MODEL] [--requests 64] [--concurrency 8] [--gen-len 64]

Starts the server on a free port (MODEL defaults to the bundled SmolLM2, q4f16_1), measures
throughput, p50/p99 time to first token and end-to-end latency, and aggregate decode tokens/s
versus a single stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time

import httpx

PROMPTS = ["Write a short story about a robot.", "Explain photosynthesis.", "List ten fruits.",
           "Describe Paris in spring.", "What is a black hole?", "Give me a recipe for pancakes.",
           "How do airplanes fly?", "Why is the sky blue?"]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one(client: httpx.AsyncClient, base: str, i: int, gen_len: int) -> dict:
    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": gen_len,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = now
            last = now
    return {"ttft": first - t0, "e2e": last - t0, "tokens": tokens, "first": first, "last": last}


async def load(base: str, n: int, concurrency: int, gen_len: int) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient() as client:
        async def bounded(i: int) -> dict:
            async with sem:
                return await one(client, base, i, gen_len)
        return await asyncio.gather(*(bounded(i) for i in range(n)))


def start_server(model: str | None, overrides: str) -> tuple[subprocess.Popen, str]:
    """`edgellm serve MODEL` on a free loopback port; (process, base URL) once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "edgellm", "serve", *([model] if model else []), "--port", str(port),
           "--log-level", "warning", "--overrides", overrides]
    server = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    return server, base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    server, base = start_server(args.model, f"max_num_sequence={args.concurrency};threads={args.threads}")
    try:
        asyncio.run(load(base, 1, 1, 8))  # warm-up
        single = asyncio.run(load(base, 1, 1, args.gen_len))[0]
        single_rate = (single["tokens"] - 1) / (single["last"] - single["first"])
        t0 = time.perf_counter()
        results = asyncio.run(load(base, args.requests, args.concurrency, args.gen_len))
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    tokens = sum(r["tokens"] for r in results)
    decode_rate = sum(r["tokens"] - 1 for r in results) / sum(r["last"] - r["first"] for r in results) \
        * args.concurrency
    print(f"{args.requests} requests, concurrency {args.concurrency}, {args.gen_len} tokens each, {wall:.1f} s")
    print(f"throughput: {args.requests / wall:.2f} req/s, {tokens / wall:.1f} generated tok/s")
    print(f"TTFT p50 {pct([r['ttft'] for r in results], 50):.3f} s, p99 {pct([r['ttft'] for r in results], 99):.3f} s")
    print(f"E2E  p50 {pct([r['e2e'] for r in results], 50):.3f} s, p99 {pct([r['e2e'] for r in results], 99):.3f} s")
    mean_e2e = statistics.mean(r["e2e"] for r in results)
    print(f"decode tok/s: single stream {single_rate:.1f}, aggregate at {args.concurrency} "
          f"{decode_rate:.1f} ({decode_rate / single_rate:.2f}x); mean e2e {mean_e2e:.2f} s")


if __name__ == "__main__":
    main()

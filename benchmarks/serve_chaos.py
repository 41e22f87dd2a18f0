"""Chaos against `edgellm serve`: good requests beside bad ones and clients that hang up.

    python benchmarks/serve_chaos.py [MODEL] [--rounds 3] [--concurrency 64] [--gen-len 32]

Starts the server on a free port (MODEL defaults to the bundled SmolLM2, q4f16_1). A calm run sends
only the good requests (greedy, streaming); each chaos round sends `concurrency` requests at once, a
third of them good and the rest bad: malformed JSON, an empty prompt, out-of-vocabulary token ids, a
prompt over the context window, and streams whose clients disconnect after a few chunks. Reports:
good requests completed (must be all), their text identical to the calm run, bad ones answered 4xx,
running requests and KV bytes in use after the rounds (must be zero), the metrics adding up, and the
p99 latency of good requests versus the calm run.

`--precision high` (the default here) because the default `normal` int8 GEMM is not batch-invariant:
greedy text can change with what else is in the batch (measured: 9 of 12 replies identical alone and
batched with `normal`, 12 of 12 with `high`), which would hide a real isolation failure among noise.
"KV in use" is the cache held by sequences; blocks kept for prefix reuse are reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
from serve_load import pct, start_server  # benchmarks/ is the script's directory

PROMPTS = ["Write a short story about a robot.", "Explain photosynthesis.", "List ten fruits.",
           "Describe Paris in spring.", "What is a black hole?", "Give me a recipe for pancakes."]


async def good(client: httpx.AsyncClient, i: int, gen_len: int) -> tuple[str, float]:
    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": gen_len,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    text = []
    async with client.stream("POST", "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    text.append(c["delta"].get("content") or "")
    return "".join(text), time.perf_counter() - t0


async def hang_up(client: httpx.AsyncClient, i: int) -> int:
    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": 512,
            "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body, timeout=600) as r:
        n = 0
        async for _ in r.aiter_lines():
            n += 1
            if n > 4:
                break  # leaving the block closes the connection mid-stream
    return r.status_code


async def bad(client: httpx.AsyncClient, kind: int, window: int) -> int:
    url = "/v1/completions" if kind in (2, 3) else "/v1/chat/completions"
    if kind == 0:
        r = await client.post(url, content=b'{"messages": [{"role": "user", "content": "hi"', timeout=60,
                              headers={"content-type": "application/json"})
    elif kind == 1:
        r = await client.post(url, json={"messages": []}, timeout=60)
    elif kind == 2:
        r = await client.post(url, json={"prompt": [1, 2, 10**7], "max_tokens": 4}, timeout=60)
    else:
        r = await client.post(url, json={"prompt": [5] * (window + 10), "max_tokens": 4}, timeout=60)
    return r.status_code


async def chaos_round(base: str, concurrency: int, gen_len: int, window: int):
    async with httpx.AsyncClient(base_url=base) as client:
        jobs = []
        for i in range(concurrency):
            if i % 3 == 0:
                jobs.append(good(client, i // 3, gen_len))
            elif i % 3 == 1:
                jobs.append(bad(client, (i // 3) % 4, window))
            else:
                jobs.append(hang_up(client, i))
        return await asyncio.gather(*jobs, return_exceptions=True)


async def calm_run(base: str, n: int, gen_len: int) -> list[tuple[str, float]]:
    async with httpx.AsyncClient(base_url=base) as client:
        return await asyncio.gather(*(good(client, i, gen_len) for i in range(n)))


def metrics(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name.removeprefix("edgellm_")] = float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="high", choices=("high", "normal"))
    args = ap.parse_args()
    server, base = start_server(args.model, f"max_num_sequence=16;threads={args.threads};precision={args.precision}")
    n_good = -(-args.concurrency // 3)
    try:
        window = int(httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["max_model_len"])
        calm = asyncio.run(calm_run(base, n_good, args.gen_len))
        results = [asyncio.run(chaos_round(base, args.concurrency, args.gen_len, window)) for _ in range(args.rounds)]
        deadline = time.time() + 60  # let the server notice the last hang-ups
        while (m := metrics(base))["requests_running"] + m["requests_waiting"] > 0 and time.time() < deadline:
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=60)
    goods = [r[i] for r in results for i in range(0, args.concurrency, 3)]
    bads = [r[i] for r in results for i in range(1, args.concurrency, 3)]
    ok = [g for g in goods if isinstance(g, tuple)]
    same = sum(g[0] == calm[(i % n_good)][0] for i, g in enumerate(goods) if isinstance(g, tuple))
    report = {
        "good_requests": len(goods), "good_completed": len(ok), "good_identical_to_calm": same,
        "bad_requests": len(bads), "bad_answered_4xx": sum(isinstance(b, int) and 400 <= b < 500 for b in bads),
        "requests_running_after": m.get("requests_running"), "requests_waiting_after": m.get("requests_waiting"),
        "kv_cache_sequences_after": m.get("kv_cache_sequences"),
        "kv_cache_tokens_active_after": m.get("kv_cache_tokens_active"),
        "kv_cache_bytes_used_after_incl_prefix_cache": m.get("kv_cache_bytes_used"),
        "kv_cache_tokens_prefix_cache_after": m.get("kv_cache_tokens_prefix_cache"),
        "requests": {k: m.get(k) for k in ("requests_total", "requests_finished", "requests_cancelled",
                                           "requests_failed")},
        "metrics_add_up": m.get("requests_total") == m.get("requests_finished", 0) + m.get("requests_cancelled", 0)
        + m.get("requests_failed", 0),
        "p99_good_latency_s": pct([g[1] for g in ok], 99) if ok else None,
        "p99_calm_latency_s": pct([c[1] for c in calm], 99),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

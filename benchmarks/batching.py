"""Aggregate decode tokens/s with 8 concurrent sequences versus 1 (continuous batching).

    python benchmarks/batching.py [MODEL] [--concurrency 8] [--gen-len 128] [--threads 2] [--api async]

MODEL defaults to the bundled SmolLM2-135M-Instruct converted to q4f16_1. `--api sync` (the default)
reads each stream in a thread of its own through `Engine`; `--api async` reads them as coroutines of one
event loop through `AsyncEngine`, as `edgellm serve` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

from edgellm import Engine
from edgellm.api.async_engine import AsyncEngine

PROMPTS = ["Write a short story about a robot.", "Explain photosynthesis.", "List ten fruits.",
           "Describe Paris in spring.", "What is a black hole?", "Give me a recipe for pancakes.",
           "How do airplanes fly?", "Tell me about the ocean.", "Why is the sky blue?",
           "Summarize the history of Rome.", "What is machine learning?", "Describe a sunset."]


def run(engine: Engine, n: int, gen_len: int) -> dict:
    """n concurrent streams.

    steady decode rate: tokens streamed while all n streams are decoding (from the last stream's
    first token to the first stream's last) per second; end-to-end rate: all tokens after each
    stream's first over the whole span, which also holds the other streams' prefills.
    """
    stamps: list[list[float]] = [[] for _ in range(n)]
    counts = [0] * n
    t0 = time.perf_counter()
    if isinstance(engine, AsyncEngine):
        asyncio.run(_run_async(engine, n, gen_len, stamps, counts))
    else:
        _run_threads(engine, n, gen_len, stamps, counts)
    wall = time.perf_counter() - t0
    w0, w1 = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    # a chunk may carry two tokens (a token without text of its own): scale by each stream's ratio
    in_window = sum(sum(1 for t in s if w0 < t <= w1) * c / len(s) for s, c in zip(stamps, counts))
    first, last = min(s[0] for s in stamps), max(s[-1] for s in stamps)
    return {"concurrency": n, "tokens": sum(counts), "chunks": sum(len(s) for s in stamps), "wall_s": wall,
            "steady_window_s": w1 - w0, "steady_decode_tokens_per_s": in_window / (w1 - w0),
            "end_to_end_decode_tokens_per_s": sum(c - 1 for c in counts) / (last - first)}


def _request(i: int, gen_len: int) -> dict:
    return {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": gen_len,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def _record(chunk, i: int, stamps, counts) -> None:
    """A chunk's arrival time when it carries generated text: not the first chunk (the assistant role,
    sent before the prompt is prefilled, so it would put every stream's prefill into the window), nor
    the last (the finish reason)."""
    if chunk.usage is not None:
        counts[i] = chunk.usage.completion_tokens
    elif chunk.choices and chunk.choices[0].delta.content:
        stamps[i].append(time.perf_counter())


async def _run_async(engine: AsyncEngine, n: int, gen_len: int, stamps, counts) -> None:
    async def one(i: int) -> None:
        async for chunk in await engine.chat.completions.create(**_request(i, gen_len)):
            _record(chunk, i, stamps, counts)

    await asyncio.gather(*(one(i) for i in range(n)))


def _run_threads(engine: Engine, n: int, gen_len: int, stamps, counts) -> None:
    def one(i: int) -> None:
        for chunk in engine.chat.completions.create(**_request(i, gen_len)):
            _record(chunk, i, stamps, counts)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternate single and concurrent runs this many times and keep the best of each "
                         "(a shared or throttled CPU drifts between runs)")
    ap.add_argument("--api", choices=("sync", "async"), default="sync",
                    help="read the streams from threads (Engine) or from one event loop (AsyncEngine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    key = "steady_decode_tokens_per_s"
    single = multi = None
    cls = AsyncEngine if args.api == "async" else Engine
    engine = cls(args.model, max_num_sequence=args.concurrency, threads=args.threads)
    try:
        run(engine, 1, 8)  # warm-up
        pairs = []
        for _ in range(args.rounds):
            s, m = run(engine, 1, args.gen_len), run(engine, args.concurrency, args.gen_len)
            pairs.append(m[key] / s[key])
            single = s if single is None or s[key] > single[key] else single
            multi = m if multi is None or m[key] > multi[key] else multi
    finally:
        engine.terminate()
    ratio = multi[key] / single[key]
    # each round's own ratio (its two runs are seconds apart): less at the mercy of one lucky run
    paired = statistics.median(pairs)
    result = {"model": str(engine.model_dir), "api": args.api, "single": single, "concurrent": multi, "speedup": ratio,
              "speedup_median_of_rounds": paired, "speedup_of_each_round": pairs}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'streams':>8} {'steady decode tok/s':>20} {'end-to-end decode tok/s':>24} {'wall s':>8}")
    for r in (single, multi):
        print(f"{r['concurrency']:>8} {r[key]:>20.1f} {r['end_to_end_decode_tokens_per_s']:>24.1f} "
              f"{r['wall_s']:>8.2f}")
    print(f"speedup at {args.concurrency} streams: {ratio:.2f}x (best against best); median of the rounds' own "
          f"ratios {paired:.2f}x ({', '.join(f'{p:.2f}' for p in pairs)})")


if __name__ == "__main__":
    main()

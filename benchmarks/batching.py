"""Aggregate decode tokens/s with 8 concurrent sequences versus 1 (continuous batching).

    python benchmarks/batching.py [MODEL] [--concurrency 8] [--gen-len 128] [--threads 2]

MODEL defaults to the bundled SmolLM2-135M-Instruct converted to q4f16_1.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from edgellm import Engine

PROMPTS = ["Write a short story about a robot.", "Explain photosynthesis.", "List ten fruits.",
           "Describe Paris in spring.", "What is a black hole?", "Give me a recipe for pancakes.",
           "How do airplanes fly?", "Tell me about the ocean.", "Why is the sky blue?",
           "Summarize the history of Rome.", "What is machine learning?", "Describe a sunset."]


def run(engine: Engine, n: int, gen_len: int) -> dict:
    """n concurrent streams; decode rate = tokens after each stream's first / span of decoding."""
    firsts, lasts, counts = [0.0] * n, [0.0] * n, [0] * n

    def one(i: int) -> None:
        stream = engine.chat.completions.create(
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=gen_len,
            temperature=0, ignore_eos=True, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                counts[i] = chunk.usage.completion_tokens
            elif not firsts[i]:
                firsts[i] = now
            lasts[i] = now

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    span = max(lasts) - max(firsts)  # every stream decoding at once
    decode_tokens = sum(c - 1 for c in counts)
    return {"concurrency": n, "tokens": sum(counts), "wall_s": wall,
            "aggregate_tokens_per_s": sum(counts) / wall,
            "aggregate_decode_tokens_per_s": decode_tokens / (max(lasts) - min(firsts)),
            "steady_decode_span_s": span}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with Engine(args.model, max_num_sequence=args.concurrency, threads=args.threads) as engine:
        run(engine, 1, 8)  # warm-up
        single = run(engine, 1, args.gen_len)
        multi = run(engine, args.concurrency, args.gen_len)
    ratio = multi["aggregate_decode_tokens_per_s"] / single["aggregate_decode_tokens_per_s"]
    result = {"model": str(engine.model_dir), "single": single, "concurrent": multi, "speedup": ratio}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'streams':>8} {'decode tok/s (aggregate)':>26} {'wall s':>8}")
    for r in (single, multi):
        print(f"{r['concurrency']:>8} {r['aggregate_decode_tokens_per_s']:>26.1f} {r['wall_s']:>8.2f}")
    print(f"speedup at {args.concurrency} streams: {ratio:.2f}x")


if __name__ == "__main__":
    main()

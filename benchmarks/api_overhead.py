"""What a token costs through the API versus inside the engine step (the model).

    python benchmarks/api_overhead.py [MODEL] [--prompt-len 512] [--gen-len 128] [--rounds 3]

Alternates, in one process: `edgellm bench`'s measurement (the core stepped directly, no text), a
streaming `Engine.completions.create` (detokenization, stop strings, response objects, the thread
hand-off), and the same request non-streaming; decode tokens/s of each, and the API's cost per token
relative to the bench figure.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from edgellm import Engine
from edgellm.bench import BenchSession


def api_round(engine: Engine, prompt: list[int], gen_len: int, stream: bool) -> float:
    """Decode tokens/s through the Engine API (streaming: by wall clock, first token to last)."""
    r = engine.completions.create(prompt=prompt, max_tokens=gen_len + 1, temperature=0, ignore_eos=True,
                                  stream=stream)
    if not stream:
        return r.usage.extra["decode_tokens_per_s"]
    stamps = [time.perf_counter() for _ in r]
    return gen_len / (stamps[-2] - stamps[0])  # the last chunk carries only the finish reason


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = random.Random(0)
    bench = BenchSession(args.model, prompt_len=args.prompt_len, gen_len=args.gen_len, log=lambda *_: None)
    results: dict[str, list[float]] = {"bench_core": [], "engine_stream": [], "engine_nonstream": []}
    with Engine(args.model) as engine:
        vocab = bench.vocab
        bench.run_once()
        for _ in range(args.rounds):
            results["bench_core"].append(bench.run_once()[1])
            for key, stream in (("engine_stream", True), ("engine_nonstream", False)):
                prompt = [rng.randrange(vocab) for _ in range(args.prompt_len)]  # fresh: no prefix reuse
                results[key].append(api_round(engine, prompt, args.gen_len, stream))
    best = {k: max(v) for k, v in results.items()}
    report = {"decode_tokens_per_s": results, "best": best,
              "api_over_bench": {k: best["bench_core"] / best[k] for k in ("engine_stream", "engine_nonstream")}}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for k, v in best.items():
        print(f"{k:>18}: {v:7.1f} tok/s (runs: {', '.join(f'{x:.1f}' for x in results[k])})")
    for k, v in report["api_over_bench"].items():
        print(f"a token through {k} costs {v:.2f}x what bench reports")


if __name__ == "__main__":
    main()

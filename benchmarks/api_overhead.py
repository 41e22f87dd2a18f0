"""What a token costs through the API versus inside the engine step (the model).

    python benchmarks/api_overhead.py [MODEL] [--prompt-len 512] [--gen-len 128] [--rounds 3] [--threads 2]

Alternates, in one process: `edgellm bench`'s measurement (the core stepped directly, no text), a
streaming `Engine.completions.create` (detokenization, stop strings, response objects, the thread
hand-off), and the same request non-streaming; decode tokens/s of each, and the API's cost per token
relative to the bench figure.

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
        inner = runner.step

        def step(chunks):
            t = time.perf_counter()
            try:
                return inner(chunks)
            finally:
                self.total += time.perf_counter() - t

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = random.Random(0)
    bench = BenchSession(args.model, prompt_len=args.prompt_len, gen_len=args.gen_len, threads=args.threads,
                         log=lambda *_: None)
    results: dict[str, list[float]] = {"bench_core": [], "engine_stream": [], "engine_nonstream": []}
    outside: dict[str, list[float]] = {"bench_core": [], "engine_stream": []}
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
    best = {k: max(v) for k, v in results.items()}
    report = {"decode_tokens_per_s": results, "best": best,
              "api_over_bench": {k: best["bench_core"] / best[k] for k in ("engine_stream", "engine_nonstream")},
              "outside_step_fraction": {k: min(v) for k, v in outside.items()}}
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


if __name__ == "__main__":
    main()

"""Decode tokens/s with and without speculative decoding, and the acceptance rate.

    python benchmarks/speculative.py [MODEL] [--rounds 3] [--gen-len 128] [--threads 2]
    python benchmarks/speculative.py --draft-target DIR --draft DIR   # small_draft on random models

MODEL defaults to the bundled SmolLM2-135M-Instruct (q4f16_1). Two prompts: one asking to repeat a
paragraph with a small edit (prompt lookup shines) and an ordinary chat question. Plain and ngram
engines run alternately, `--rounds` times, so a loaded machine's drift hits both; the speedup is the
median of the per-round ratios. With --draft-target/--draft (converted dirs of the same vocabulary,
e.g. from benchmarks/random_model.py), the same comparison for small_draft over token-id prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from edgellm import Engine

PARAGRAPH = ("The lighthouse stood on a rocky point at the edge of the bay. Every evening the keeper climbed "
             "the one hundred and twelve steps, trimmed the wick, polished the great lens, and watched the "
             "beam sweep across the water. Ships passing in the night counted its flashes to know where they "
             "were, and the fishermen of the village said that as long as the light turned, no one would be "
             "lost at sea.")
PROMPTS = {
    "repeat": f"Repeat the following paragraph exactly, but replace 'keeper' with 'guardian':\n\n{PARAGRAPH}",
    "chat": "Give me some advice for a first trip to Japan.",
}


def decode_rate(engine: Engine, prompt: str, gen_len: int) -> dict:
    r = engine.chat.completions.create(messages=[{"role": "user", "content": prompt}], temperature=0,
                                       max_tokens=gen_len)
    extra = r.usage.extra or {}
    return {"tokens": r.usage.completion_tokens, "decode_tokens_per_s": extra["decode_tokens_per_s"],
            "acceptance_rate": extra.get("acceptance_rate", 0.0), "draft_tokens": extra.get("draft_tokens", 0),
            "text": r.choices[0].message.content}


def compare(engines: dict[str, Engine], run, rounds: int) -> dict:
    """Alternate the engines `rounds` times; per engine the best run, and the median per-round ratio."""
    names = list(engines)
    runs = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            runs[n].append(run(engines[n]))
    base = names[0]
    out = {}
    for n in names:
        best = max(runs[n], key=lambda r: r["decode_tokens_per_s"])
        ratios = [r["decode_tokens_per_s"] / b["decode_tokens_per_s"] for r, b in zip(runs[n], runs[base])]
        out[n] = {**{k: v for k, v in best.items() if k != "text"}, "speedup_median": statistics.median(ratios),
                  "speedups": ratios}
    # round by round (a later round may reuse the prompt's cached prefix, whose last rows are computed
    # by another kernel than a full prefill's: at a near-tie that alone can change a greedy token)
    out["identical_text"] = all(r["text"] == b["text"] for n in names for r, b in zip(runs[n], runs[base]))
    return out


def token_run(engine: Engine, gen_len: int):
    def run(eng: Engine) -> dict:
        prompt = [(i * 7919) % 30000 + 100 for i in range(64)]
        t0 = time.perf_counter()
        r = eng.completions.create(prompt=prompt, max_tokens=gen_len, temperature=0, ignore_eos=True)
        extra = r.usage.extra or {}
        return {"tokens": r.usage.completion_tokens, "decode_tokens_per_s": extra["decode_tokens_per_s"],
                "acceptance_rate": extra.get("acceptance_rate", 0.0), "wall_s": time.perf_counter() - t0,
                "text": r.choices[0].text}
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spec-draft-length", type=int, default=4)
    ap.add_argument("--draft-target", default=None, help="a target model dir for the small_draft comparison")
    ap.add_argument("--draft", default=None, help="its draft model dir (same vocabulary)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result: dict = {}
    common = {"threads": args.threads, "max_num_sequence": 1}
    if args.draft_target:
        engines = {"plain": Engine(args.draft_target, **common),
                   "small_draft": Engine(args.draft_target, speculative_mode="small_draft",
                                         additional_models=args.draft, spec_draft_length=args.spec_draft_length,
                                         **common)}
        run = token_run(engines["plain"], args.gen_len)
        for e in engines.values():
            run(e)  # warm-up
        result["small_draft"] = compare(engines, run, args.rounds)
    else:
        engines = {"plain": Engine(args.model, **common),
                   "ngram": Engine(args.model, speculative_mode="ngram", spec_draft_length=args.spec_draft_length,
                                   **common)}
        for e in engines.values():
            decode_rate(e, "Hi", 8)  # warm-up
        for name, prompt in PROMPTS.items():
            result[name] = compare(engines, lambda e, p=prompt: decode_rate(e, p, args.gen_len), args.rounds)
    for e in engines.values():
        e.terminate()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'prompt':>12} {'engine':>12} {'decode tok/s':>13} {'speedup':>8} {'accept':>7} {'tokens':>7}")
    for prompt, res in result.items():
        for name, r in res.items():
            if name == "identical_text":
                continue
            print(f"{prompt:>12} {name:>12} {r['decode_tokens_per_s']:>13.1f} {r['speedup_median']:>7.2f}x "
                  f"{r['acceptance_rate']:>7.0%} {r['tokens']:>7}")
        print(f"{prompt:>12} identical greedy text: {res['identical_text']}")


if __name__ == "__main__":
    main()

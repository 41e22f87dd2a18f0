"""`edgellm bench`: prefill (pp) and decode (tg) tokens/s, like llama-bench's pp512 / tg128.

Measured through the engine's own machinery -- the model as `Engine` loads it, its KV pool,
scheduler, `ModelRunner` (at the chosen --opt) and sampler -- minus only text decoding. One
repetition: `batch` prompts of `prompt_len` random token ids are prefilled (pp = prompt tokens /
time until every sequence has its first token), then each sequence decodes `gen_len` more tokens
greedily (tg = generated tokens / decode time). Mean and standard deviation over `repeat`
repetitions after one warm-up.

It also reports the bytes of weights one decode step reads (every layer's weights, the full
output matrix, one embedding row per sequence) and, against a measured read bandwidth, the
fraction of the memory-bandwidth limit the decode speed represents.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgellm.engine.options import DEFAULT_OPT
from edgellm.errors import UserError


def measure_bandwidth(threads: int | None = None, mib: int = 512, repeat: int = 5) -> float:
    """Read bandwidth in bytes/s over a `mib` MiB buffer (far larger than any cache).

    The best of `repeat` passes of several readers -- torch's sum, and the native kernels' AVX-512
    read with 1, 4, 8 and 16 interleaved streams per thread (more streams per core reach more of the
    DRAM bandwidth) -- so the figure is what the machine can deliver, not what one loop reaches.
    """
    from edgellm.quantization import kernels

    n_threads = threads or torch.get_num_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        x = torch.ones(mib * (1 << 20) // 4)
        readers = [lambda: x.sum()]
        lib = kernels.library()
        if lib is not None:
            for streams in (1, 4, 8, 16):
                readers.append(lambda s=streams: lib.el_read(x.data_ptr(), x.numel() * 4, n_threads, s))
        best = float("inf")
        for read in readers:
            read()
            for _ in range(repeat):
                t = time.perf_counter()
                read()
                best = min(best, time.perf_counter() - t)
        return x.numel() * 4 / best
    finally:
        torch.set_num_threads(old)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def weight_bytes_per_token(model: nn.Module, batch: int = 1) -> int:
    """Bytes of weights one decode step of `batch` sequences reads.

    Every layer's weights once, the output matrix in full (the tied embedding when tied), and one
    embedding row per sequence; rotary tables are not weights.
    """
    from edgellm.quantization.layers import QuantEmbedding

    tied = bool(getattr(getattr(model, "cfg", None), "tie_word_embeddings", False))
    total = 0
    seen: set[int] = set()
    for mod in model.modules():
        own = [t for t in list(mod._parameters.values()) + list(mod._buffers.values()) if t is not None]
        packed = getattr(mod, "packed", None)
        if isinstance(mod, (QuantEmbedding, nn.Embedding)):
            rows = mod.num_embeddings
            size = packed.nbytes if packed is not None else sum(_nbytes(t) for t in own)
            total += size if tied else size * min(batch, rows) // rows
            seen.update(id(t) for t in own)
            continue
        if packed is not None:
            total += packed.nbytes - _nbytes(packed.bias)
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            skip = name in ("cos", "sin") or name in getattr(mod, "_non_persistent_buffers_set", ())
            if t is None or id(t) in seen or skip:
                continue
            seen.add(id(t))
            total += _nbytes(t)
    return total


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def _peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:
        return None


class BenchSession:
    """A model built by `build_engine` exactly as `Engine` builds it; `run_once()` is one repetition."""

    def __init__(self, model: str | Path | None, *, threads: int | None = None, opt: str = DEFAULT_OPT,
                 device: str = "cpu", batch: int = 1, prompt_len: int = 512, gen_len: int = 128,
                 quantization: str = "q4f16_1", use_mmap: bool = False, kv_cache_dtype: str = "auto",
                 seed: int = 0, log=print, model_lib: str | Path | None = None, precision: str = "normal",
                 tensor_parallel_shards: int | None = None, lora_adapters: dict[str, str] | None = None):
        from edgellm.config import load_chat_config
        from edgellm.engine.build import build_engine, pick_device
        from edgellm.engine.options import make_options
        from edgellm.models.loader import arch_config, runtime_context
        from edgellm.prepare import prepare_model

        if prompt_len < 1 or gen_len < 1 or batch < 1:
            raise UserError("--prompt-len, --gen-len and --batch must be at least 1")
        self.device = pick_device(device)
        self.model_dir = prepare_model(model, quantization=quantization, log=log)
        self.config = load_chat_config(self.model_dir)
        arch = arch_config(self.config)
        ctx = runtime_context(self.config, arch)
        if prompt_len + gen_len + 1 > ctx:
            raise UserError(f"--prompt-len + --gen-len = {prompt_len + gen_len} exceeds the model's context "
                            f"window of {ctx} tokens")
        # One step prefills every prompt; the KV budget holds them all; no prefix may serve a prompt.
        shards = tensor_parallel_shards or self.config.tensor_parallel_shards or 1
        per_rank = threads or max(1, torch.get_num_threads() // shards)  # the cores are shared by the ranks
        opts = make_options({"threads": per_rank, "opt": opt, "use_mmap": use_mmap,
                             "tensor_parallel_shards": shards,
                             "kv_cache_dtype": kv_cache_dtype, "max_num_sequence": batch, "precision": precision,
                             "prefill_chunk_size": prompt_len * batch, "reuse_kv": False,
                             "max_total_seq_length": batch * (prompt_len + gen_len + 256) * 2,
                             "lora_adapters": lora_adapters})
        self.threads, self.precision, self.shards = opts.threads, precision, shards
        t = time.perf_counter()
        self.core = build_engine(self.model_dir, opts, self.device, model_lib, config=self.config)
        self.load_s = time.perf_counter() - t
        self.model, self.pool, self.runner = self.core.model, self.core.pool, self.core.runner
        self.model_lib = model_lib
        self.opt, self.batch, self.prompt_len, self.gen_len = opts.opt, batch, prompt_len, gen_len
        self.rng = random.Random(seed)
        self.vocab = min(self.config.vocab_size, arch.vocab_size)
        self.fused = self.runner.fused is not None
        # run-time LoRA adapters, given to the batch's requests in turn
        self.adapters = [self.core.lora.get(n) for n in opts.lora_adapters] if opts.lora_adapters else []

    def run_once(self, prompt_ids: list[int] | None = None) -> tuple[float, float]:
        """(prefill tokens/s, decode tokens/s) of one repetition (random prompts unless given)."""
        from edgellm.engine.request import Request, SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=self.gen_len + 1, ignore_eos=True)
        reqs = []
        for i in range(self.batch):
            prompt = list(prompt_ids) if prompt_ids is not None else [
                self.rng.randrange(self.vocab) for _ in range(self.prompt_len)]
            lora = self.adapters[i % len(self.adapters)] if self.adapters else None
            reqs.append(Request(f"bench-{i}", prompt, params, lora=lora))
            self.core.add(reqs[-1])
        seqs = [r.sequences[0] for r in reqs]
        t0 = time.perf_counter()
        t_prefilled = None
        while self.core.has_work:
            self.core.step()
            if t_prefilled is None and all(s.output_ids for s in seqs):
                t_prefilled = time.perf_counter()
        t_end = time.perf_counter()
        pp = sum(len(s.prompt_ids) for s in seqs) / (t_prefilled - t0)
        tg = sum(len(s.output_ids) - 1 for s in seqs) / (t_end - t_prefilled)
        return pp, tg


def run_bench(model: str | Path | None = None, *, prompt_len: int = 512, gen_len: int = 128, batch: int = 1,
              threads: int | None = None, repeat: int = 5, opt: str = DEFAULT_OPT, device: str = "cpu",
              quantization: str = "q4f16_1", use_mmap: bool = False, kv_cache_dtype: str = "auto",
              bandwidth: bool = True, log=print, model_lib: str | Path | None = None,
              precision: str = "normal", tensor_parallel_shards: int | None = None,
              lora_adapters: dict[str, str] | None = None) -> dict[str, Any]:
    """Benchmark a model; returns the report as a dict (see `format_report`). With `lora_adapters`
    ({name: dir}), the batch's requests use them in turn (request i the (i mod n)-th)."""
    if repeat < 1:
        raise UserError("--repeat must be at least 1")
    s = BenchSession(model, threads=threads, opt=opt, device=device, batch=batch, prompt_len=prompt_len,
                     gen_len=gen_len, quantization=quantization, use_mmap=use_mmap,
                     kv_cache_dtype=kv_cache_dtype, log=log, model_lib=model_lib, precision=precision,
                     tensor_parallel_shards=tensor_parallel_shards,
                     lora_adapters=lora_adapters)
    try:
        s.run_once()  # warm-up: first-touch of the weights, caches, allocator
        pps, tgs = [], []
        for _ in range(repeat):
            pp, tg = s.run_once()
            pps.append(pp)
            tgs.append(tg)
    finally:
        close = getattr(s.runner, "close", None)  # a tensor-parallel runner stops its workers
        if close is not None:
            close()
    from edgellm.quantization import kernels

    weights = s.model if s.model is not None else getattr(s.runner, "model", None)  # a .pt2 holds its own
    wbytes = weight_bytes_per_token(weights, batch) if weights is not None else 0
    report: dict[str, Any] = {
        "model": s.model_dir.name,
        "model_dir": str(s.model_dir),
        "model_type": s.config.model_type,
        "quantization": s.config.quantization,
        "threads": s.threads,
        "device": s.device,
        "opt": s.opt,
        "precision": s.precision,
        "fused_decode": s.fused and not s.adapters,
        "kernels": kernels.isa() if s.device == "cpu" else None,  # e.g. "avx512-vnni+amx"
        "lora_adapters": len(s.adapters),
        "tensor_parallel_shards": s.shards,
        # a compiled library keeps its own cache
        "kv_cache_dtype": None if model_lib is not None else str(s.pool.dtype).replace("torch.", ""),
        "model_lib": str(model_lib) if model_lib is not None else None,
        "batch": batch,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "repeat": repeat,
        "pp": _stats(pps),
        "tg": _stats(tgs),
        "load_s": s.load_s,
        "weight_bytes_per_token": wbytes,
        "peak_rss_bytes": _peak_rss_bytes(),
    }
    if bandwidth and s.device == "cpu" and wbytes:
        bw = measure_bandwidth(s.threads)
        steps_per_s = report["tg"]["mean"] / batch
        report["bandwidth_bytes_per_s"] = bw
        report["bandwidth_limit_tokens_per_s"] = bw / wbytes * batch
        report["bandwidth_fraction"] = wbytes * steps_per_s / bw
    return report


def format_report(r: dict[str, Any]) -> str:
    """A llama-bench style table plus the bandwidth line."""
    name = r["model"]
    head = f"| {'model':<40} | {'quant':<8} | {'threads':>7} | {'opt':<3} | {'test':>12} | {'t/s':>20} |"
    sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    rows = [head, sep]
    b = f"x{r['batch']}" if r["batch"] > 1 else ""
    for key, test in (("pp", f"pp{r['prompt_len']}{b}"), ("tg", f"tg{r['gen_len']}{b}")):
        v = r[key]
        rows.append(f"| {name[:40]:<40} | {r['quantization']:<8} | {r['threads']:>7} | {r['opt']:<3} | {test:>12} | "
                    f"{v['mean']:>10.2f} ± {v['std']:<7.2f} |")
    lines = ["\n".join(rows)]
    wb = r["weight_bytes_per_token"]
    line = f"weights read per decode step: {wb / 1e6:.1f} MB"
    if "bandwidth_bytes_per_s" in r:
        line += (f"; measured read bandwidth {r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s -> limit "
                 f"{r['bandwidth_limit_tokens_per_s']:.1f} tokens/s; decode reaches "
                 f"{100 * r['bandwidth_fraction']:.1f}% of it")
    lines.append(line)
    if r.get("peak_rss_bytes"):
        lines.append(f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB; load {r['load_s']:.2f} s; "
                     f"device {r['device']}; fused decode {'on' if r['fused_decode'] else 'off'}; "
                     f"KV cache {r.get('kv_cache_dtype') or '-'}"
                     + (f"; kernels {r['kernels']}" if r.get("kernels") else "")
                     + (f"; model library {r['model_lib']}" if r.get("model_lib") else "")
                     + (f"; {r['tensor_parallel_shards']} tensor-parallel shards (rank 0's RSS)"
                        if r.get("tensor_parallel_shards", 1) > 1 else ""))
    return "\n".join(lines)

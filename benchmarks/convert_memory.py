"""Peak memory and wall time of `edgellm convert_weight` on a Qwen2.5-1.5B-shaped checkpoint.

The random checkpoint (bf16, tied embeddings, one safetensors file per layer plus an index) is
written tensor by tensor, in row chunks, straight into the safetensors format: the whole model
is never in memory, here or anywhere else. The conversion then runs in a subprocess whose
resident memory is sampled (psutil: total, anonymous and file-backed pages) and whose kernel
peak (getrusage RUSAGE_CHILDREN ru_maxrss) is read when it exits.

    python benchmarks/convert_memory.py [--quantization q4f16_1] [--layers 28] [--keep DIR]

Target: peak RSS under 1.5 GiB for q4f16_1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

QWEN25_15B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 151643,
    "eos_token_id": 151645, "use_sliding_window": False, "sliding_window": 32768,
}
ROWS_PER_CHUNK = 2048
GiB = 1024 ** 3


def layer_shapes(cfg: dict, i: int) -> dict[str, list[int]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    p = f"model.layers.{i}."
    shapes = {
        p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
        p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
        p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
        p + "mlp.gate_proj.weight": [inter, h], p + "mlp.up_proj.weight": [inter, h],
        p + "mlp.down_proj.weight": [h, inter],
    }
    if cfg["model_type"] == "qwen2":
        shapes.update({p + "self_attn.q_proj.bias": [h], p + "self_attn.k_proj.bias": [kv],
                       p + "self_attn.v_proj.bias": [kv]})
    return shapes


def write_safetensors(path: Path, shapes: dict[str, list[int]], gen: torch.Generator) -> int:
    """Write random bf16 tensors in the safetensors format, a few rows at a time."""
    header, offset = {}, 0
    for name in sorted(shapes):
        n = 2
        for s in shapes[name]:
            n *= s
        header[name] = {"dtype": "BF16", "shape": shapes[name], "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in sorted(shapes):
            shape = shapes[name]
            if len(shape) == 1:  # norms near 1, biases near 0
                base = 1.0 if name.endswith("norm.weight") else 0.0
                t = base + 0.05 * torch.randn(shape[0], generator=gen)
                f.write(t.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
                continue
            for start in range(0, shape[0], ROWS_PER_CHUNK):
                rows = min(ROWS_PER_CHUNK, shape[0] - start)
                t = torch.randn(rows, shape[1], generator=gen) * 0.02
                f.write(t.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
    return offset


def build_checkpoint(out: Path, cfg: dict) -> int:
    """config.json, one safetensors file per layer (+ embedding and final norm), index.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(0)
    files = [{"model.embed_tokens.weight": [cfg["vocab_size"], cfg["hidden_size"]]}]
    files += [layer_shapes(cfg, i) for i in range(cfg["num_hidden_layers"])]
    files.append({"model.norm.weight": [cfg["hidden_size"]]})
    weight_map, total = {}, 0
    for k, shapes in enumerate(files):
        fname = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        total += write_safetensors(out / fname, shapes, gen)
        weight_map.update({name: fname for name in shapes})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


class Sampler(threading.Thread):
    """Peak RSS (and its anonymous / file-backed parts) of a process tree, sampled."""

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = self.peak_anon = self.peak_file = 0
        self.stop = threading.Event()

    @staticmethod
    def _status(pid: int) -> tuple[int, int, int]:
        vals = {}
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                        key, v = line.split(":")
                        vals[key] = int(v.split()[0]) * 1024
        except OSError:
            return 0, 0, 0
        return vals.get("VmRSS", 0), vals.get("RssAnon", 0), vals.get("RssFile", 0)

    def run(self) -> None:
        import psutil

        try:
            proc = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                pids = [self.pid] + [c.pid for c in proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = anon = fil = 0
            for p in pids:
                r, a, f = self._status(p)
                rss, anon, fil = rss + r, anon + a, fil + f
            self.peak = max(self.peak, rss)
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_file = max(self.peak_file, fil)
            time.sleep(self.interval)


def run_convert(src: Path, out: Path, quantization: str) -> dict:
    cmd = [sys.executable, "-m", "edgellm", "convert_weight", str(src), "--quantization", quantization,
           "-o", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"convert_weight failed ({proc.returncode}):\n{stderr}")
    manifest = json.loads((out / "tensor-cache.json").read_text())
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
        "maxrss": ru.ru_maxrss * 1024,  # KiB on Linux
        "peak_sampled": sampler.peak, "peak_anon": sampler.peak_anon, "peak_file": sampler.peak_file,
        "shards": len(manifest["records"]),
        "out_bytes": sum(s["nbytes"] for s in manifest["records"]),
        "stdout": stdout.strip(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantization", default="q4f16_1")
    ap.add_argument("--layers", type=int, default=28, help="fewer layers for a quick run")
    ap.add_argument("--model-type", default="auto", help="qwen2 (default when available) or llama")
    ap.add_argument("--keep", default=None, help="keep checkpoint and output under this directory")
    ap.add_argument("--target-gib", type=float, default=1.5)
    args = ap.parse_args()

    cfg = dict(QWEN25_15B, num_hidden_layers=args.layers)
    mt = args.model_type
    if mt == "auto":
        import importlib.util

        mt = "qwen2" if importlib.util.find_spec("edgellm.models.qwen2") else "llama"
    if mt == "llama":  # same shapes; llama has no q/k/v biases
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="edgellm-convmem-"))
    try:
        src, out = work / "hf", work / "out"
        t0 = time.perf_counter()
        total = build_checkpoint(src, cfg)
        gen_s = time.perf_counter() - t0
        print(f"checkpoint: {mt}, {args.layers} layers, {total / GiB:.2f} GiB bf16 safetensors "
              f"in {len(list(src.glob('*.safetensors')))} files (written in {gen_s:.1f} s, "
              f"generator peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")
        r = run_convert(src, out, args.quantization)
        rows = [
            ("quantization", args.quantization),
            ("wall time", f"{r['wall_s']:.1f} s (load average {os.getloadavg()[0]:.1f} on "
                          f"{os.cpu_count()} CPUs)"),
            ("CPU time (user+sys)", f"{r['cpu_s']:.1f} s"),
            ("peak RSS (kernel ru_maxrss)", f"{r['maxrss'] / GiB:.3f} GiB"),
            ("peak RSS (sampled)", f"{r['peak_sampled'] / GiB:.3f} GiB"),
            ("  anonymous pages (peak)", f"{r['peak_anon'] / GiB:.3f} GiB"),
            ("  file-backed pages (peak)", f"{r['peak_file'] / GiB:.3f} GiB"),
            ("input size", f"{total / GiB:.3f} GiB"),
            ("output size", f"{r['out_bytes'] / GiB:.3f} GiB in {r['shards']} shards"),
            ("target", f"< {args.target_gib} GiB: "
                       f"{'OK' if r['maxrss'] < args.target_gib * GiB else 'EXCEEDED'}"),
        ]
        width = max(len(k) for k, _ in rows)
        print("-" * (width + 30))
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        print("-" * (width + 30))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""What a model library is built for: devices, output suffixes, overrides and the metadata record.

Devices (MLC-LLM's names where they exist):
  cpu, cuda, mps      AOTInductor package of the step program (.pt2, also written as .so/.dylib)
  android, iphone     ExecuTorch program (.pte) with the XNNPACK delegate (CPU of the phone)
  metal, metal:x86-64 aliases of mps: Metal through PyTorch's MPS backend (build on that Mac)
Any of them with `-o NAME.tar`: an archive holding the device's artifact and metadata.json.
vulkan, webgpu, opencl, rocm and the rest have no backend here: a clear error lists the devices.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from edgellm.config import VERSION, ChatConfig
from edgellm.errors import UserError

DEVICES = ("cpu", "cuda", "mps", "android", "iphone")
ALIASES = {"metal": "mps", "metal:x86-64": "mps", "ios": "iphone", "llvm": "cpu", "x86-64": "cpu"}
UNSUPPORTED = ("vulkan", "webgpu", "opencl", "rocm", "wasm", "macabi")
AOTI_DEVICES = ("cpu", "cuda", "mps")
MOBILE_DEVICES = ("android", "iphone")
AOTI_SUFFIXES = (".pt2", ".so", ".dylib")
PTE_SUFFIXES = (".pte",)
OVERRIDE_KEYS = ("context_window_size", "prefill_chunk_size", "max_batch_size", "sliding_window",
                 "tensor_parallel_shards")
OPT_LEVELS = ("O0", "O1", "O2", "O3")
LIB_FORMAT = "edgellm-model-lib"
METADATA_NAME = "metadata.json"


def device_list() -> str:
    return ", ".join(DEVICES) + " (metal and metal:x86-64 mean mps)"


def normalize_device(device: str | None, output: Path | None = None) -> str:
    """A device of DEVICES; None/'auto' picks from the output suffix, then from this machine."""
    if device in (None, "", "auto"):
        if output is not None and output.suffix.lower() in PTE_SUFFIXES:
            return "android"
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    d = device.strip().lower()
    base = d.split(":")[0]
    if d in ALIASES:
        return ALIASES[d]
    if base == "cuda" or base in DEVICES:
        return base
    if base in ALIASES:
        return ALIASES[base]
    if base in ("vulkan", "opencl"):
        raise UserError(f"device {base}: not supported here: {_gpu_delegate_missing(base)}; "
                        f"supported devices: {device_list()}")
    hint = " (no such backend in edgellm)" if base in UNSUPPORTED else ""
    raise UserError(f"unknown device {device!r}{hint}; supported devices: {device_list()}")


def _gpu_delegate_missing(base: str) -> str:
    """What is missing to build a phone-GPU program for `base` with ExecuTorch (read from the installed
    runtime library's backend names: importing ExecuTorch here would print warnings)."""
    import importlib.util
    import mmap

    if base == "opencl":
        return "ExecuTorch has no OpenCL delegate"
    spec = importlib.util.find_spec("executorch")
    libs = [p for loc in (spec.submodule_search_locations or []) if spec
            for p in (Path(loc) / "extension" / "pybindings").glob("_portable_lib*")] if spec else []
    if not libs:
        return "ExecuTorch (with its Vulkan delegate) is not installed"
    with open(libs[0], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        has_vulkan = m.find(b"VulkanBackend") >= 0
    if not has_vulkan:
        return ("the installed ExecuTorch runtime has no VulkanBackend (PyPI's build registers none), "
                "so a Vulkan program could neither be checked nor run here")
    return "edgellm does not lower its models to ExecuTorch's Vulkan delegate yet"


def artifact_kind(device: str) -> str:
    return "pte" if device in MOBILE_DEVICES else "pt2"


def check_output(output: Path, device: str) -> str:
    """'pt2', 'pte' or 'tar' for an output path that fits the device; UserError otherwise."""
    suffix = output.suffix.lower()
    if suffix == ".tar":
        return "tar"
    fits = PTE_SUFFIXES if device in MOBILE_DEVICES else AOTI_SUFFIXES
    if suffix in fits:
        return artifact_kind(device)
    want = ", ".join(fits + (".tar",))
    raise UserError(f"output {output.name!r}: suffix {suffix or '(none)'!r} does not fit device {device}; "
                    f"use one of {want}")


def check_device_available(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda: CUDA is not available on this machine (AOTInductor compiles for a GPU "
                        "it can see); compile on the CUDA machine or use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device mps (metal): Apple's MPS is not available on this machine; compile on the Mac "
                        "that will run the library, or use --device cpu")


def parse_overrides(text: str | dict | None) -> dict[str, int]:
    """'context_window_size=1024;prefill_chunk_size=128' (or a dict) -> validated ints."""
    if not text:
        return {}
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(";"):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise UserError(f"--overrides: {part!r} is not key=value")
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    out: dict[str, int] = {}
    for k, v in items:
        k = k.strip().replace("-", "_")
        if k == "sliding_window_size":
            k = "sliding_window"
        if k not in OVERRIDE_KEYS:
            raise UserError(f"--overrides: unknown key {k!r}; known keys: {', '.join(OVERRIDE_KEYS)}")
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise UserError(f"--overrides: {k} must be an integer, got {v!r}") from None
        if n <= 0 and not (k == "sliding_window" and n == -1):
            off = " (or -1 for no sliding window)" if k == "sliding_window" else ""
            raise UserError(f"--overrides: {k} must be positive{off}, got {n}")
        if k == "tensor_parallel_shards" and n > 1:
            raise UserError(f"--overrides: tensor_parallel_shards={n}: tensor parallelism is not supported yet "
                            "in compiled libraries; use 1")
        out[k] = n
    return out


def arch_fingerprint(model_type: str, quantization: str, arch) -> str:
    """Hash of what the compiled graph depends on: family, quantization and the architecture."""
    blob = json.dumps({"model_type": model_type, "quantization": quantization, "arch": asdict(arch)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_fingerprint(model_dir: Path) -> str | None:
    """Hash of the shard checksums in the model's tensor cache (None if it has none)."""
    for name in ("tensor-cache.json", "ndarray-cache.json"):
        p = model_dir / name
        if p.exists():
            try:
                recs = json.loads(p.read_text()).get("records", [])
            except (OSError, json.JSONDecodeError):
                return None
            sums = [str(r.get("md5sum") or r.get("nbytes")) for r in recs]
            return hashlib.sha256("|".join(sums).encode()).hexdigest()[:16]
    return None


def make_metadata(*, device: str, kind: str, cfg: ChatConfig, arch, model_dir: Path, overrides: dict,
                  max_len: int, chunk: int, max_batch: int, opt: str, extra: dict | None = None) -> dict:
    meta = {
        "format": LIB_FORMAT,
        "format_version": 1,
        "edgellm_version": VERSION,
        "torch_version": torch.__version__.split("+")[0],
        "device": device,
        "artifact": kind,
        "model_type": cfg.model_type,
        "quantization": cfg.quantization,
        "model_name": model_dir.name,
        "arch_fingerprint": arch_fingerprint(cfg.model_type, cfg.quantization, arch),
        "weights_fingerprint": weights_fingerprint(model_dir),
        "vocab_size": arch.vocab_size,
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "overrides": overrides,
        "context_window_size": max_len,
        "prefill_chunk_size": chunk,
        "max_batch_size": max_batch,
        "opt": opt,
    }
    meta.update(extra or {})
    return meta


def check_match(meta: dict, lib: str | Path, cfg: ChatConfig, arch, model_dir: Path) -> None:
    """UserError when the library was compiled for another model than MODEL."""
    if meta.get("format") != LIB_FORMAT:
        raise UserError(f"{lib}: not an edgellm model library (no edgellm metadata)")
    name = Path(lib).name
    want = f"{meta.get('model_type')} {meta.get('quantization')} ({meta.get('model_name')})"
    have = f"{cfg.model_type} {cfg.quantization} ({model_dir.name})"
    if meta.get("model_type") != cfg.model_type or meta.get("quantization") != cfg.quantization:
        raise UserError(f"model library {name} was compiled for {want}, not for {have}")
    if meta.get("arch_fingerprint") != arch_fingerprint(cfg.model_type, cfg.quantization, arch):
        raise UserError(f"model library {name} was compiled for {want} with a different architecture "
                        f"than {model_dir} (layers, sizes or rope differ); compile it for this model")
    if meta.get("artifact") == "pte":
        wf = weights_fingerprint(model_dir)
        if meta.get("weights_fingerprint") and wf and wf != meta["weights_fingerprint"]:
            raise UserError(f"model library {name} holds the weights of {meta.get('model_name')}, "
                            f"which differ from those in {model_dir}; compile it for this model")

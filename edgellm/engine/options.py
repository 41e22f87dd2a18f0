"""Runtime options of an engine, with MLC-LLM's and MNN-LLM's names, and `--overrides` parsing."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from edgellm.errors import UserError

# MNN-LLM / MLC-LLM spellings -> ours
ALIASES = {
    "max_new_tokens": "max_tokens",
    "quant_qkv": "kv_cache_dtype",
    "max_batch_size": "max_num_sequence",
    "thread_num": "threads",
    "num_threads": "threads",
    "max_total_sequence_length": "max_total_seq_length",
}
DEFAULT_OPT = "O2"  # the one default optimization level (engine, bench, compile)
OPT_LEVELS = ("O0", "O1", "O2", "O3")  # O3 is an alias of O2 (MLC-LLM's flag)
KV_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")
MODES = ("local", "interactive", "server")
SPECULATIVE_MODES = ("disable", "small_draft", "ngram")


@dataclass
class EngineOptions:
    """What `Engine(..., **options)`, `--overrides` and MNN-style configs can set."""

    mode: str = "local"
    max_num_sequence: int | None = None  # None = by mode: interactive 1, local 4, server 16
    max_total_seq_length: int | None = None  # KV budget in tokens; None = derived
    prefill_chunk_size: int | None = None  # None = from mlc-chat-config.json
    context_window_size: int | None = None  # None = from mlc-chat-config.json
    sliding_window_size: int | None = None
    reuse_kv: bool = True
    kv_cache_dtype: str = "auto"  # auto: float16 for models stored in float16 (MLC's choice), else float32
    use_mmap: bool = False
    threads: int | None = None
    max_tokens: int | None = None  # default max_tokens of a request
    opt: str = DEFAULT_OPT  # O0: reference eager; O1: native kernels; O2 (= O3): + one native call per decode step
    seed: int | None = None
    verify_weights: bool = True
    # MNN-LLM's runtime names (docs/runtime-options.md)
    kvcache_mmap: bool = False  # KV cache in memory-mapped files under tmp_path (RAM-short devices)
    tmp_path: str | None = None  # where kvcache_mmap's files go (default: the system temp dir)
    backend_type: str | None = None  # cpu, cuda, metal/mps: the device when device is "auto"
    memory: str = "low"  # low: weights stay quantized; high: whatever is fastest (may dequantize)
    precision: str | None = None  # MNN's: high = 16-bit activations (exact); normal (default) / low = int8 GEMM
    speculative_mode: str = "disable"  # small_draft: a draft model (additional_models); ngram: prompt lookup
    spec_draft_length: int = 4  # the most tokens drafted per step (adapted per sequence to its acceptance)
    additional_models: list[str] | str | None = None  # converted model dirs (";"-separated); the draft first
    # MLC's: split the model over this many processes (engine/distributed.py); None = mlc-chat-config.json's
    tensor_parallel_shards: int | None = None
    lora_adapters: dict[str, str] | str | None = None  # name -> PEFT / split adapter dir ("a=DIR;b=DIR" as text)

    def __post_init__(self) -> None:
        if self.precision is not None:
            from edgellm.quantization.kernels import check_precision

            check_precision(self.precision)
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if isinstance(self.kv_cache_dtype, int) or str(self.kv_cache_dtype).isdigit():
            # MNN's quant_qkv: 0 none; 1 int8 keys; 2 fp8 values; 3 int8 keys + fp8 values; 4 as 3 + int8
            # queries. The pool quantizes keys and values together, to int8 rows with a scale (values too:
            # as small as fp8 and more precise), so 1-4 all mean the int8 cache.
            q = int(self.kv_cache_dtype)
            if q not in (0, 1, 2, 3, 4):
                raise UserError(f"quant_qkv must be 0, 1, 2, 3 or 4 (as MNN-LLM), got {q}")
            self.kv_cache_dtype = "auto" if q == 0 else "int8"
        if self.kv_cache_dtype not in KV_DTYPES:
            raise UserError(f"kv_cache_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.memory not in ("low", "high"):
            raise UserError(f"memory must be low or high, got {self.memory!r}")
        if self.tmp_path is not None and not os.path.isdir(self.tmp_path):
            raise UserError(f"tmp_path {self.tmp_path}: no such directory")
        if self.backend_type is not None:
            self.backend_type = backend_device(self.backend_type)
        if self.opt not in OPT_LEVELS:
            raise UserError(f"opt must be O0..O3, got {self.opt!r}")
        if self.speculative_mode not in SPECULATIVE_MODES:
            raise UserError(f"speculative_mode must be one of {', '.join(SPECULATIVE_MODES)}, "
                            f"got {self.speculative_mode!r}")
        if isinstance(self.additional_models, str):
            self.additional_models = [m.strip() for m in self.additional_models.split(";") if m.strip()]
        self.additional_models = list(self.additional_models or [])
        self.lora_adapters = parse_lora_specs(self.lora_adapters)
        if self.speculative_mode == "small_draft" and not self.additional_models:
            raise UserError("speculative_mode=small_draft needs a draft model: additional_models=DIR "
                            "(--additional-models DIR)")
        for name, hi in (("max_num_sequence", 1 << 16), ("spec_draft_length", 64), ("max_total_seq_length", 1 << 30),
                         ("prefill_chunk_size", 1 << 24), ("context_window_size", 1 << 24), ("threads", 4096),
                         ("max_tokens", 1 << 24), ("tensor_parallel_shards", 64)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= hi):
                raise UserError(f"{name} must be positive (an integer in 1..{hi}), got {v!r}")

    def kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache element type for a model stored in `model_dtype`."""
        if self.kv_cache_dtype == "auto":
            return torch.float16 if model_dtype == torch.float16 else torch.float32
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int8": torch.int8}[self.kv_cache_dtype]

    @property
    def num_sequences(self) -> int:
        if self.max_num_sequence:
            return self.max_num_sequence
        return {"interactive": 1, "local": 4, "server": 16}[self.mode]

    @property
    def thread_count(self) -> int:
        return self.threads or os.cpu_count() or 1


# MNN-LLM's backend_type -> torch device
BACKENDS = {"cpu": "cpu", "cuda": "cuda", "metal": "mps", "mps": "mps", "auto": "auto"}


def backend_device(backend: str) -> str:
    b = str(backend).strip().lower()
    if b not in BACKENDS:
        raise UserError(f"backend_type {backend!r}: choose cpu, cuda or metal (opencl and vulkan have no "
                        "backend in edgellm)")
    return BACKENDS[b]


_FIELDS = {f.name: f for f in fields(EngineOptions)}


def _coerce(name: str, raw: str | object):
    if not isinstance(raw, str):
        return raw
    ftype = str(_FIELDS[name].type)
    if "bool" in ftype:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{name} must be true or false, got {raw!r}")
    if "int" in ftype and name != "kv_cache_dtype":
        try:
            return int(raw)
        except ValueError:
            raise UserError(f"{name} must be an integer, got {raw!r}") from None
    return raw


def make_options(values: dict | None = None) -> EngineOptions:
    """EngineOptions from a dict that may use alias names and string values."""
    kwargs = {}
    for key, raw in (values or {}).items():
        name = ALIASES.get(key, key)
        if name not in _FIELDS:
            raise UserError(f"unknown option {key!r}; known: {', '.join(sorted(set(_FIELDS) | set(ALIASES)))}")
        kwargs[name] = _coerce(name, raw)
    return EngineOptions(**kwargs)


def parse_overrides(text: str | None) -> dict[str, str]:
    """"k=v;k=v" -> {k: v}; a malformed piece is a UserError."""
    out: dict[str, str] = {}
    for piece in (text or "").split(";"):
        piece = piece.strip()
        if not piece:
            continue
        if "=" not in piece:
            raise UserError(f"bad override {piece!r}: expected key=value pairs separated by ';'")
        key, value = (s.strip() for s in piece.split("=", 1))
        if not key or not value:
            raise UserError(f"bad override {piece!r}: expected key=value pairs separated by ';'")
        out[key] = value
    return out


def parse_lora_specs(specs: dict | list | str | None) -> dict[str, str]:
    """{name: dir} from a dict, "name=DIR" strings (the CLI's repeatable --lora) or one "a=DIR,b=DIR" text."""
    if isinstance(specs, dict):
        return {str(k): str(v) for k, v in specs.items()}
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = str(spec).partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"bad LoRA adapter {spec!r}: expected NAME=DIR")
        if name.strip() in out:
            raise UserError(f"LoRA adapter name {name.strip()!r} is given twice")
        out[name.strip()] = path.strip()
    return out


def speculative_overrides(args) -> dict:
    """The serve/chat flags --speculative-mode and --additional-models as option values."""
    out: dict = {}
    if getattr(args, "speculative_mode", None):
        out["speculative_mode"] = args.speculative_mode
    if getattr(args, "additional_models", None):
        out["additional_models"] = list(args.additional_models)
    return out


def lora_overrides(args) -> dict:
    """The serve/chat/bench flag --lora NAME=DIR (repeatable) as the lora_adapters option."""
    specs = getattr(args, "lora", None)
    return {"lora_adapters": parse_lora_specs(specs)} if specs else {}

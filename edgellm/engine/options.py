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

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if isinstance(self.kv_cache_dtype, int) or str(self.kv_cache_dtype).isdigit():
            # MNN's quant_qkv: 0 = no quantization, anything else = int8 keys/values
            self.kv_cache_dtype = "auto" if int(self.kv_cache_dtype) == 0 else "int8"
        if self.kv_cache_dtype not in KV_DTYPES:
            raise UserError(f"kv_cache_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.opt not in OPT_LEVELS:
            raise UserError(f"opt must be O0..O3, got {self.opt!r}")
        for name, hi in (("max_num_sequence", 1 << 16), ("max_total_seq_length", 1 << 30),
                         ("prefill_chunk_size", 1 << 24), ("context_window_size", 1 << 24), ("threads", 4096),
                         ("max_tokens", 1 << 24)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= hi):
                raise UserError(f"{name} must be an integer in 1..{hi}, got {v!r}")

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

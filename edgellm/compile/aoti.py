"""AOTInductor model libraries (.pt2) for cpu, cuda and mps.

The library holds the compiled step program, not the weights (like an MLC-LLM model library):
`step(ids [T], positions [T], key_pos [S], k_caches, v_caches) -> logits [1, vocab]` with T
dynamic in 1..prefill_chunk_size (one graph serves prefill chunks and single-token decode) and
S = start + T dynamic in 1..context_window_size; k_caches/v_caches are lists of one
[KVH, context, D] tensor per layer (the KV pool's layout), owned by the caller and written in place.

Two kinds of step program:
- cpu with the native kernels (format_version 2, metadata `native_ops: true`): the quantized
  products, the embedding and each layer's KV write + attention are calls to the
  `edgellm::qlinear` / `edgellm::qgather` / `edgellm::attend` custom operators
  (edgellm.compile.native_ops), everything between them (norms, rotary, activations, residuals) is
  inductor's generated code (libraries built before `edgellm::attend` existed attend in the graph
  and still load: same inputs and caches, slower prefill). At load time the converted weights are
  repacked for the kernels, as the eager engine does, and handed to the program by name
  (`load_constants`, no copy).
  Loading such a library needs edgellm's kernels (`load_pt2` registers the operators first).
- otherwise (cuda, mps, or no kernels): the weights are dequantized once to float32 at load
  (lowering.float_model) and the step is plain GEMMs.

The edgellm metadata (see target.py) is stored twice: in the shared library
(`aot_inductor.metadata`, read with `get_metadata()`) and as `edgellm/metadata.json` in the
package zip, so it can be checked before anything is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from torch import nn

from edgellm.compile.lowering import float_model
from edgellm.compile.native_ops import calls_operators, is_native, native_model
from edgellm.compile.static_cache import ExternalCacheStep
from edgellm.compile.target import METADATA_NAME

PT2_FORMAT = 3  # 2: caches [KVH, context, D] and, on cpu, the native operators; 3: metadata kv_cache_dtype
OLDEST_PT2_FORMAT = 2  # still loads (its caches are float32)
META_ENTRY = f"lib/edgellm/{METADATA_NAME}"  # "lib/" is the package's root folder (its temporary name)

# --opt level -> inductor options (O3 also autotunes GEMMs: much slower to build).
OPT_CONFIGS: dict[str, dict] = {
    "O0": {"aot_inductor.compile_wrapper_opt_level": "O0", "aot_inductor.precompile_headers": False},
    "O1": {"aot_inductor.compile_wrapper_opt_level": "O0"},
    "O2": {},
    "O3": {"max_autotune": True},
}


def cache_shape(model: nn.Module, max_len: int) -> tuple[int, int, int]:
    """Shape of one layer's key (or value) cache."""
    a = model.cfg
    return (a.num_kv_heads, max_len, a.head_dim)


def new_caches(model: nn.Module, max_len: int, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[list, list]:
    shape = cache_shape(model, max_len)
    n = model.cfg.num_layers
    return ([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)])


def example_inputs(model: nn.Module, max_len: int, t: int, s: int, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> tuple:
    ids = torch.zeros(t, dtype=torch.long, device=device)
    pos = torch.arange(s - t, s, dtype=torch.long, device=device)
    kp = torch.arange(s, dtype=torch.long, device=device)
    return (ids, pos, kp, *new_caches(model, max_len, device, dtype))


def kv_dtype_of(meta: dict) -> torch.dtype:
    """The element type of a library's caches (float32 before format 3)."""
    return getattr(torch, meta.get("kv_cache_dtype") or "float32")


def compile_pt2(model: nn.Module, out: Path, *, device: str, max_len: int, chunk: int, opt: str,
                metadata: dict, log=print) -> dict:
    """Export and AOT-compile the step program of `model` into the package `out`."""
    from torch.export import Dim

    t0 = time.perf_counter()
    model = step_model(model, device)
    native = calls_operators(model)
    step = ExternalCacheStep(model, native).eval()
    # a native library keeps its KV as the eager engine's pool does by default (kv_cache_dtype auto:
    # float16 for models stored in float16): a decode step reads a third less at long contexts
    kv = "float32"
    if native:
        from edgellm.quantization.modes import get_mode

        kv = "float16" if get_mode(metadata["quantization"]).model_dtype == torch.float16 else "float32"
    metadata = {**metadata, "format_version": PT2_FORMAT, "native_ops": native, "kv_cache_dtype": kv}
    chunk = max(2, min(chunk, max_len))
    t, s = min(4, chunk), min(8, max_len)
    t_dim, s_dim = Dim("T", min=1, max=chunk), Dim("S", min=1, max=max_len)
    example = example_inputs(step.model, max_len, t, s, device, getattr(torch, kv))
    static = [None] * model.cfg.num_layers
    with torch.no_grad():
        ep = torch.export.export(step, example, dynamic_shapes=({0: t_dim}, {0: t_dim}, {0: s_dim}, static, static),
                                 strict=False)
    log(f"  exported the step graph ({time.perf_counter() - t0:.1f}s); compiling with AOTInductor "
        f"(a few minutes for a real model)")
    configs = {"aot_inductor.package_constants_in_so": False,
               "aot_inductor.metadata": {"edgellm": json.dumps(metadata)}, **OPT_CONFIGS[opt]}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".edgellm-compile-") as tmp:
        pkg = Path(tmp) / "lib.pt2"
        torch._inductor.aoti_compile_and_package(ep, package_path=str(pkg), inductor_configs=configs)
        # what the caller's metadata lacks: the format, whether the graph calls the native ops, the time
        facts = {"format_version": metadata["format_version"], "native_ops": metadata["native_ops"],
                 "kv_cache_dtype": kv,
                 "compile_seconds": round(time.perf_counter() - t0, 1)}
        with zipfile.ZipFile(pkg, "a") as z:
            z.writestr(META_ENTRY, json.dumps({**metadata, **facts}, indent=2))
        shutil.move(str(pkg), out)
    return facts


def step_model(model: nn.Module, device: str) -> nn.Module:
    """The module a library's step runs: native-operator layers on cpu (when the kernels are
    available; `model` is repacked in place), float32 layers otherwise."""
    if str(device).split(":")[0] == "cpu":
        from edgellm.quantization.layers import repack_model

        repack_model(model)
        if is_native(model):
            return native_model(model)
    return float_model(model)


def read_pt2_metadata(path: Path) -> dict | None:
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"edgellm/{METADATA_NAME}")]
            return json.loads(z.read(names[0])) if names else None
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, KeyError):
        return None


def load_pt2(path: Path):
    """The compiled program (torch's AOTICompiledModel) of a package at any suffix."""
    import edgellm.compile.native_ops  # noqa: F401  (registers the operators a cpu library calls)

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "edgellm-inductor"))
    with open(path, "rb") as f:  # a file object: torch accepts any suffix this way
        return torch._inductor.aoti_load_package(f)

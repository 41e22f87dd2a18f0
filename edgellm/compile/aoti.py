"""AOTInductor model libraries (.pt2) for cpu, cuda and mps.

The library holds the compiled step program, not the weights (like an MLC-LLM model library):
`step(ids [T], positions [T], key_pos [S], k_caches, v_caches) -> logits [1, vocab]` with T
dynamic in 1..prefill_chunk_size (one graph serves prefill chunks and single-token decode) and
S = start + T dynamic in 1..context_window_size; k_caches/v_caches are lists of one
[context, KVH, D] tensor per layer, owned by the caller and written in place. At load time the weights of the converted
model directory are dequantized once to float32 (lowering.float_model: the step is plain GEMMs,
no unpacking per call) and handed to the program by name (`load_constants`, no copy).

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
from edgellm.compile.static_cache import ExternalCacheStep
from edgellm.compile.target import METADATA_NAME

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
    return (max_len, a.num_kv_heads, a.head_dim)


def new_caches(model: nn.Module, max_len: int, device: str = "cpu") -> tuple[list, list]:
    shape = cache_shape(model, max_len)
    n = model.cfg.num_layers
    return ([torch.zeros(shape, device=device) for _ in range(n)],
            [torch.zeros(shape, device=device) for _ in range(n)])


def example_inputs(model: nn.Module, max_len: int, t: int, s: int, device: str = "cpu") -> tuple:
    ids = torch.zeros(t, dtype=torch.long, device=device)
    pos = torch.arange(s - t, s, dtype=torch.long, device=device)
    kp = torch.arange(s, dtype=torch.long, device=device)
    return (ids, pos, kp, *new_caches(model, max_len, device))


def compile_pt2(model: nn.Module, out: Path, *, device: str, max_len: int, chunk: int, opt: str,
                metadata: dict, log=print) -> dict:
    """Export and AOT-compile the step program of `model` into the package `out`."""
    from torch.export import Dim

    t0 = time.perf_counter()
    step = ExternalCacheStep(float_model(model)).eval()
    chunk = max(2, min(chunk, max_len))
    t, s = min(4, chunk), min(8, max_len)
    t_dim, s_dim = Dim("T", min=1, max=chunk), Dim("S", min=1, max=max_len)
    example = example_inputs(step.model, max_len, t, s, device)
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
        facts = {"compile_seconds": round(time.perf_counter() - t0, 1)}
        with zipfile.ZipFile(pkg, "a") as z:
            z.writestr(META_ENTRY, json.dumps({**metadata, **facts}, indent=2))
        shutil.move(str(pkg), out)
    return facts


def read_pt2_metadata(path: Path) -> dict | None:
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"edgellm/{METADATA_NAME}")]
            return json.loads(z.read(names[0])) if names else None
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, KeyError):
        return None


def load_pt2(path: Path):
    """The compiled program (torch's AOTICompiledModel) of a package at any suffix."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "edgellm-inductor"))
    with open(path, "rb") as f:  # a file object: torch accepts any suffix this way
        return torch._inductor.aoti_load_package(f)

"""`edgellm compile`: a converted model -> a model library for a device."""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgellm.compile import target as T
from edgellm.config import CHAT_CONFIG, load_chat_config
from edgellm.errors import UserError


@dataclass
class CompileResult:
    output: Path
    device: str
    kind: str  # pt2, pte or tar
    metadata: dict
    seconds: float


def resolve_model_dir(model: str | Path) -> Path:
    """A converted directory, given as the directory or its mlc-chat-config.json."""
    p = Path(model).expanduser()
    if not p.exists():
        raise UserError(f"{model}: no such file or directory")
    if p.is_file():
        if p.name != CHAT_CONFIG:
            raise UserError(f"{model}: expected a converted model directory or its {CHAT_CONFIG}")
        p = p.parent
    if not (p / CHAT_CONFIG).exists():
        raise UserError(f"{p} has no {CHAT_CONFIG}: convert the model first "
                        "(edgellm convert_weight, then edgellm gen_config)")
    return p


def plan(cfg, overrides: dict) -> tuple[int, int, int]:
    """(context length, largest prefill chunk, max concurrent sequences) of the library."""
    ctx = overrides.get("context_window_size") or cfg.context_window_size
    if not ctx or ctx <= 0:
        ctx = int(cfg.model_config.get("max_position_embeddings") or 4096)
    if cfg.context_window_size and cfg.context_window_size > 0 and ctx > cfg.context_window_size:
        raise UserError(f"--overrides: context_window_size={ctx} exceeds the model's context window "
                        f"({cfg.context_window_size})")
    chunk = overrides.get("prefill_chunk_size") or cfg.prefill_chunk_size or 2048
    batch = overrides.get("max_batch_size") or cfg.max_batch_size or 1
    return ctx, max(1, min(chunk, ctx)), batch


def check_model_flags(cfg, model_dir: Path, quantization: str | None, model_type: str | None) -> None:
    """`--quantization` / `--model-type` on compile must name what the model was converted as."""
    where = model_dir / CHAT_CONFIG
    if quantization not in (None, "", "auto"):
        from edgellm.quantization.modes import get_mode

        get_mode(quantization)
        if quantization != cfg.quantization:
            raise UserError(f"--quantization {quantization}: the model is {cfg.quantization} ({where}); "
                            f"convert it with --quantization {quantization} first, or drop the flag")
    if model_type not in (None, "", "auto"):
        from edgellm.models.registry import get_family

        get_family(model_type)
        if model_type != cfg.model_type:
            raise UserError(f"--model-type {model_type}: the model is {cfg.model_type} ({where})")


def check_prefix(prefix: str | None) -> str | None:
    if prefix in (None, "", "auto"):
        return None
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
        raise UserError(f"--system-lib-prefix {prefix!r}: use letters, digits and underscores "
                        "(a C identifier prefix, e.g. llama_q4f16_1_)")
    return prefix


def apply_sliding_window(model, model_type: str, window: int) -> None:
    """Set the attention window of a loaded model's layers (-1: none), as gen_config's
    --sliding-window-size does: the layers that slide, or every layer of a Mistral."""
    layers = [m for m in model.modules() if hasattr(m, "window") and hasattr(m, "layer")]
    sliding = [m for m in layers if m.window is not None]
    if window == -1:
        targets = sliding
    elif sliding or model_type == "mistral":
        targets = sliding or layers
    else:
        raise UserError(f"--overrides sliding_window: {model_type} models have no sliding-window attention")
    for m in targets:
        m.window = None if window == -1 else window


def compile_model(model: str | Path, output: str | Path, device: str | None = None, opt: str = "O2",
                  overrides: str | dict | None = None, log=print, *, host: str | None = None,
                  system_lib_prefix: str | None = None, quantization: str | None = None,
                  model_type: str | None = None) -> CompileResult:
    """Build a model library for a device (or the `host` triple's device); see docs/mobile.md."""
    t0 = time.perf_counter()
    output = Path(output).expanduser()
    if host:
        from edgellm.compile.host import host_device

        explicit = None if device in (None, "", "auto") else T.normalize_device(device, output)
        dev = host_device(host, explicit)
    else:
        dev = T.normalize_device(device, output)
    kind = T.check_output(output, dev)
    if opt not in T.OPT_LEVELS:
        raise UserError(f"--opt {opt!r}: choose from {', '.join(T.OPT_LEVELS)}")
    ov = T.parse_overrides(overrides)
    prefix = check_prefix(system_lib_prefix)
    model_dir = resolve_model_dir(model)
    cfg = load_chat_config(model_dir)
    check_model_flags(cfg, model_dir, quantization, model_type)
    inner = T.artifact_kind(dev)
    if inner == "pt2":
        T.check_device_available(dev)
    else:
        from edgellm.compile.executorch_export import require_executorch

        require_executorch()
    ctx, chunk, batch = plan(cfg, ov)
    if ov.get("sliding_window", -1) > 0:
        from edgellm.models.loader import arch_config

        if cfg.model_type != "mistral" and not any(w is not None for w in arch_config(cfg).windows):
            raise UserError(f"--overrides sliding_window: {cfg.model_type} models have no sliding-window "
                            "attention")

    from edgellm.models.loader import load_model

    log(f"Compiling {model_dir.name} ({cfg.model_type}, {cfg.quantization}) for {dev}: "
        f"context {ctx}, prefill chunk {chunk} -> {output}")
    load_device = dev if inner == "pt2" and dev != "cpu" else "cpu"
    mdl, cfg = load_model(model_dir, device=load_device)
    if "sliding_window" in ov:
        apply_sliding_window(mdl, cfg.model_type, ov["sliding_window"])
    meta = T.make_metadata(device=dev, kind=inner, cfg=cfg, arch=mdl.cfg, model_dir=model_dir, overrides=ov,
                           max_len=ctx, chunk=chunk, max_batch=batch, opt=opt,
                           extra={"bos_token_id": cfg.bos_token_id, "eos_token_ids": cfg.eos_ids,
                                  "host": host, "system_lib_prefix": prefix})
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".edgellm-lib-") as tmp:
        # the prefix names the artifact inside an archive (MLC prefixes the symbols of a system lib)
        art = output if kind != "tar" else Path(tmp) / f"{prefix or ''}{output.stem}.{inner}"
        if inner == "pt2":
            from edgellm.compile.aoti import compile_pt2

            facts = compile_pt2(mdl, art, device=dev, max_len=ctx, chunk=chunk, opt=opt, metadata=meta, log=log)
        else:
            from edgellm.compile.executorch_export import export_pte

            facts = export_pte(mdl, art, max_len=ctx, chunk=chunk, metadata=meta,
                               weights={"O0": "float", "O3": "8da4w"}.get(opt, "exact"), log=log)
        meta.update(facts)
        if kind == "tar":
            from edgellm.compile.archive import write_tar

            write_tar(output, art, meta)
    secs = time.perf_counter() - t0
    size = output.stat().st_size / 1e6
    log(f"Wrote {output} ({size:.1f} MB) in {secs:.1f}s")
    return CompileResult(output, dev, kind, meta, secs)

"""Find and open the weights behind a CONFIG argument (HF dir, its config.json, or a .gguf)."""

from __future__ import annotations

from pathlib import Path

from edgellm.errors import UserError
from edgellm.weights.hf_reader import SafetensorsSource, TorchBinSource, detect_format, hf_config

SOURCE_FORMATS = ("auto", "huggingface-safetensor", "huggingface-torch", "gguf", "awq", "gptq")


def resolve_config(config: str | Path) -> Path:
    """The model directory or .gguf file that CONFIG names (HF://org/name and org/name through the hub)."""
    from edgellm.weights.hub import resolve_model

    path = Path(resolve_model(config)).expanduser()
    if not path.exists():
        raise UserError(f"{config}: no such file or directory")
    if path.is_file() and path.name == "config.json":
        return path.parent
    if path.is_file() and path.name == "mlc-chat-config.json":
        return path.parent
    if path.is_file() and path.suffix != ".gguf":
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{config}: expected a model directory, its config.json, or a .gguf file")
    return path


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def find_gguf(path: Path) -> Path | None:
    if is_gguf(path):
        return path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return None


def open_source(config: str | Path, source: str | Path | None = None, source_format: str = "auto",
                keep_awq: bool = False):
    """(source, hf_config): a tensor source with `names()` / `iter_tensors()` and the HF config.

    keep_awq (quantization q4f16_awq): the checkpoint must be AWQ, and its linears come out as
    their codes, scales and zero points instead of float weights."""
    if source_format not in SOURCE_FORMATS:
        raise UserError(f"unknown source format {source_format!r}; choose from {', '.join(SOURCE_FORMATS)}")
    cfg_path = resolve_config(config)
    src_path = Path(source).expanduser() if source else cfg_path
    if source and not src_path.exists():
        raise UserError(f"{source}: no such file or directory")
    gguf = find_gguf(src_path)
    if source_format == "gguf" or (source_format == "auto" and gguf is not None):
        if gguf is None:
            raise UserError(f"{src_path} is not a GGUF file")
        if keep_awq:
            raise UserError("q4f16_awq needs an AWQ checkpoint, not a GGUF file: use q4f16_1")
        from edgellm.weights.gguf_reader import GGUFSource

        src = GGUFSource(gguf)
        cfg = src.hf_config if cfg_path == src_path or cfg_path.is_file() else hf_config(cfg_path)
        return src, cfg
    if gguf is not None:
        raise UserError(f"{gguf} is a GGUF file, not {source_format}; use --source-format gguf (or auto)")
    if not cfg_path.is_dir():
        raise UserError(f"{config}: expected a model directory, its config.json, or a .gguf file")
    cfg = hf_config(cfg_path)
    quant_method = str((cfg.get("quantization_config") or {}).get("quant_method", "")).lower()
    if source_format == "auto" and quant_method in ("awq", "gptq"):
        source_format = quant_method
    if source_format in ("awq", "gptq") and quant_method != source_format:
        found = f"a {quant_method} checkpoint" if quant_method else "not quantized (no quantization_config)"
        raise UserError(f"--source-format {source_format}: {cfg_path} is {found}; "
                        "use --source-format auto")
    if source_format in ("awq", "gptq"):
        from edgellm.weights.gptq_reader import open_prequantized

        return open_prequantized(src_path if src_path.is_dir() else src_path.parent, cfg, source_format,
                                 keep_awq), cfg
    if keep_awq:
        raise UserError(f"q4f16_awq keeps an AWQ checkpoint's own codes and scales; {cfg_path} is not an AWQ "
                        "checkpoint (no quantization_config with quant_method awq): use q4f16_1")
    if source_format == "auto":
        source_format = detect_format(src_path if src_path.is_dir() else src_path.parent)
    files = [src_path] if src_path.is_file() else None
    base = src_path if src_path.is_dir() else src_path.parent
    if source_format == "huggingface-safetensor":
        return SafetensorsSource(base, files), cfg
    return TorchBinSource(base, files), cfg

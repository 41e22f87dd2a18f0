"""gen_config: write mlc-chat-config.json and the tokenizer files next to converted weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgellm.config import ChatConfig
from edgellm.errors import UserError
from edgellm.models.registry import family_hook, get_family
from edgellm.models.schema import parse_arch
from edgellm.quantization.modes import get_mode
from edgellm.weights.hf_reader import hf_config, read_json
from edgellm.weights.source import find_gguf, resolve_config
from edgellm.weights.staging import staged_output

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "special_tokens_map.json")


# llama.cpp's defaults (common/common.h), for models that carry no sampling settings of their own:
# MLC's plain 1.0/1.0 makes small models ramble into noise.
LLAMA_CPP_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")
# GGUF general.sampling.* metadata key -> chat config field
GGUF_SAMPLING_KEYS = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                      "penalty_repeat": "repetition_penalty"}


def _from_generation_config(gen: dict) -> dict:
    out = {}
    for key in SAMPLING_KEYS:
        if gen.get(key) is not None:
            out[key] = int(gen[key]) if key == "top_k" else float(gen[key])
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def gguf_sampling(path: Path) -> dict:
    """Sampling settings a GGUF carries in its general.sampling.* metadata (empty if none)."""
    import gguf

    reader = gguf.GGUFReader(path, "r")
    out = {}
    for key, name in GGUF_SAMPLING_KEYS.items():
        field = reader.fields.get(f"general.sampling.{key}")
        if field is not None:
            value = field.contents()
            out[name] = int(value) if name == "top_k" else round(float(value), 6)
    return out


def choose_sampling(gen: dict, gguf_path: Path | None, explicit: dict | None) -> tuple[dict, str]:
    """(sampling defaults, where they came from): explicit values over generation_config.json, over
    the GGUF's general.sampling.* metadata, over llama.cpp's defaults."""
    if explicit:
        return {**_from_generation_config(gen), **explicit}, "as given"
    found = _from_generation_config(gen)
    if found:
        return found, "from generation_config.json"
    if gguf_path is not None:
        found = gguf_sampling(gguf_path)
        if found:
            return found, "from the GGUF's general.sampling metadata"
    return dict(LLAMA_CPP_SAMPLING), "llama.cpp's defaults: the model carries none"


def _layout(output: Path, quantization: str, group_size: int | None, lm_head_bits: int | None) -> dict:
    """The quantization layout: the flags, else what convert_weight recorded in OUTPUT's tensor cache."""
    from edgellm.quantization.modes import with_layout

    mode = with_layout(get_mode(quantization), group_size, lm_head_bits)
    recorded = None
    for name in ("tensor-cache.json", "ndarray-cache.json"):
        if (output / name).exists():
            try:
                recorded = json.loads((output / name).read_text())["metadata"].get("QuantizationLayout", {})
            except (OSError, ValueError, KeyError, AttributeError):
                recorded = None
            break
    if recorded is None or (group_size is None and lm_head_bits is None):
        return mode.layout if recorded is None else get_mode(quantization, recorded).layout
    if recorded != mode.layout:
        raise UserError(f"{output} holds weights converted with quantization layout {recorded or 'default'}, "
                        f"not {mode.layout or 'default'}; drop --group-size/--lm-quant-bit or convert again")
    return mode.layout


def _conv_template(name: str, tok_config: dict) -> dict | str:
    if name == "auto":
        if not tok_config.get("chat_template"):
            from edgellm.tokenizer.conversation import TEMPLATE_NAMES

            raise UserError("--conv-template auto needs a chat_template in tokenizer_config.json; "
                            f"this model has none, pick one of: {', '.join(TEMPLATE_NAMES)}")
        return "auto"
    from edgellm.tokenizer.conversation import get_template

    return get_template(name).to_dict()


def gen_config(config: str | Path, quantization: str, conv_template: str, output: str | Path, *,
               model_type: str = "auto", context_window_size: int | None = None,
               sliding_window_size: int | None = None, prefill_chunk_size: int | None = None,
               tensor_parallel_shards: int | None = None, max_batch_size: int | None = None,
               force: bool = False, sampling: dict[str, float] | None = None, log=None,
               group_size: int | None = None, lm_head_bits: int | None = None) -> ChatConfig:
    """Write `output/mlc-chat-config.json` and tokenizer files; returns the config written.

    `sampling` (temperature, top_p, penalties) overrides the defaults; otherwise they come from
    generation_config.json, else the GGUF's metadata, else llama.cpp's defaults. `log` (e.g. print)
    is told which were chosen.
    """
    layout = _layout(Path(output), quantization, group_size, lm_head_bits)
    path = resolve_config(config)
    gguf = find_gguf(path)
    if gguf is not None:
        from edgellm.weights.gguf_reader import GGUFSource

        src = GGUFSource(gguf)
        hf, gen, tok_dir = dict(src.hf_config), {}, None
    else:
        src = None
        hf = hf_config(path)
        gen = read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
        tok_dir = path
    mt = hf.get("model_type") if model_type in (None, "", "auto") else model_type
    family = get_family(mt)
    arch = parse_arch(family, hf, f"{gguf} config" if gguf is not None else str(path / "config.json"))
    sizes = {"context-window-size": context_window_size, "prefill-chunk-size": prefill_chunk_size,
             "max-batch-size": max_batch_size, "tensor-parallel-shards": tensor_parallel_shards}
    for name, value in sizes.items():
        if value is not None and not 0 < value <= 1 << 24:
            raise UserError(f"--{name} must be in 1..{1 << 24}, got {value}")
    if tensor_parallel_shards not in (None, 1):  # refuse now a model that cannot be split that way
        from edgellm.models.sharding import check_shards

        check_shards(arch, get_mode(quantization, layout), tensor_parallel_shards, str(path))
    window = family_hook(family, "chat_window")(hf)
    if sliding_window_size is not None:
        window = sliding_window_size
    ctx = context_window_size or arch.max_position_embeddings
    chunk = min(prefill_chunk_size or 2048, ctx)

    chosen, origin = choose_sampling(gen, gguf, sampling)
    if log is not None:
        log("Sampling defaults: " + ", ".join(f"{k}={v}" for k, v in chosen.items()) + f" ({origin})")
    with staged_output(Path(output), force=force) as stage:
        written = []
        if src is not None:
            written = src.write_tokenizer(stage)
        else:
            for fname in TOKENIZER_FILES:
                if (tok_dir / fname).exists():
                    shutil.copy(tok_dir / fname, stage / fname)
                    written.append(fname)
        if "tokenizer.json" not in written:
            raise UserError(f"{path} has no tokenizer.json (a fast tokenizer is needed)")
        tok_config = json.loads((stage / "tokenizer_config.json").read_text(encoding="utf-8")) \
            if "tokenizer_config.json" in written else {}
        eos = gen.get("eos_token_id", hf.get("eos_token_id"))
        cfg = ChatConfig(
            model_type=family.__name__.rsplit(".", 1)[1],
            quantization=quantization,
            model_config=hf,
            vocab_size=arch.vocab_size,
            context_window_size=ctx,
            sliding_window_size=window,
            prefill_chunk_size=chunk,
            tensor_parallel_shards=tensor_parallel_shards or 1,
            max_batch_size=max_batch_size or 128,
            conv_template=_conv_template(conv_template, tok_config),
            pad_token_id=int(hf.get("pad_token_id") or gen.get("pad_token_id") or 0),
            bos_token_id=gen.get("bos_token_id", hf.get("bos_token_id")),
            eos_token_id=eos,
            tokenizer_files=written,
            quantization_layout=layout,
            **chosen,
        )
        cfg.save(stage)
    return cfg

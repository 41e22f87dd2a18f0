"""convert_weight: stream a checkpoint tensor by tensor, map names, quantize, write shards."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from edgellm.errors import UserError
from edgellm.models.loader import build_model, expected_tensors
from edgellm.models.mapping import HFMapper, to_disk_name
from edgellm.models.registry import get_family
from edgellm.models.schema import parse_arch
from edgellm.quantization.layers import QuantEmbedding, QuantLinear
from edgellm.quantization.modes import GROUP_SIZES, QuantMode, get_mode, with_layout
from edgellm.quantization.pack import quantize
from edgellm.weights.gptq_reader import KEPT
from edgellm.weights.lora import LoraMerger
from edgellm.weights.source import open_source
from edgellm.weights.staging import staged_output
from edgellm.weights.tensor_cache import ShardWriter

ROW_CHUNK = 1024  # rows quantized at once: bounds the working copies of big matrices


def quantize_rows(weight: torch.Tensor, mode: QuantMode, device: str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    # Filled in place: concatenating per-chunk results would hold the output twice.
    q_all = torch.empty(mode.packed_shape(n, k), dtype=mode.storage_dtype)
    s_all = torch.empty(n, mode.num_groups(k), dtype=mode.model_dtype)
    for start in range(0, n, ROW_CHUNK):
        chunk = weight[start:start + ROW_CHUNK].to(device=device, dtype=torch.float32)
        q, s = quantize(chunk, mode)
        q_all[start:start + q.shape[0]] = q.cpu()
        s_all[start:start + s.shape[0]] = s.cpu()
    return q_all, s_all


def check_device(device: str | None) -> str:
    """The torch device to quantize on; UserError when this machine does not have it."""
    d = "cpu" if device in ("auto", None, "") else str(device).strip().lower()
    base = d.split(":")[0]
    if base == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if base == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {device}: Apple's MPS is not available on this machine; use --device cpu")
    if base not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: unknown device; use cpu, cuda or mps")
    return d


def resolve_model_type(hf_cfg: dict, model_type: str) -> str:
    return hf_cfg.get("model_type") if model_type in (None, "", "auto") else model_type


def convert_weight(config: str | Path, quantization: str, output: str | Path, *,
                   model_type: str = "auto", device: str = "cpu", source: str | Path | None = None,
                   source_format: str = "auto", lora_adapter: str | Path | None = None,
                   lora_split: bool = False, force: bool = False, progress: bool | None = None,
                   group_size: int | None = None, lm_head_bits: int | None = None) -> dict:
    """Convert a model's weights into `output`; returns the tensor-cache manifest.

    `group_size` (32, 64, 128, 0 = per channel) and `lm_head_bits` (4, 8, 16) change the q4/q8 layout;
    the change is recorded in the tensor cache's metadata (QuantizationLayout) for gen_config.
    `lora_split`: the `lora_adapter` is not merged but written apart, as `output/lora/<adapter dir name>/`
    (its A/B in float16, float32 for q0f32), for the engine to apply at run time (`lora_adapters`).
    """
    if lora_split and not lora_adapter:
        raise UserError("--lora-split needs --lora-adapter PEFT_DIR (the adapter to write apart)")
    mode = with_layout(get_mode(quantization), group_size, lm_head_bits)
    device = check_device(device)
    src, hf_cfg = open_source(config, source, source_format, keep_awq=mode.zero_points)
    if mode.zero_points:  # the layout is the checkpoint's
        if group_size is not None and group_size != src.group_size:
            raise UserError(f"--group-size {group_size}: this AWQ checkpoint has groups of {src.group_size}")
        if src.group_size != mode.group_size:
            if src.group_size not in GROUP_SIZES or src.group_size == 0:
                raise UserError(f"AWQ group size {src.group_size} is not supported (32, 64 or 128)")
            mode = with_layout(mode, src.group_size)
    mt = resolve_model_type(hf_cfg, model_type)
    family = get_family(mt)
    arch = parse_arch(family, hf_cfg, f"{config} config" if str(config).endswith(".gguf") else "config.json")
    model = build_model(family, arch, mode, max_positions=1)
    want = expected_tensors(model)
    modes = {f"{p}.weight": m.mode for p, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    del model
    lora = LoraMerger(lora_adapter) if lora_adapter else None
    split, lora = (lora, None) if lora_split else (None, lora)
    mapper = HFMapper(family, arch)
    written: set[str] = set()
    with staged_output(Path(output), force=force, replaces_shards=True) as stage:
        writer = ShardWriter(stage)
        # progress=None: the bar is drawn on a terminal only, so an error stays one line in logs;
        # True: always (first-run preparation, where showing progress matters more).
        bar = tqdm(total=len(src.names()), desc="Converting", unit="tensor",
                   disable={None: None, True: False, False: True}[progress], dynamic_ncols=True)
        try:
            for hf_name, tensor in src.iter_tensors():
                bar.update(1)
                if lora is not None:
                    tensor = lora.apply(hf_name, tensor)
                for name, t in mapper.feed(hf_name, tensor):
                    name = _write(writer, family, modes, mode, want, name, t, arch.tie_word_embeddings, device)
                    written.add(name)
                del tensor
        except BaseException:
            bar.leave = False  # erase the bar: the error message is the last word
            raise
        finally:
            bar.close()
        mapper.finish()
        if lora is not None:
            lora.finish()
        missing = [n for n in want if n not in written and not all(n[:-7] + s in written for s in KEPT)]
        if missing:
            raise UserError(f"the checkpoint lacks {missing[0]} ({len(missing)} tensors missing)")
        if split is not None:
            _write_split(split.adapter, stage, family, arch, mode, mt)
        return writer.close({"QuantizationLayout": mode.layout} if mode.layout else None)


def _write_split(adapter, stage: Path, family, arch, mode: QuantMode, model_type: str) -> None:
    """The adapter apart, checked against the base first (as the engine will load it)."""
    from edgellm.models.lora import adapter_weights, base_facts
    from edgellm.weights.lora import write_split

    model = build_model(family, arch, mode, max_positions=1)
    adapter_weights(adapter, model, family)  # raises on a module the base lacks or a shape mismatch
    dtype = torch.float32 if mode.model_dtype == torch.float32 else torch.float16
    write_split(adapter, stage / "lora" / adapter.path.name, dtype, base_facts(model_type, arch))


def _write(writer: ShardWriter, family, modes: dict, mode: QuantMode, want: dict, name: str, t: torch.Tensor,
           tied: bool, device: str) -> str:
    """Write one tensor (quantizing it when its layer is quantized); returns the name written."""
    base, _, leaf = name.rpartition(".")
    if "." + leaf in KEPT:  # an AWQ linear's own codes, scales or zero points (q4f16_awq)
        if want.get(base + ".weight", (None, ""))[1] != "quant" or not modes[base + ".weight"].zero_points:
            raise UserError(f"{name}: the checkpoint quantizes a tensor this model keeps in float")
        n, k = want[base + ".weight"][0]
        m = modes[base + ".weight"]
        need = m.packed_shape(n, k) if leaf == "q_weight" else (n, m.num_groups(k))
        if tuple(t.shape) != need:
            raise UserError(f"tensor {name} has shape {list(t.shape)}, the config needs {list(need)}")
        if leaf == "q_weight":
            writer.add(to_disk_name(family, name), t, "uint32", logical_numel=n * k)
        else:
            writer.add(to_disk_name(family, name), t.to(m.model_dtype), _dtype_str(m.model_dtype), 0)
        return name
    mode = modes.get(name, mode)
    if name not in want:
        if tied and name.startswith("lm_head."):
            return  # a copy of the tied embedding some checkpoints carry
        raise UserError(f"unexpected tensor {name} for this model_type/config")
    shape, kind = want[name]
    if tuple(t.shape) != shape:
        raise UserError(f"tensor {name} has shape {list(t.shape)}, the config needs {list(shape)}")
    if kind == "quant":
        if mode.zero_points:
            raise UserError(f"{name}: q4f16_awq needs the AWQ checkpoint's codes, but it is a float tensor")
        base = name[: -len(".weight")]
        q, s = quantize_rows(t, mode, device)
        writer.add(to_disk_name(family, base + ".q_weight"), q,
                   "uint32" if mode.kind == "group" else "int8", logical_numel=t.numel())
        writer.add(to_disk_name(family, base + ".q_scale"), s, _dtype_str(mode.model_dtype), 0)
    else:
        # MLC keeps a few tensors in float32 whatever the mode (gpt_neox MLP biases)
        keep32 = any(name.endswith(s) for s in getattr(family, "FLOAT32_TENSORS", ()))
        dtype = torch.float32 if keep32 else mode.model_dtype
        writer.add(to_disk_name(family, name), t.to(dtype), _dtype_str(dtype))
    return name


def _dtype_str(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]

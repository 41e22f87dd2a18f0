"""ExecuTorch programs (.pte) for Android and iOS: XNNPACK delegate, KV cache inside the program.

The converted model is exported as one method, `forward(ids [T], positions [T]) -> logits [1,
vocab]`, with T dynamic (1 .. prefill_chunk_size) and the KV cache held in mutable buffers of
`context_window_size` positions (see static_cache.BufferCacheStep).

Weights. q4 group-32 modes (q4f16_1, q4f32_1, q4f16_2) become torchao's "8da4w" form, the one
XNNPACK runs with its int4 kernels: int4 weights in groups of 32 with 8-bit dynamic
(per-token, asymmetric) activations. Our codes map onto it exactly — `q - 7` is the signed int4
value and the group scale is kept — so the weights are bit-identical to the converted model's;
only the activations are rounded to 8 bits. A quantized embedding becomes ExecuTorch's
`embedding_4bit` (same codes, same scales); a tied lm_head reads the same codes as an 8da4w
linear. Other modes (q0*, q3f16_1, q8f16_1) run their linears in float32 on XNNPACK.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from edgellm.compile.lowering import EmbeddingF32, linear_f32
from edgellm.compile.static_cache import BufferCacheStep
from edgellm.errors import UserError
from edgellm.quantization.layers import QuantEmbedding, QuantLinear
from edgellm.quantization.pack import unpack

EXECUTORCH_HINT = "pip install executorch==1.4.1 (the release built for torch 2.13)"


def require_executorch() -> None:
    # torchao (an ExecuTorch dependency) warns about its CUDA-only extensions on every import
    log = logging.getLogger("torchao")
    if log.level == logging.NOTSET:
        log.setLevel(logging.ERROR)
    try:
        import executorch.exir  # noqa: F401
    except ImportError:
        raise UserError(f"compiling a .pte program needs ExecuTorch: {EXECUTORCH_HINT}") from None


def _q4_codes(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 codes in [-7, 7] [N, K], float32 scales [N, K/32]) for a q4 group-32 layer, else None."""
    mode = mod.mode
    if mode.kind != "group" or mode.bits != 4 or mode.group_size != 32:
        return None
    k = mod.in_features if isinstance(mod, QuantLinear) else mod.embedding_dim
    if k % 32:
        return None
    q = unpack(mod.q_weight, mode)[:, :k].to(torch.int16) - mode.max_int
    scales = mod.q_scale.float()[:, :k // 32].contiguous()
    # An all-zero group has scale 0, which XNNPACK rejects: code 0 with scale 1 is the same zeros.
    zero = scales == 0
    if zero.any():
        q = q.view(q.shape[0], -1, 32).masked_fill(zero.unsqueeze(-1), 0).view(q.shape[0], -1)
        scales = scales.masked_fill(zero, 1.0)
    return q.to(torch.int8).contiguous(), scales


def _int4_weight(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """torchao's 8da4w weight tensor holding exactly `codes * scales`."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    return IntxUnpackedToInt8Tensor(
        qdata=codes, scale=scales, zero_point=torch.zeros_like(scales, dtype=torch.int8),
        target_dtype=torch.int4, block_size=(1, 32), dtype=torch.float32,
        activation_quantization=IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN)


def _linear_8da4w(codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    n, k = codes.shape
    lin = nn.Linear(k, n, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(_int4_weight(codes, scales), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.float(), requires_grad=False)
    return lin


class Embedding4bit(QuantEmbedding):
    """ExecuTorch's embedding_4bit lookup; `as_linear` (a tied lm_head) is an 8da4w linear."""

    def __init__(self, src: QuantEmbedding, codes: torch.Tensor, scales: torch.Tensor):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim, self.mode = src.num_embeddings, src.embedding_dim, src.mode
        u = (codes.to(torch.int16) + 8).to(torch.uint8)  # [-8, 7] -> [0, 15]
        self.register_buffer("packed", (u[:, 0::2] * 16 + u[:, 1::2]).contiguous())
        self.register_buffer("scales", scales)
        self.head = _linear_8da4w(codes, scales.clone(), None)  # a constant shared with the lookup breaks XNNPACK

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_4bit.dtype(
            self.packed, self.scales, None, -8, 7, ids, dtype=torch.float32)

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def mobile_model(model: nn.Module, quantize: bool = True) -> tuple[nn.Module, dict[str, int]]:
    """A copy of `model` whose quantized layers are ExecuTorch/XNNPACK-friendly; counts by kind."""
    if quantize:
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (registers embedding_4bit)
    model = copy.deepcopy(model)
    counts = {"linear_8da4w": 0, "linear_f32": 0, "embedding_4bit": 0, "embedding_f32": 0}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, (QuantLinear, QuantEmbedding)):
            continue
        codes = _q4_codes(mod) if quantize else None
        if isinstance(mod, QuantLinear):
            new = _linear_8da4w(*codes, mod.bias) if codes else linear_f32(mod)
            counts["linear_8da4w" if codes else "linear_f32"] += 1
        else:
            new = Embedding4bit(mod, *codes) if codes else EmbeddingF32(mod)
            counts["embedding_4bit" if codes else "embedding_f32"] += 1
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    model.requires_grad_(False)
    return model.eval(), counts


def export_pte(model: nn.Module, out: Path, *, max_len: int, chunk: int, metadata: dict,
               quantize: bool = True, log=print) -> dict:
    """Write the .pte program for `model`; returns facts for the metadata.

    Besides `forward`, the program carries the constant methods ExecuTorch's LLM runners read
    (get_max_seq_len, get_vocab_size, use_kv_cache, enable_dynamic_shape, ...) and
    `edgellm_metadata`, the metadata JSON as a uint8 tensor.
    """
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from torch.export import Dim

    t0 = time.perf_counter()
    mm, counts = mobile_model(model, quantize)
    step = BufferCacheStep(mm, max_len).eval()
    chunk = max(2, min(chunk, max_len))
    n = min(4, chunk)
    example = (torch.zeros(1, n, dtype=torch.long), torch.tensor([0], dtype=torch.long))
    with torch.no_grad():
        ep = torch.export.export(step, example, dynamic_shapes=({1: Dim("T", min=1, max=chunk)}, {}),
                                 strict=False)
    log(f"  exported the step graph ({time.perf_counter() - t0:.1f}s); lowering to XNNPACK")
    facts = {"method": "forward", "layers": counts}
    a = model.cfg
    eos = metadata.get("eos_token_ids") or []
    blob = json.dumps({**metadata, **facts}).encode()
    constants = {
        "get_max_seq_len": max_len, "get_max_context_len": max_len, "get_vocab_size": a.vocab_size,
        "get_n_layers": a.num_layers, "use_kv_cache": True, "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True, "get_max_prefill_chunk": chunk,
        "get_bos_id": int(metadata.get("bos_token_id") or 0), "get_eos_ids": [int(e) for e in eos],
        "edgellm_metadata": torch.tensor(list(blob), dtype=torch.uint8),
    }
    edge = to_edge_transform_and_lower(
        ep, partitioner=[XnnpackPartitioner()], constant_methods=constants,
        compile_config=EdgeCompileConfig(_check_ir_validity=False))
    prog = edge.to_executorch(ExecutorchBackendConfig(extract_delegate_segments=True, run_reinplace_pass=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as f:
        prog.write_to_file(f)
    tmp.replace(out)
    facts["compile_seconds"] = round(time.perf_counter() - t0, 1)
    return facts


def read_pte_metadata(path: Path) -> dict | None:
    """The edgellm metadata of a .pte (runs its constant method; needs ExecuTorch)."""
    require_executorch()
    try:
        prog = PteProgram.load_program(path)
        blob = prog.load_method("edgellm_metadata").execute([])[0]
    except Exception:  # noqa: BLE001 - not our program, or not a program at all
        return None
    return json.loads(bytes(blob.tolist()).decode())


class PteProgram:
    """A loaded .pte program run through ExecuTorch's Python runtime.

    The methods of one loaded program share their planned memory, so one KV cache: load the
    program again for an independent sequence.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.program = self.load_program(path)

    @staticmethod
    def load_program(path: str | Path):
        require_executorch()
        import executorch.kernels.quantized  # noqa: F401  (embedding_4bit and friends)
        from executorch.runtime import Runtime

        return Runtime.get().load_program(str(path))

    def new_method(self):
        return self.program.load_method("forward")


def run_method(method, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Logits [1, vocab] of the last of `ids` [T], written at positions start.. of its cache."""
    return method.execute([ids.view(1, -1), torch.tensor([start], dtype=torch.long)])[0]

"""ExecuTorch programs (.pte) for Android and iOS: XNNPACK delegate, KV cache inside the program.

The converted model is exported as one method, `forward(ids [T], positions [T]) -> logits [1,
vocab]`, with T dynamic (1 .. prefill_chunk_size) and the KV cache held in mutable buffers of
`context_window_size` positions (see static_cache.BufferCacheStep).

Weights (`weights=`, chosen by compile's --opt):
- "exact" (O1/O2, the default): the converted model's own 4-bit codes (2 a byte) and float32
  copies of its scales (and AWQ zero points) are the program's constants. Each call dequantizes
  them with ExecuTorch's `embedding_4bit` kernel (every row: exactly `(q - zero) * scale`) and
  multiplies in float32 on XNNPACK (a batch matmul, which takes a computed weight), so the
  program computes what the eager engine's float reference does. q8f16_1 does the same through
  `embedding_byte`. Slower than 8da4w: the weights are expanded on every call.
- "8da4w" (O3): torchao's 8da4w form XNNPACK runs with its int4 kernels; the codes are kept, but
  XNNPACK stores group scales as bfloat16 and rounds each linear's input to int8 per token, so
  greedy tokens can differ from the engine's. q4 group-32 modes only (others: "exact").
- "float" (O0): every quantized layer dequantized once to float32 weights (4-8x larger).
q3f16_1 and layers whose K is not whole groups are float32 under every choice.
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
from edgellm.compile.xnnpack_graph import SplitLinear
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


WEIGHT_FORMS = ("exact", "8da4w", "float")


def _codes_exact(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int] | None:
    """(packed codes, float32 scales [N, G], float32 zero points or None, bits) for `embedding_4bit` /
    `embedding_byte`, holding exactly the layer's weights; None for layouts they cannot hold."""
    mode = mod.mode
    k = mod.in_features if isinstance(mod, QuantLinear) else mod.embedding_dim
    if mode.padded_k(k) != k or mod.q_weight is None:
        return None
    scales = mod.q_scale.float().contiguous()
    if mode.kind == "int8":
        return mod.q_weight.to(torch.int8).contiguous(), scales, None, 8
    if mode.bits != 4:
        return None
    q = unpack(mod.q_weight, mode).to(torch.uint8)  # [N, K] codes 0..15
    # the kernel reads a nibble u as u - 8 and subtracts the zero point: u = q, zero = offset - 8
    zero = mod.q_zero.float() - 8 if mode.zero_points else None
    if zero is None:
        q = q + (8 - mode.max_int)  # symmetric: (q - max_int) * scale with no zero point
    packed = (q[:, 0::2] << 4 | q[:, 1::2]).contiguous()
    return packed, scales, zero, 4


class LinearExact(nn.Module):
    """y = x @ W.T (+ bias), W expanded from the stored codes on every call (exact weights)."""

    def __init__(self, codes: tuple, bias: torch.Tensor | None):
        super().__init__()
        packed, scales, zero, self.bits = codes
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zero", zero)
        self.register_buffer("rows", torch.arange(packed.shape[0]))
        self.register_buffer("bias", None if bias is None else bias.float())

    def weight(self) -> torch.Tensor:
        if self.bits == 8:
            return torch.ops.quantized_decomposed.embedding_byte.dtype(
                self.packed, self.scales, self.zero, -128, 127, self.rows, dtype=torch.float32)
        return torch.ops.quantized_decomposed.embedding_4bit.dtype(
            self.packed, self.scales, self.zero, -8, 7, self.rows, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W [N, K] @ x.T [K, T] as a batch matmul: XNNPACK runs it with a computed weight (its
        # linear wants a constant one), and no transposed copy of W is made. Only 3-D views and
        # permutes around it, T written as -1: all of it stays inside one XNNPACK partition.
        n, k = self.packed.shape[0], x.shape[-1]
        xt = x.reshape(1, -1, k).permute(0, 2, 1)  # [1, K, T]
        y = torch.bmm(self.weight().view(1, n, k), xt).permute(0, 2, 1)  # [1, T, N]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], n)

    def row_range(self, start: int, stop: int) -> LinearExact:
        """The layer of output rows start..stop (the same codes and scales)."""
        def part(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:stop].clone()

        return LinearExact((part(self.packed), part(self.scales), part(self.zero), self.bits), part(self.bias))


class EmbeddingExact(QuantEmbedding):
    """Lookup of the stored codes (`embedding_4bit`/`embedding_byte`); `as_linear` (a tied lm_head)
    expands the same codes."""

    def __init__(self, src: QuantEmbedding, codes: tuple):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim, self.mode = src.num_embeddings, src.embedding_dim, src.mode
        self.head = LinearExact(codes, None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.head
        if h.bits == 8:
            return torch.ops.quantized_decomposed.embedding_byte.dtype(
                h.packed, h.scales, h.zero, -128, 127, ids, dtype=torch.float32)
        return torch.ops.quantized_decomposed.embedding_4bit.dtype(
            h.packed, h.scales, h.zero, -8, 7, ids, dtype=torch.float32)

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


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


def _split_fused(parent: nn.Module, attr: str, lin: LinearExact) -> nn.Module:
    """A fused projection the model splits (llama-style qkv_proj by `split_sizes`, gate_up_proj by
    `inter`) as one product per part (see xnnpack_graph.SplitLinear); others as they are."""
    sizes = {"qkv_proj": getattr(parent, "split_sizes", None),
             "gate_up_proj": [parent.inter] * 2 if isinstance(getattr(parent, "inter", None), int) else None}
    sizes = sizes.get(attr)
    if not sizes or sum(sizes) != lin.packed.shape[0]:
        return lin
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return SplitLinear([lin.row_range(a, b) for a, b in zip(bounds, bounds[1:])])


def mobile_model(model: nn.Module, weights: str = "exact") -> tuple[nn.Module, dict[str, int]]:
    """A copy of `model` whose quantized layers are ExecuTorch/XNNPACK-friendly (`weights`: one of
    WEIGHT_FORMS, see the module docstring); counts by kind."""
    if weights not in WEIGHT_FORMS:
        raise ValueError(f"weights={weights!r}: choose from {WEIGHT_FORMS}")
    if weights != "float":
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (registers embedding_4bit)
    model = copy.deepcopy(model)
    counts = {k: 0 for k in ("linear_exact", "linear_8da4w", "linear_f32", "embedding_exact", "embedding_4bit",
                             "embedding_f32")}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, (QuantLinear, QuantEmbedding)):
            continue
        q4 = _q4_codes(mod) if weights == "8da4w" else None
        exact = _codes_exact(mod) if weights != "float" and q4 is None else None
        if isinstance(mod, QuantLinear):
            kind = "linear_8da4w" if q4 else "linear_exact" if exact else "linear_f32"
            new = _linear_8da4w(*q4, mod.bias) if q4 else LinearExact(exact, mod.bias) if exact else linear_f32(mod)
        else:
            kind = "embedding_4bit" if q4 else "embedding_exact" if exact else "embedding_f32"
            new = Embedding4bit(mod, *q4) if q4 else EmbeddingExact(mod, exact) if exact else EmbeddingF32(mod)
        counts[kind] += 1
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(new, LinearExact):
            new = _split_fused(parent, attr, new)
        setattr(parent, attr, new)
    model.requires_grad_(False)
    return model.eval(), {k: v for k, v in counts.items() if v}


def export_pte(model: nn.Module, out: Path, *, max_len: int, chunk: int, metadata: dict,
               weights: str = "exact", log=print) -> dict:
    """Write the .pte program for `model`; returns facts for the metadata.

    Besides `forward`, the program carries the constant methods ExecuTorch's LLM runners read
    (get_max_seq_len, get_vocab_size, use_kv_cache, enable_dynamic_shape, ...) and
    `edgellm_metadata`, the metadata JSON as a uint8 tensor.
    """
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge, to_edge_transform_and_lower
    from torch.export import Dim

    from edgellm.compile.pte_layers import layered_specs, lower_layers
    from edgellm.compile.xnnpack_graph import XnnpackFriendlyPass

    t0 = time.perf_counter()
    mm, counts = mobile_model(model, weights)
    chunk = max(2, min(chunk, max_len))
    specs = layered_specs(mm) if weights == "exact" else None
    if specs is not None:  # three small programs lowered once, called by every layer (pte_layers)
        step = lower_layers(mm, specs, max_len, chunk).eval()
        log(f"  lowered the layer programs to XNNPACK ({time.perf_counter() - t0:.1f}s)")
    else:
        step = BufferCacheStep(mm, max_len).eval()
    n = min(4, chunk)
    example = (torch.zeros(1, n, dtype=torch.long), torch.tensor([0], dtype=torch.long))
    with torch.no_grad():
        ep = torch.export.export(step, example, dynamic_shapes=({1: Dim("T", min=1, max=chunk)}, {}),
                                 strict=False)
    log(f"  exported the step graph ({time.perf_counter() - t0:.1f}s); lowering to XNNPACK")
    facts = {"method": "forward", "weights": weights, "layers": counts, "layered": specs is not None}
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
    config = EdgeCompileConfig(_check_ir_validity=False)
    if specs is not None:  # already lowered: the rest runs on the portable kernels
        edge = to_edge(ep, constant_methods=constants, compile_config=config)
    else:
        edge = to_edge_transform_and_lower(ep, transform_passes=[XnnpackFriendlyPass()],
                                           partitioner=[XnnpackPartitioner()], constant_methods=constants,
                                           compile_config=config)
    log(f"  edge program ready ({time.perf_counter() - t0:.1f}s); writing the ExecuTorch program")
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

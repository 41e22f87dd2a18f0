"""Quality of the quantized kernels, measured as llama.cpp's perplexity tool does.

The text is tokenized once and cut into chunks of `ctx` tokens; each chunk is evaluated from an
empty cache and only its second half is scored (every scored token sees at least ctx/2 tokens
of context), as llama.cpp's `perplexity` does. Two models are run on every chunk: the model under
test (repacked for the native kernels at the given `precision`) and the reference: the same
weights dequantized to float32 on every call (opt O0, float GEMM). Reported: the perplexity of
both, the mean KL divergence KL(reference || model) per scored token, and how often the two pick
the same top token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from edgellm.errors import UserError


@dataclass
class PerplexityReport:
    model: str
    precision: str
    ctx: int
    chunks: int
    tokens: int  # tokens scored
    ppl: float  # the model under test
    ref_ppl: float  # the float32 dequantized reference
    mean_kld: float  # mean KL(reference || model) per token, in nats
    max_kld: float
    top1_agreement: float  # % of scored tokens where both put the same token first
    isa: str

    def as_dict(self) -> dict:
        return asdict(self)


def _chunk_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits [len(ids), vocab] of one chunk from an empty cache."""
    from edgellm.engine.kv_pool import KVPool
    from edgellm.models.base import Step

    a = model.cfg
    pool = KVPool(a.num_layers, a.num_kv_heads, a.head_dim, list(a.windows), len(ids))
    slot = pool.new_slot()
    if not pool.reserve(slot, 0, len(ids)):
        raise RuntimeError("KV pool too small for one chunk")
    try:
        with torch.inference_mode():
            return model(ids, Step.single(0, len(ids), slot=slot), pool).float()
    finally:
        pool.free(slot)


def score_chunk(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per scored token: -log p(target) of both, KL(ref || model), whether the top tokens agree."""
    logp = torch.log_softmax(logits.double(), -1)
    ref_logp = torch.log_softmax(ref_logits.double(), -1)
    idx = targets.unsqueeze(-1)
    return {
        "nll": -logp.gather(-1, idx).squeeze(-1),
        "ref_nll": -ref_logp.gather(-1, idx).squeeze(-1),
        "kld": (ref_logp.exp() * (ref_logp - logp)).sum(-1),
        "agree": logits.argmax(-1) == ref_logits.argmax(-1),
    }


def perplexity(model_dir: str | Path, text: str, *, ctx: int = 512, precision: str = "normal",
               max_chunks: int | None = None, log: Callable[[str], None] | None = None) -> PerplexityReport:
    """Perplexity and KL divergence of `model_dir` at `precision` against its float32 dequantized reference."""
    from edgellm.models.loader import load_model
    from edgellm.quantization import kernels
    from edgellm.quantization.layers import repack_model
    from edgellm.tokenizer import Tokenizer

    kernels.check_precision(precision)
    if ctx < 4:
        raise UserError(f"--ctx must be at least 4, not {ctx}")
    model_dir = Path(model_dir)
    ref_model, cfg = load_model(model_dir)  # not repacked: dequantize + float GEMM on every call
    window = ref_model.rope.cos.shape[0] if hasattr(ref_model, "rope") else cfg.context_window_size
    if ctx > window:
        raise UserError(f"--ctx {ctx} exceeds the model's context window of {window} tokens")
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode(text)
    n_chunks = len(ids) // ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks < 1:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one chunk of --ctx {ctx}: "
                        "give a longer text or a smaller --ctx")
    model, _ = load_model(model_dir, precision=precision)
    repack_model(model)
    bos = tok.bos_token_id if tok.add_bos_token else None
    parts: dict[str, list[torch.Tensor]] = {"nll": [], "ref_nll": [], "kld": [], "agree": []}
    first = ctx // 2
    for c in range(n_chunks):
        chunk = torch.tensor(ids[c * ctx:(c + 1) * ctx], dtype=torch.long)
        if bos is not None:
            chunk[0] = bos  # as llama.cpp: every chunk starts as a document does
        logits = _chunk_logits(model, chunk)[first:-1]
        ref = _chunk_logits(ref_model, chunk)[first:-1]
        for k, v in score_chunk(logits, ref, chunk[first + 1:]).items():
            parts[k].append(v)
        if log is not None:
            nll = torch.cat(parts["nll"])
            log(f"[{c + 1}/{n_chunks}] ppl {math.exp(nll.mean().item()):.4f}")
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return PerplexityReport(
        model=str(model_dir), precision=precision, ctx=ctx, chunks=n_chunks, tokens=int(cat["nll"].numel()),
        ppl=math.exp(cat["nll"].mean().item()), ref_ppl=math.exp(cat["ref_nll"].mean().item()),
        mean_kld=cat["kld"].mean().item(), max_kld=cat["kld"].max().item(),
        top1_agreement=100.0 * cat["agree"].double().mean().item(), isa=kernels.isa())


def format_report(r: PerplexityReport) -> str:
    return "\n".join([
        f"model         {r.model}",
        f"precision     {r.precision} (kernels: {r.isa}); {r.chunks} chunks of {r.ctx}, {r.tokens} tokens scored",
        f"PPL           {r.ppl:.4f}",
        f"reference PPL {r.ref_ppl:.4f} (float32 dequantized weights, float GEMM)",
        f"PPL ratio     {r.ppl / r.ref_ppl:.5f}",
        f"mean KLD      {r.mean_kld:.6f} (max {r.max_kld:.4f})",
        f"same top p    {r.top1_agreement:.2f} %",
    ])

"""Runs one forward step of the model over a scheduled batch.

Optimization levels (EngineOptions.opt):
  O0  the reference: eager model code, quantized weights dequantized on every call.
  O1  quantized weights repacked once at load for the native kernels (edgellm.quantization.kernels):
      fused dequantize-and-dot for a few rows (decode), dequantize + float32 GEMM for many (prefill).
  O2  O1, and a step made only of decoding sequences runs as one native call over all layers
      when the model offers one (`fused_decode.native_decoder(model, pool)`, see edgellm.models.fused_decode and
      `edgellm.models.registry.native_decode_families()`): no per-layer Python, no allocation,
      attention over exactly the valid part of each sequence's cache.
  O3  an alias of O2 (MLC-LLM's flag; nothing more is done at O3).
Every level computes the same function; results differ from O0 by about 1e-5 (the kernels' 16-bit
activations), and a sequence's results never depend on the others decoded with it.

LoRA adapters (`lora`, an edgellm.models.lora.LoraSet): a step where any sequence's request has an
adapter runs the eager path (the fused native decode step cannot add the low-rank updates), with each
adapter's rows bound for the model's hooks; the base products still use the native kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.engine.kv_pool import KVPool
from edgellm.engine.options import DEFAULT_OPT
from edgellm.engine.request import TokenView
from edgellm.engine.scheduler import ScheduledChunk
from edgellm.models.base import Step


class ModelRunner:
    """Flattens the step's chunks into one token row and returns logits for sampling rows."""

    def __init__(self, model: nn.Module, pool: KVPool, device: str = "cpu", opt: str = DEFAULT_OPT,
                 fused_catch_up: int = 1, lora=None):
        self.model, self.pool, self.device, self.opt = model, pool, device, opt
        self.lora = lora  # the model's LoraSet (run-time adapters), or None
        self.fused = None  # the model's native decode step, when it offers one (O2)
        self.prompt_logits: list = []  # the last step's [(chunk, logits [n, vocab])] for prompt_logprobs
        self.argmax: list[int] | None = None  # the last step's argmax of each returned row, when the step knew it
        # chunks up to this many known tokens also run as native decode rows (a draft model catching up)
        self.fused_catch_up = fused_catch_up
        if opt != "O0" and str(device) == "cpu":
            from edgellm.models.fused_decode import native_decoder
            from edgellm.quantization.layers import repack_model

            repack_model(model)
            if opt in ("O2", "O3"):
                self.fused = native_decoder(model, pool)

    def step(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [R, vocab] (float32, on CPU) for the chunks that complete their sequence, in order
        (1 + len(draft) rows for a chunk that verifies drafted tokens)."""
        self.prompt_logits = []
        self.argmax = None
        adapters = [c.seq.request.lora for c in chunks] if self.lora is not None else []
        with_lora = any(a is not None for a in adapters)
        if self.fused is not None and not with_lora and all(
                c.completes and (c.length == 1 or c.draft or c.length <= self.fused_catch_up) for c in chunks):
            return self._fused_rows(chunks)
        ids: list[int] = []
        rows: list[int] = []
        prompt_rows: list[tuple[ScheduledChunk, int, int]] = []  # (chunk, first row index in `rows`, count)
        for c in chunks:
            first = len(ids)
            ids.extend(c.token_ids)
            # Prompt logprobs: the rows predicting the chunk's next prompt tokens, ahead of the sampling rows.
            n_prompt = min(c.start + c.length, len(c.seq.prompt_ids) - 1) - c.start
            if c.seq.params.prompt_logprobs and n_prompt > 0:
                prompt_rows.append((c, len(rows), n_prompt))
                rows.extend(range(first, first + n_prompt))
            rows.extend(range(len(ids) - c.logit_rows, len(ids)))  # a verify chunk: all its rows
        step = Step([c.seq.slot for c in chunks], [c.start for c in chunks], [c.length for c in chunks],
                    logit_rows=torch.tensor(rows, dtype=torch.long))
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        if self.device != "cpu":
            step.positions = step.positions.to(self.device)
            step.logit_rows = step.logit_rows.to(self.device)
        if with_lora:
            from edgellm.models.lora import row_groups

            with self.lora.bound(row_groups(adapters, step.lengths)):
                logits = self.forward(tokens, step)
        else:
            logits = self.forward(tokens, step)
        self.prompt_logits = [(c, logits[at:at + n]) for c, at, n in prompt_rows]
        if prompt_rows:  # hand back only the sampling rows
            keep = torch.ones(len(rows), dtype=torch.bool)
            for _, at, n in prompt_rows:
                keep[at:at + n] = False
            logits = logits[keep]
        return logits

    def forward(self, tokens: torch.Tensor, step: Step) -> torch.Tensor:
        """The model over one flattened token row: logits [rows, vocab] (float32, on CPU)."""
        with torch.inference_mode():
            return self.model(tokens, step, self.pool).float().cpu()

    def _fused_rows(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """The native decode step with a row per token: a chunk of several tokens (a verify chunk, or a
        short catch-up) becomes consecutive positions of its slot. The native step writes every row's
        keys/values of a layer before any row attends, so row j sees rows < j of its own sequence."""
        rows: list[ScheduledChunk] = []
        keep: list[int] = []
        for c in chunks:
            if c.length == 1 and not c.draft:
                keep.append(len(rows))
                rows.append(c)
                continue
            view = TokenView(c.seq.slot, c.seq.all_ids[:c.start + c.length - len(c.draft)] + c.draft)
            rows.extend(ScheduledChunk(view, c.start + j, 1) for j in range(c.length))
            keep.extend(range(len(rows) - c.logit_rows, len(rows)))
        with torch.inference_mode():
            logits = self.fused(rows)
        argmax = getattr(self.fused, "last_argmax", None)
        if len(keep) == len(rows):
            self.argmax = argmax
            return logits
        self.argmax = None if argmax is None else [argmax[i] for i in keep]
        return logits[keep]

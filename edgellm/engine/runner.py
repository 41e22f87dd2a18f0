"""Runs one forward step of the model over a scheduled batch."""

from __future__ import annotations

import torch
from torch import nn

from edgellm.engine.kv_pool import KVPool
from edgellm.engine.scheduler import ScheduledChunk
from edgellm.models.base import Step


class ModelRunner:
    """Flattens the step's chunks into one token row and returns logits for sampling rows."""

    def __init__(self, model: nn.Module, pool: KVPool, device: str = "cpu"):
        self.model, self.pool, self.device = model, pool, device

    def step(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [R, vocab] (float32, on CPU) for the chunks that complete their sequence, in order."""
        ids: list[int] = []
        rows: list[int] = []
        for c in chunks:
            ids.extend(c.seq.all_ids[c.start:c.start + c.length])
            if c.completes:
                rows.append(len(ids) - 1)
        step = Step([c.seq.slot for c in chunks], [c.start for c in chunks], [c.length for c in chunks],
                    logit_rows=torch.tensor(rows, dtype=torch.long))
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        if self.device != "cpu":
            step.positions = step.positions.to(self.device)
            step.logit_rows = step.logit_rows.to(self.device)
        with torch.inference_mode():
            logits = self.model(tokens, step, self.pool)
        return logits.float().cpu()

"""Embeddings (`/v1/embeddings`, `engine.embeddings.create`): the final hidden state of the eager
model, pooled (last token, or mean when the model dir's sentence-transformers pooling config says so)
and L2-normalized. Texts are run in batches, each one forward pass over a private KV cache, on the
engine loop's thread (`EngineLoop.call`) so it never races a generation step."""

from __future__ import annotations

import base64
import json
from functools import partial
from pathlib import Path
from typing import Any

import torch

from edgellm.api import protocol as P
from edgellm.engine.kv_pool import GROW, KVPool
from edgellm.errors import BadRequestError
from edgellm.models.base import Step

MAX_BATCH_TOKENS = 2048


def pooling_mode(model_dir: Path) -> str:
    """"mean" when a sentence-transformers pooling config asks for it, else "last"."""
    cfg = Path(model_dir) / "1_Pooling" / "config.json"
    if cfg.is_file():
        try:
            if json.loads(cfg.read_text()).get("pooling_mode_mean_tokens"):
                return "mean"
        except (OSError, ValueError):
            pass
    return "last"


class Embedder:
    def __init__(self, engine):
        self.engine = engine
        self.pooling = pooling_mode(Path(engine.model_dir))

    def _inputs(self, r: P.EmbeddingRequest) -> list[list[int]]:
        inp = r.input
        tok = self.engine.tokenizer
        if isinstance(inp, str):
            texts: list = [inp]
        elif inp and all(isinstance(t, int) for t in inp):
            texts = [inp]
        else:
            texts = list(inp)
        vocab, ctx = self.engine.config.vocab_size, self.engine.context_window
        out = []
        for i, t in enumerate(texts):
            ids = tok.encode(t, add_special_tokens=True) if isinstance(t, str) else list(t)
            if not ids:
                raise BadRequestError(f"input[{i}] is empty", param="input")
            if any(not 0 <= x < vocab for x in ids):
                raise BadRequestError(f"input[{i}] has a token id outside the vocabulary (size {vocab})", param="input")
            if len(ids) > ctx:
                raise BadRequestError(f"input[{i}] has {len(ids)} tokens but the context window is {ctx}",
                                      param="input")
            out.append(ids)
        return out

    def _batch_vectors(self, batch: list[list[int]]) -> torch.Tensor:
        """[B, hidden] pooled, normalized vectors (runs on the engine loop thread)."""
        model = self.engine.core.model
        arch = model.cfg
        # a throw-away pool (not the engine's: embeddings keep no cache), one slot per input
        budget = sum(-(-len(b) // GROW) * GROW for b in batch)
        cache = KVPool(arch.num_layers, arch.num_kv_heads, arch.head_dim, list(arch.windows), budget,
                       torch.float32, self.engine.device)
        slots = [cache.new_slot() for _ in batch]
        for slot, b in zip(slots, batch):
            cache.reserve(slot, 0, len(b))
        step = Step(slots, [0] * len(batch), [len(b) for b in batch])
        ids = torch.tensor([t for b in batch for t in b], dtype=torch.long, device=self.engine.device)
        if str(self.engine.device) != "cpu":
            step.positions = step.positions.to(self.engine.device)
        with torch.inference_mode():
            h = model(ids, step, cache, hidden=True).float().cpu()
        vecs, row = [], 0
        for b in batch:
            rows = h[row:row + len(b)]
            vecs.append(rows.mean(0) if self.pooling == "mean" else rows[-1])
            row += len(b)
        return torch.nn.functional.normalize(torch.stack(vecs), dim=-1)

    def create(self, request: P.EmbeddingRequest | dict[str, Any]) -> dict[str, Any]:
        r = request if isinstance(request, P.EmbeddingRequest) else P.parse_request(P.EmbeddingRequest, request)
        if self.engine.core.model is None:
            raise BadRequestError("embeddings need the eager engine (not a compiled --model-lib)", param="model")
        hidden = self.engine.core.model.cfg.hidden_size
        if r.dimensions is not None and r.dimensions != hidden:
            raise BadRequestError(f"dimensions={r.dimensions} is not supported: this model's embeddings have "
                                  f"{hidden} dimensions", param="dimensions")
        inputs = self._inputs(r)
        vectors: list[torch.Tensor] = []
        batch: list[list[int]] = []
        for ids in inputs + [None]:
            if batch and (ids is None or sum(map(len, batch)) + len(ids) > MAX_BATCH_TOKENS):
                vectors.extend(self.engine.loop.call(partial(self._batch_vectors, batch)))
                batch = []
            if ids is not None:
                batch.append(ids)
        data = []
        for i, v in enumerate(vectors):
            emb: Any = (base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if r.encoding_format == "base64"
                        else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(map(len, inputs))
        return {"object": "list", "data": data, "model": r.model or self.engine.model_id,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

"""A request as the engine core sees it: token ids in, token ids out.

Text (detokenization, stop strings) belongs to the frontend (`edgellm.api`); the core knows a
request's prompt ids, its sampling parameters, the token ids that stop it, and the compiled grammar
that constrains it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # <= 0: off
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False  # also the prompt tokens' logprobs (the core then skips the prefix cache)
    grammar: Any = None  # compiled grammar with .matcher() (edgellm.api.grammar), or None
    speculative: bool = True  # False: never draft for this request (when the engine speculates)

    @property
    def greedy(self) -> bool:
        # Temperatures this small make exp() overflow; they mean "greedy" in practice.
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SeqOutput:
    """What one choice produced in one step (token ids; the frontend turns them into text)."""

    index: int
    token_ids: list[int]
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top": [(id, lp), ...]}
    finish_reason: str | None = None


class Sequence:
    """One choice of a request: prompt + generated tokens and their KV cache slot."""

    def __init__(self, request: Request, index: int, prompt_ids: list[int]):
        self.request, self.index = request, index
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.status = Status.WAITING
        self.slot: int | None = None
        self.num_computed = 0  # tokens whose keys/values are in the cache
        self.cached_tokens = 0  # of which reused from an earlier request
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None
        seed = request.params.seed
        if seed is not None:
            self.generator = torch.Generator().manual_seed((int(seed) + index) % 2**63)
        self.grammar_matcher = request.params.grammar.matcher() if request.params.grammar is not None else None
        self.prompt_logprobs: list[dict] = []  # entries for prompt tokens 1.. (with params.prompt_logprobs)
        self.t_prefill_start: float | None = None
        self.t_first_token: float | None = None
        self.t_last_token: float | None = None
        self.spec: Any = None  # the speculator's per-sequence state (engine.speculative.SpecState)
        self.spec_drafted = 0  # drafted tokens verified by the target
        self.spec_accepted = 0  # of which accepted

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Known tokens not yet in the KV cache (prompt remainder, or the newest output token)."""
        return self.total_len - self.num_computed


class Request:
    """A completion with n choices. `consumer` is the frontend's: the engine loop hands it the outputs."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, n: int = 1,
                 stop_ids: set[int] | None = None, consumer: Any = None, lora: Any = None):
        self.request_id, self.params, self.n = request_id, params, n
        self.lora = lora  # the LoRA adapter (edgellm.models.lora.LoraAdapter) this request runs with, or None
        self.prompt_ids = prompt_ids
        self.stop_ids = stop_ids or set()  # the model's end-of-turn ids (ignored with ignore_eos)
        self.consumer = consumer
        self.arrival = time.perf_counter()
        self.sequences = [Sequence(self, i, prompt_ids) for i in range(n)]
        self.cancelled = False
        self.error: BaseException | None = None

    def is_stop_token(self, tok: int) -> bool:
        """Whether `tok` ends a choice (it is then not part of the output text)."""
        return tok in self.params.stop_token_ids or (not self.params.ignore_eos and tok in self.stop_ids)

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.sequences)

    def usage(self) -> dict:
        """Token counts and speeds over all choices."""
        seqs = self.sequences
        completion = sum(len(s.output_ids) for s in seqs)
        first = [s.t_first_token for s in seqs if s.t_first_token]
        start = [s.t_prefill_start for s in seqs if s.t_prefill_start]
        prompt = len(self.prompt_ids)
        cached = seqs[0].cached_tokens
        prefill_s = (min(first) - min(start)) if first and start else 0.0
        decode_tokens = sum(max(len(s.output_ids) - 1, 0) for s in seqs)
        decode_s = max((s.t_last_token - s.t_first_token) for s in seqs
                       if s.t_first_token and s.t_last_token) if first else 0.0
        drafted = sum(s.spec_drafted for s in seqs)
        accepted = sum(s.spec_accepted for s in seqs)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cached_tokens": cached,
            "prefill_tokens": prompt - cached,
            "prefill_tokens_per_s": (prompt - cached) / prefill_s if prefill_s > 0 else 0.0,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
            "ttft_s": (min(first) - self.arrival) if first else 0.0,
            "draft_tokens": drafted,
            "accepted_draft_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
        }


class TokenView:
    """A slot and its token ids, read by the runner as it reads a Sequence (a verify chunk's rows, a
    draft model's copy of a sequence)."""

    def __init__(self, slot: int, ids: list[int] | None = None):
        self.slot = slot
        self.prompt_ids: list[int] = [] if ids is None else ids  # all known ids (the runner's name for them)
        self.output_ids: list[int] = []

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids)

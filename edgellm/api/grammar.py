"""Structured output (`response_format` json_object / json_schema) through xgrammar token masks."""

from __future__ import annotations

import json
from typing import Any

import torch

from edgellm.errors import BadRequestError, UserError


def _vocab_type(tokenizer) -> Any:
    import xgrammar as xgr

    decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in kinds:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


class GrammarCompiler:
    """One per engine: the tokenizer's vocabulary as xgrammar needs it, and a grammar cache."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int]):
        try:
            import xgrammar as xgr
        except ImportError:
            raise UserError("response_format needs the xgrammar package: pip install xgrammar") from None
        n = tokenizer.vocab_size
        vocab = [tokenizer.id_to_token(i) or "" for i in range(n)]
        info = xgr.TokenizerInfo(vocab, _vocab_type(tokenizer), vocab_size=vocab_size,
                                 stop_token_ids=sorted(stop_ids) or None)
        self.compiler = xgr.GrammarCompiler(info)
        self.vocab_size = vocab_size

    def compile(self, response_format) -> CompiledResponseFormat:
        schema = response_format.json_schema
        if schema is not None:
            schema = schema.get("schema", schema)
        elif response_format.schema_ is not None:
            schema = response_format.schema_
        try:
            if schema is None:
                compiled = self.compiler.compile_builtin_json_grammar()
            else:
                text = schema if isinstance(schema, str) else json.dumps(schema)
                compiled = self.compiler.compile_json_schema(text)
        except Exception as e:  # xgrammar reports bad schemas with its own exception types
            raise BadRequestError(f"invalid JSON schema: {e}", param="response_format") from None
        return CompiledResponseFormat(compiled, self.vocab_size)


class CompiledResponseFormat:
    def __init__(self, compiled, vocab_size: int):
        self.compiled, self.vocab_size = compiled, vocab_size

    def matcher(self) -> GrammarState:
        return GrammarState(self.compiled, self.vocab_size)


class GrammarState:
    """Per-sequence matcher: masks logits before sampling, advances on each accepted token."""

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size

    def mask(self, logits_row: torch.Tensor) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        row = logits_row.unsqueeze(0)
        self.xgr.apply_token_bitmask_inplace(row, self.bitmask, vocab_size=self.vocab_size)

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(int(token))

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


def compile_response_format(engine, response_format) -> CompiledResponseFormat:
    """Compile a request's response_format with the engine's (lazily built) grammar compiler."""
    if getattr(engine, "_grammar", None) is None:
        engine._grammar = GrammarCompiler(engine.tokenizer, engine.config.vocab_size, engine.stop_ids)
    return engine._grammar.compile(response_format)

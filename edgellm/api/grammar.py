"""Structured output (`response_format` json_object / json_schema) through xgrammar token masks."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch

from edgellm.errors import BadRequestError, UserError

MAX_SCHEMA_CHARS = 64 * 1024
GRAMMAR_CACHE_SIZE = 64


def _vocab_type(tokenizer) -> Any:
    import xgrammar as xgr

    decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in kinds:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def draft07_to_2020_12(node: Any) -> Any:
    """Rewrite the draft-07 forms clients still send into JSON Schema 2020-12, which xgrammar reads:
    `definitions` -> `$defs` (and their `$ref`s), array-form `items` -> `prefixItems` with
    `additionalItems` -> `items`."""
    if isinstance(node, list):
        return [draft07_to_2020_12(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "definitions" and isinstance(value, dict):
            out.setdefault("$defs", {}).update({k: draft07_to_2020_12(v) for k, v in value.items()})
        elif key == "$defs" and isinstance(value, dict):
            out.setdefault("$defs", {}).update({k: draft07_to_2020_12(v) for k, v in value.items()})
        elif key == "$ref" and isinstance(value, str) and "/definitions/" in value:
            out[key] = value.replace("/definitions/", "/$defs/")
        elif key == "items" and isinstance(value, list):
            out["prefixItems"] = draft07_to_2020_12(value)
            extra = node.get("additionalItems", True if "additionalItems" not in node else node["additionalItems"])
            if extra is not True:
                out["items"] = draft07_to_2020_12(extra)
        elif key == "additionalItems":
            continue  # folded into `items` above (meaningless without array-form items)
        elif key == "$schema":
            continue
        elif key in ("properties", "patternProperties", "dependentSchemas") and isinstance(value, dict):
            out[key] = {name: draft07_to_2020_12(v) for name, v in value.items()}  # names, not keywords
        else:
            out[key] = draft07_to_2020_12(value)
    return out


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
        self._cache: OrderedDict[str | None, CompiledResponseFormat] = OrderedDict()  # schema text -> grammar
        self._lock = threading.Lock()

    def compile(self, response_format) -> CompiledResponseFormat:
        schema = response_format.json_schema
        if schema is not None:
            schema = schema.get("schema", schema)
        elif response_format.schema_ is not None:
            schema = response_format.schema_
        text = None if schema is None else schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
        if text is not None and len(text) <= MAX_SCHEMA_CHARS:
            try:  # draft-07 forms become 2020-12 (the cache key is the translated schema)
                text = json.dumps(draft07_to_2020_12(json.loads(text)), sort_keys=True)
            except ValueError:
                raise BadRequestError("response_format: the JSON schema is not valid JSON",
                                      param="response_format") from None
        if text is not None and len(text) > MAX_SCHEMA_CHARS:
            # compile time grows faster than linearly with a schema's size (a 1 MB enum takes minutes)
            raise BadRequestError(f"response_format: the JSON schema has {len(text)} characters; at most "
                                  f"{MAX_SCHEMA_CHARS} are accepted", param="response_format")
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit
        try:
            if text is None:
                compiled = self.compiler.compile_builtin_json_grammar()
            else:
                compiled = self.compiler.compile_json_schema(text)
        except Exception as e:  # xgrammar reports bad schemas with its own exception types
            raise BadRequestError(f"invalid JSON schema: {e}", param="response_format") from None
        result = CompiledResponseFormat(compiled, self.vocab_size)
        with self._lock:
            self._cache[text] = result
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return result


    def compile_tool_call(self, schema: dict) -> CompiledResponseFormat:
        """A grammar for one compact JSON tool call (no free whitespace for a model to ramble in)."""
        try:
            compiled = self.compiler.compile_json_schema(json.dumps(draft07_to_2020_12(schema)), any_whitespace=False)
        except Exception as e:
            raise BadRequestError(f"invalid tool parameters schema: {e}", param="tools") from None
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

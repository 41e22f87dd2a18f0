"""Fitting a conversation into a token budget by dropping its oldest whole turns.

A turn is a user message and the assistant/tool messages that follow it. Leading system (and
developer) messages are never dropped, nor is the last turn (the message being answered). Turns are
dropped down to `target` tokens (below the budget), so that the kept history then grows for a while
as a stable prefix whose KV cache the engine's prefix cache reuses, instead of shifting (and
recomputing) the whole prompt on every later turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

_PINNED = ("system", "developer")


def _role(m: Any) -> str:
    return m.get("role") if isinstance(m, dict) else getattr(m, "role", "")


def split_turns(messages: Sequence[Any]) -> tuple[list[Any], list[list[Any]]]:
    """(leading system messages, turns)."""
    i = 0
    while i < len(messages) and _role(messages[i]) in _PINNED:
        i += 1
    head, turns = list(messages[:i]), []
    for m in messages[i:]:
        if _role(m) == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return head, turns


def fit_history(messages: Sequence[Any], count_tokens: Callable[[list[Any]], int], budget: int,
                target: int | None = None) -> tuple[list[Any], int]:
    """(messages that fit `budget` tokens, number of whole turns dropped).

    Nothing is dropped while the conversation fits. Otherwise the oldest turns go until it is at most
    `target` tokens (default: `budget`); the system prompt and the last turn always stay, so the result
    can still exceed the budget when they alone do (the caller refuses that with both numbers).
    """
    messages = list(messages)
    if count_tokens(messages) <= budget:
        return messages, 0
    goal = budget if target is None else min(target, budget)
    head, turns = split_turns(messages)
    dropped = 0
    while len(turns) > 1:
        turns.pop(0)
        dropped += 1
        kept = head + [m for t in turns for m in t]
        if count_tokens(kept) <= goal:
            return kept, dropped
    return head + [m for t in turns for m in t], dropped

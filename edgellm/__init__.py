"""edgellm: a universal LLM deployment engine on PyTorch, CPU first."""

from __future__ import annotations

from edgellm.config import VERSION as __version__

__all__ = ["Engine", "AsyncEngine", "MLCEngine", "AsyncMLCEngine", "__version__"]


def __getattr__(name: str):
    # Lazy: `import edgellm` stays light for the CLI; the engine pulls in torch and friends.
    if name in ("Engine", "MLCEngine"):
        from edgellm.api.engine import Engine

        return Engine
    if name in ("AsyncEngine", "AsyncMLCEngine"):
        from edgellm.api.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'edgellm' has no attribute {name!r}")

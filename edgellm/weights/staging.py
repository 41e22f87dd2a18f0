"""Write a model directory atomically: files go to a staging directory and move in at the end.

A failed conversion leaves the output directory as it was (and does not create it).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgellm.errors import UserError

# Files convert_weight and gen_config write; anything else in the output directory is the
# user's and is never overwritten without --force.
MODEL_DIR_FILES = {
    "mlc-chat-config.json", "tensor-cache.json", "ndarray-cache.json", ".edgellm-verified.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "special_tokens_map.json", "generation_config.json",
}
_SHARD = re.compile(r"params_shard_\d+\.bin")


def foreign_files(out_dir: Path) -> list[str]:
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        return [out_dir.name]
    return sorted(p.name for p in out_dir.iterdir()
                  if p.name not in MODEL_DIR_FILES and not _SHARD.fullmatch(p.name))


@contextlib.contextmanager
def staged_output(out_dir: Path, force: bool = False, replaces_shards: bool = False) -> Iterator[Path]:
    """Yield a staging directory; on success move its files into `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory")
    others = foreign_files(out_dir)
    if others and not force:
        raise UserError(f"output directory {out_dir} already holds other files ({others[0]}"
                        f"{', ...' if len(others) > 1 else ''}); choose another or pass --force")
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=parent))
    except OSError as e:
        raise UserError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        yield stage
        out_dir.mkdir(parents=True, exist_ok=True)
        if replaces_shards:
            for old in out_dir.iterdir():
                if _SHARD.fullmatch(old.name) or old.name in ("tensor-cache.json", "ndarray-cache.json",
                                                              ".edgellm-verified.json"):
                    old.unlink()
        for f in stage.iterdir():
            shutil.move(str(f), str(out_dir / f.name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)

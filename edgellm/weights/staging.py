"""Write a model directory atomically: files go to a staging directory and move in at the end.

A failed conversion leaves the output directory as it was (and does not create it). A run killed
outright (SIGKILL, power loss) leaves its `.<name>.partial-<pid>-*` staging directory behind: the next
run for the same output removes such directories unless a live process still holds their lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
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
    "lora",  # convert_weight --lora-split: lora/<adapter name>/
}
_SHARD = re.compile(r"params_shard_\d+\.bin")
LOCK_NAME = ".edgellm-stage.lock"  # held (flock) by the process writing the staging directory
log = logging.getLogger("edgellm.staging")


def _pid_alive(stage: Path) -> bool:
    m = re.search(r"\.partial-(\d+)-", stage.name)
    if m is None:
        return False  # written before staging names carried a pid
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _stale(stage: Path) -> bool:
    """True when the process that made `stage` is gone: its pid is dead and nobody holds its lock.

    The pid covers the moment between creating the directory and locking it; a live pid (even a
    recycled one) keeps the directory, to be cleaned by a later run."""
    if _pid_alive(stage):
        return False
    try:
        fd = os.open(stage / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the probe's lock, if it got one


def clean_stale_stages(out_dir: Path) -> list[Path]:
    """Remove staging directories of `out_dir` left by killed runs; returns those removed."""
    removed = []
    parent = out_dir.resolve().parent
    for stage in parent.glob(f".{glob_escape(out_dir.name)}.partial-*"):
        if stage.is_dir() and not stage.is_symlink() and _stale(stage):
            shutil.rmtree(stage, ignore_errors=True)
            if not stage.exists():
                removed.append(stage)
                log.warning("removed %s, left by an interrupted run", stage)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


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
    if parent.is_dir():
        clean_stale_stages(out_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=parent))
        lock = os.open(stage / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield stage
        out_dir.mkdir(parents=True, exist_ok=True)
        if replaces_shards:
            for old in out_dir.iterdir():
                if _SHARD.fullmatch(old.name) or old.name in ("tensor-cache.json", "ndarray-cache.json",
                                                              ".edgellm-verified.json"):
                    old.unlink()
        for f in stage.iterdir():
            if f.name != LOCK_NAME:
                if f.is_dir() and (out_dir / f.name).is_dir():  # lora/: merge adapter directories in
                    for sub in f.iterdir():
                        shutil.rmtree(out_dir / f.name / sub.name, ignore_errors=True)
                        shutil.move(str(sub), str(out_dir / f.name / sub.name))
                    continue
                shutil.move(str(f), str(out_dir / f.name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        os.close(lock)

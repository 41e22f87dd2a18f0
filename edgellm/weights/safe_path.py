"""Names and paths read from files (manifests, index files, package configs) stay inside their directory.

A file's `dataPath`, a `weight_map` entry or a package config's `model_id` is data, not a path the
user chose: it must stay inside the directory it belongs to, name a regular
file (never a FIFO or a device, which would hang or stream forever), and ids that become directory
names must be plain names.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edgellm.errors import UserError

_BAD_CHARS = ("/", "\\", "\0")


def plain_name(name: object, what: str) -> str:
    """`name` if it is a plain file or directory name (no separators, not '.' or '..'), else a UserError."""
    if not isinstance(name, str) or not name or name in (".", "..") or len(name) > 255 \
            or any(c in name for c in _BAD_CHARS) or any(ord(c) < 32 for c in name):
        raise UserError(f"{what} must be a plain name (no '/', '\\', '..' or control characters), got {name!r}")
    return name


def inside(base: Path, name: object, what: str, *, must_exist: bool = True) -> Path:
    """`base / name` if `name` stays inside `base` and (when it exists) is a regular file, else a UserError.

    `what` names where the name came from, e.g. "tensor-cache.json dataPath". With `must_exist`, a
    missing file is an error too. The name is checked as written (no absolute path, no '..' out of
    `base`); a symlink placed in `base` is followed, since the Hugging Face hub cache stores every
    file of a snapshot as a link into its blobs/ directory, but what it reaches must be a regular file.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise UserError(f"{what}: expected a file name, got {name!r}")
    if os.path.isabs(name) or Path(name).is_absolute():
        raise UserError(f"{what}: {name!r} is an absolute path; only files inside {base} may be named")
    norm = os.path.normpath(name)
    if norm == ".." or norm.startswith(("../", "..\\")) or norm == ".":
        raise UserError(f"{what}: {name!r} points outside {base}")
    path = Path(base) / norm
    try:
        st = path.stat()
    except FileNotFoundError:
        if must_exist:
            raise UserError(f"{what}: {name!r} does not exist in {base}") from None
        return path
    except OSError as e:
        raise UserError(f"{what}: cannot read {name!r} in {base}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what}: {name!r} in {base} is not a regular file")
    return path

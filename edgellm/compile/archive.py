"""`.tar` model libraries: the device's artifact plus metadata.json, one flat archive.

    metadata.json          what the library was compiled for (target.make_metadata)
    <name>.pt2 | <name>.pte the artifact itself

This is the form of MLC-LLM's `--device android -o ...-android.tar` and `--device iphone -o
...-iphone.tar` commands; `edgellm package` copies it into the app bundle, and the runtime
loads it by extracting the artifact once into the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from edgellm.compile.target import METADATA_NAME
from edgellm.errors import UserError


def write_tar(out: Path, artifact: Path, metadata: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    blob = (json.dumps(metadata, indent=2) + "\n").encode()
    with tarfile.open(tmp, "w") as tar:
        info = tarfile.TarInfo(METADATA_NAME)
        info.size, info.mode = len(blob), 0o644
        tar.addfile(info, io.BytesIO(blob))
        tar.add(artifact, arcname=artifact.name)
    tmp.replace(out)


def _members(tar: tarfile.TarFile) -> tuple[tarfile.TarInfo | None, tarfile.TarInfo | None]:
    meta = art = None
    for m in tar.getmembers():
        if not m.isfile() or "/" in m.name.strip("./") or m.name.startswith(".."):
            continue
        if m.name == METADATA_NAME:
            meta = m
        elif m.name.endswith((".pt2", ".pte")):
            art = m
    return meta, art


def read_tar_metadata(path: Path) -> dict | None:
    try:
        with tarfile.open(path) as tar:
            meta, _ = _members(tar)
            return json.loads(tar.extractfile(meta).read()) if meta else None
    except (tarfile.TarError, OSError, json.JSONDecodeError):
        return None


def extract_artifact(path: Path, cache_root: Path) -> Path:
    """The artifact of a .tar library, extracted once under `cache_root` (keyed by the tar's identity)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    try:
        with tarfile.open(path) as tar:
            meta, art = _members(tar)
            if meta is None or art is None:
                raise UserError(f"{path}: not an edgellm model library archive "
                                f"(expected {METADATA_NAME} and a .pt2 or .pte file)")
            dest = cache_root / key / Path(art.name).name
            if not dest.exists() or dest.stat().st_size != art.size:
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(dest.name + f".{os.getpid()}.part")
                with tar.extractfile(art) as src, open(tmp, "wb") as f:
                    while chunk := src.read(1 << 20):
                        f.write(chunk)
                tmp.replace(dest)
            return dest
    except tarfile.TarError as e:
        raise UserError(f"{path}: not a readable tar archive ({e})") from None

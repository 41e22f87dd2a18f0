"""Model ids (`HF://org/name`, `org/name`) resolved through huggingface_hub: a download when online, the
local hub cache when offline (HF_HUB_OFFLINE=1 is honoured by huggingface_hub itself)."""

from __future__ import annotations

import re
from pathlib import Path

from edgellm.errors import UserError

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def repo_id_of(model: str) -> str | None:
    """The Hugging Face repo id MODEL names, or None when it is a path."""
    text = str(model).strip()
    if text[:5].lower() == "hf://":
        rid = text[5:].strip("/")
        if not _REPO_ID.fullmatch(rid):
            raise UserError(f"{model}: expected HF://org/name")
        return rid
    if _REPO_ID.fullmatch(text) and not Path(text).expanduser().exists():
        return text
    return None


def resolve_model(model: str | Path) -> str | Path:
    """MODEL as a local path: a repo id is fetched (or found in the hub cache); a path is returned as is."""
    rid = repo_id_of(str(model))
    if rid is None:
        return model
    from huggingface_hub import constants, snapshot_download

    offline = constants.HF_HUB_OFFLINE
    try:  # online, huggingface_hub itself falls back to a cached snapshot when the hub cannot be reached
        return Path(snapshot_download(rid, local_files_only=offline, etag_timeout=10))
    except Exception as e:  # noqa: BLE001 - no network, no such repo, gated repo, not cached...
        why = "HF_HUB_OFFLINE is set" if offline else f"and it could not be downloaded: {type(e).__name__}"
        raise UserError(f"{model}: no such file or directory, and the Hugging Face repo {rid} is not in the hub "
                        f"cache {constants.HF_HUB_CACHE} ({why})") from None

"""Model ids as in the seeds (`HF://org/name`, `org/name`) through huggingface_hub's cache, offline."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.test_chat_cli import _env

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, tiny_model):
    """A hub cache holding the converted tiny model as the repo mlc-ai/Tiny-q0f32-MLC (as `hf download` leaves it)."""
    repo = tmp_path / "hub" / "models--mlc-ai--Tiny-q0f32-MLC"
    shutil.copytree(tiny_model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "hub"


def chat(model: str, hub, **env) -> subprocess.CompletedProcess:
    # run in the cache's parent: org/name is a path first when one exists, and none does there
    return subprocess.run([sys.executable, "-m", "edgellm", "chat", model], input="hello\n/stats\n",
                          capture_output=True, text=True, timeout=300, cwd=hub.parent,
                          env=_env(HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", **env))


@pytest.mark.parametrize("model", ["HF://mlc-ai/Tiny-q0f32-MLC", "mlc-ai/Tiny-q0f32-MLC"])
def test_model_id_from_the_hub_cache(hub_cache, model):
    r = chat(model, hub_cache)
    assert r.returncode == 0, r.stderr
    assert "prefill:" in r.stdout


def test_model_id_not_in_the_cache_is_one_clear_line(hub_cache):
    r = chat("HF://mlc-ai/Not-There-MLC", hub_cache)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "mlc-ai/Not-There-MLC" in lines[0] and "HF_HUB_OFFLINE" in lines[0]

"""Issue 18 item 0: names and paths read from files never escape their directory.

Hostile package configs, tensor-cache.json and index files in a temporary directory, run through the
real CLI: each gets one clear line and exit 2, and nothing outside the output directory changes (a
'victim' directory and a 'secret' file beside it are compared byte for byte before and after).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.test_convert_errors import assert_user_error, run, snapshot


@pytest.fixture()
def arena(tmp_path: Path) -> Path:
    """tmp/victim (a directory with a file), tmp/secret.txt and tmp/work/ (where the runs happen)."""
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "precious.txt").write_text("do not delete")
    (tmp_path / "secret.txt").write_text("secret")
    (tmp_path / "work").mkdir()
    return tmp_path


def _package(arena: Path, model: Path, **entry) -> tuple:
    cfg = {"device": "android", "model_list": [{"model": str(model), "model_id": "m", "model_lib": "lib",
                                                "estimated_vram_bytes": 1, "bundle_weight": True, **entry}]}
    cfg_path = arena / "work" / "mlc-package-config.json"
    cfg_path.write_text(json.dumps(cfg))
    dist = arena / "work" / "deep" / "dist"
    return run("package", "--package-config", cfg_path, "-o", dist)


@pytest.mark.parametrize("entry, needle", [
    ({"model_id": "../../../victim"}, "model_id"),
    ({"model_id": "ABSOLUTE"}, "model_id"),
    ({"model_lib": "../../../owned"}, "model_lib"),
])
def test_package_ids_must_be_plain_names(arena, tiny_model, entry, needle):
    entry = {k: str(arena / "victim") if v == "ABSOLUTE" else v for k, v in entry.items()}
    before = snapshot(arena)
    r = _package(arena, tiny_model, **entry)
    assert_user_error(r, needle, "plain name")
    after = snapshot(arena)
    assert {k: v for k, v in after.items() if not k.startswith("work")} == \
        {k: v for k, v in before.items() if not k.startswith("work")}
    assert not (arena / "owned.pte").exists() and not (arena / "work" / "owned.pte").exists()


@pytest.mark.parametrize("data_path", ["sub/../../secret.txt", "ABSOLUTE"])
def test_package_does_not_bundle_files_outside_the_model(arena, tiny_model, data_path):
    model = arena / "work" / "model"
    shutil.copytree(tiny_model, model)
    cache_path = model / "tensor-cache.json"
    cache = json.loads(cache_path.read_text())
    cache["records"][0]["dataPath"] = str(arena / "secret.txt") if data_path == "ABSOLUTE" else data_path
    cache_path.write_text(json.dumps(cache))
    before = snapshot(arena)
    r = _package(arena, model)
    assert_user_error(r, "dataPath")
    after = snapshot(arena)
    after.pop("work/mlc-package-config.json")
    assert after == before  # failed before writing anything, even inside -o
    assert not any(p.read_bytes() == b"secret" for p in (arena / "work").rglob("*") if p.is_file())


def _hostile_cache(arena: Path, tiny_model: Path, data_path: str) -> Path:
    model = arena / "work" / "model"
    shutil.copytree(tiny_model, model)
    for name in ("tensor-cache.json", "ndarray-cache.json"):
        cache = json.loads((model / name).read_text())
        cache["records"][0]["dataPath"] = data_path
        (model / name).write_text(json.dumps(cache))
    return model


@pytest.mark.parametrize("kind", ["parent", "absolute", "fifo"])
def test_loading_reads_only_shards_inside_the_model(arena, tiny_model, kind):
    shard = json.loads((tiny_model / "tensor-cache.json").read_text())["records"][0]
    (arena / "secret.txt").write_bytes(b"\0" * shard["nbytes"])  # the right size: only the path can stop it
    if kind == "parent":
        model = _hostile_cache(arena, tiny_model, "../../secret.txt")
    elif kind == "absolute":
        model = _hostile_cache(arena, tiny_model, str(arena / "secret.txt"))
    else:
        model = _hostile_cache(arena, tiny_model, "pipe.bin")
        os.mkfifo(model / "pipe.bin")
    before = snapshot(arena / "victim")
    r = run("bench", model, "--prompt-len", "4", "--gen-len", "2", "--repeat", "1", "--no-bandwidth",
            timeout=120)  # a FIFO opened for reading would hang here
    assert_user_error(r, "dataPath")
    assert snapshot(arena / "victim") == before and (arena / "secret.txt").stat().st_size == shard["nbytes"]


def test_safetensors_index_cannot_point_outside(arena, tiny_hf):
    hf = arena / "work" / "hf"
    shutil.copytree(tiny_hf, hf)
    (hf / "model.safetensors").rename(arena / "x.safetensors")
    names = list(json.loads((arena / "x.safetensors").read_bytes()[8:8 + int.from_bytes(
        (arena / "x.safetensors").read_bytes()[:8], "little")]))
    index = {"metadata": {}, "weight_map": {n: "../x.safetensors" for n in names if n != "__metadata__"}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    before = snapshot(arena / "victim")
    r = run("convert_weight", hf, "--quantization", "q0f32", "-o", arena / "work" / "out")
    assert_user_error(r, "weight_map", "outside")
    assert not (arena / "work" / "out").exists() and snapshot(arena / "victim") == before


def test_hub_cache_symlinks_still_load(arena, tiny_model):
    """The Hugging Face hub cache keeps each file of a snapshot as a link into blobs/: that is not an escape."""
    model = arena / "work" / "snapshots" / "rev"
    shutil.copytree(tiny_model, model)
    blobs = arena / "work" / "blobs"
    blobs.mkdir()
    for shard in model.glob("params_shard_*.bin"):
        shard.rename(blobs / shard.name)
        shard.symlink_to(Path("../..") / "blobs" / shard.name)
    r = run("bench", model, "--prompt-len", "4", "--gen-len", "2", "--repeat", "1", "--no-bandwidth", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

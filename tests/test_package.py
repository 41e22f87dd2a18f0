"""`edgellm package`: the mlc-package-config.json of ../shared/seeds/000_28525b100099b851.txt
(section 4.5.3), with two models -> dist/lib + dist/bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_compile import tiny_llama

EDGELLM = [sys.executable, "-m", "edgellm"]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("pkg")
    a = tiny_llama(root / "a", seed=0)
    b = tiny_llama(root / "b", seed=1, layers=3)
    lib = root / "libs" / "a-android.tar"  # prebuilt, as seed 000 (above) copies the .tar into dist/lib
    r = subprocess.run(EDGELLM + ["compile", f"{a}/mlc-chat-config.json", "--device", "android", "-o", str(lib),
                                  "--overrides", "context_window_size=128;prefill_chunk_size=16"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return root, a, b


@pytest.mark.slow  # compiles and packages two models (minutes)
def test_package_two_models(two_models):
    root, a, b = two_models
    config = {
        "device": "android",
        "model_list": [
            {"model": str(a), "bundle_weight": True, "model_id": "tiny_a", "model_lib": "llama_a",
             "estimated_vram_bytes": 123456, "overrides": {"context_window_size": 128, "prefill_chunk_size": 16}},
            {"model": str(b), "bundle_weight": True, "model_id": "tiny_b", "model_lib": "llama_b",
             "estimated_vram_bytes": 654321},
        ],
        "model_lib_path_for_prepare_libs": {"llama_a": "./libs/a-android.tar"},
    }
    cfg_path = root / "mlc-package-config.json"
    cfg_path.write_text(json.dumps(config))
    dist = root / "dist"
    r = subprocess.run(EDGELLM + ["package", "--package-config", str(cfg_path), "-o", str(dist)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    app = json.loads((dist / "bundle" / "mlc-app-config.json").read_text())
    assert app["device"] == "android"
    assert [m["model_id"] for m in app["model_list"]] == ["tiny_a", "tiny_b"]
    for m, vram in zip(app["model_list"], (123456, 654321)):
        assert m["estimated_vram_bytes"] == vram
        lib = dist / m["model_lib_path"]
        assert lib.suffix == ".pte" and lib.stat().st_size == m["model_lib_bytes"]
        model_dir = dist / "bundle" / m["model_path"]
        files = {p.relative_to(model_dir).as_posix(): p.stat().st_size for p in model_dir.rglob("*") if p.is_file()}
        assert files == {f["name"]: f["bytes"] for f in m["files"]}
        assert sum(files.values()) == m["model_bytes"]
        assert "tensor-cache.json" in files and "tokenizer.json" in files and "mlc-chat-config.json" in files
    bundled_a = json.loads((dist / "bundle" / "tiny_a" / "mlc-chat-config.json").read_text())
    assert bundled_a["context_window_size"] == 128 and bundled_a["prefill_chunk_size"] == 16


def test_overrides_that_differ_from_the_prebuilt_library_are_refused(two_models):
    root, a, _ = two_models
    config = {"device": "android",
              "model_list": [{"model": str(a), "bundle_weight": True, "model_id": "tiny_a", "model_lib": "llama_a",
                              "estimated_vram_bytes": 1,
                              "overrides": {"context_window_size": 64, "prefill_chunk_size": 16}}],
              "model_lib_path_for_prepare_libs": {"llama_a": "./libs/a-android.tar"}}
    cfg_path = root / "mlc-package-config-64.json"
    cfg_path.write_text(json.dumps(config))
    r = subprocess.run(EDGELLM + ["package", "--package-config", str(cfg_path), "-o", str(root / "dist64")],
                       capture_output=True, text=True, timeout=900)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "context_window_size=64" in lines[0] and "compiled for context_window_size=128" in lines[0]
    assert not (root / "dist64" / "bundle" / "mlc-app-config.json").exists()


@pytest.mark.parametrize("config, needle", [
    ({"model_list": []}, "'device'"),
    ({"device": "android"}, "'model_list'"),
    ({"device": "android", "model_list": [{"model": "x", "model_id": "y", "model_lib": "z"}]},
     "'estimated_vram_bytes'"),
    ({"device": "android", "model_list": [{"model_id": "y", "model_lib": "z", "estimated_vram_bytes": 1}]},
     "'model'"),
])
def test_package_config_missing_keys(config, needle, tmp_path):
    cfg_path = tmp_path / "mlc-package-config.json"
    cfg_path.write_text(json.dumps(config))
    r = subprocess.run(EDGELLM + ["package", "--package-config", str(cfg_path), "-o", str(tmp_path / "dist")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in r.stderr

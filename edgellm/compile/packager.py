"""`edgellm package`: models, libraries and an app config for an Android or iOS app.

Reads MLC-LLM's mlc-package-config.json:

    {"device": "android",
     "model_list": [{"model": "path/to/converted-dir" | "HF://org/repo", "model_id": "qwen2_q4f16_1",
                     "model_lib": "qwen2_q4f16_1", "estimated_vram_bytes": 1630522470,
                     "overrides": {"context_window_size": 512, "prefill_chunk_size": 128},
                     "bundle_weight": true}],
     "model_lib_path_for_prepare_libs": {"qwen2_q4f16_1": "./dist/lib/Qwen2.5-1.5B-Instruct-q4f16_1-android.tar"}}

and writes

    dist/lib/<model_lib>.pte (android, iphone) or .pt2 (cpu, cuda, mps)   the compiled libraries
    dist/lib/<model_lib>.json                                           their metadata
    dist/bundle/mlc-app-config.json                                     the app config
    dist/bundle/<model_id>/...   weights, tokenizer and mlc-chat-config.json of bundled models

A model_lib without an entry in model_lib_path_for_prepare_libs is compiled here, from the
model and its overrides, for the config's device. Relative paths are relative to the config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgellm.compile import target as T
from edgellm.config import CHAT_CONFIG
from edgellm.errors import UserError
from edgellm.weights.safe_path import inside, plain_name

APP_CONFIG = "mlc-app-config.json"
REQUIRED_ENTRY_KEYS = ("model", "model_id", "model_lib", "estimated_vram_bytes")
WEIGHT_FILES = ("tensor-cache.json", "ndarray-cache.json")


def _fail(path: Path, msg: str) -> UserError:
    return UserError(f"{path}: {msg}")


def read_package_config(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"{path}: no such file (pass --package-config FILE)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _fail(path, f"not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise _fail(path, "must be a JSON object with 'device' and 'model_list'")
    for key in ("device", "model_list"):
        if key not in cfg:
            raise _fail(path, f"missing required key {key!r}")
    if not isinstance(cfg["model_list"], list) or not cfg["model_list"]:
        raise _fail(path, "'model_list' must be a non-empty list")
    seen = set()
    for i, entry in enumerate(cfg["model_list"]):
        if not isinstance(entry, dict):
            raise _fail(path, f"model_list[{i}] must be an object")
        for key in REQUIRED_ENTRY_KEYS:
            if key not in entry:
                raise _fail(path, f"model_list[{i}] is missing required key {key!r}")
        if not isinstance(entry["estimated_vram_bytes"], int) or entry["estimated_vram_bytes"] < 0:
            raise _fail(path, f"model_list[{i}].estimated_vram_bytes must be a non-negative integer")
        # Both become names under -o (bundle/<model_id>/, lib/<model_lib>.pte): plain names only.
        plain_name(entry["model_id"], f"{path}: model_list[{i}].model_id")
        plain_name(entry["model_lib"], f"{path}: model_list[{i}].model_lib")
        if entry["model_id"] in seen:
            raise _fail(path, f"model_id {entry['model_id']!r} appears twice")
        seen.add(entry["model_id"])
        if not isinstance(entry.get("overrides", {}), dict):
            raise _fail(path, f"model_list[{i}].overrides must be an object")
    libs = cfg.get("model_lib_path_for_prepare_libs", {})
    if not isinstance(libs, dict):
        raise _fail(path, "'model_lib_path_for_prepare_libs' must be an object")
    return cfg


def _is_url(model: str) -> bool:
    return model.startswith(("HF://", "hf://", "http://", "https://"))


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _bundle_model(src: Path, dest: Path, overrides: dict) -> None:
    """Copy weights, tokenizer and chat config; overrides go into the bundled chat config.

    Every file copied is named inside `src` (a manifest's dataPath cannot pull in other files)."""
    from edgellm.weights.tensor_cache import load_manifest

    cache = load_manifest(src)  # checks every dataPath stays inside src
    names = {n for n in WEIGHT_FILES if (src / n).exists()}
    names |= {r["dataPath"] for r in cache["records"]}
    cfg = json.loads((src / CHAT_CONFIG).read_text(encoding="utf-8"))
    tok_files = cfg.get("tokenizer_files") or []
    if not isinstance(tok_files, list) or not all(isinstance(n, str) for n in tok_files):
        raise UserError(f"{src / CHAT_CONFIG}: tokenizer_files must be a list of file names")
    names |= set(tok_files)
    names |= {p.name for p in src.iterdir() if p.name.startswith("tokenizer") or p.name in (
        "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "generation_config.json")}
    files = {name: inside(src, name, f"{src}: file to bundle", must_exist=False) for name in sorted(names)}
    if dest.resolve() == src.resolve() or dest.resolve() in src.resolve().parents:
        raise UserError(f"{src}: the model directory lies inside its own bundle destination {dest}")
    if dest.is_symlink():  # never follow a link out of -o
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for path in files.values():
        if path.is_file():
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    cfg.update(overrides)
    (dest / CHAT_CONFIG).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _prepare_lib(entry: dict, device: str, cfg_dir: Path, lib_map: dict, lib_dir: Path, log) -> tuple[Path, dict]:
    """The library of an entry in dist/lib (copied or compiled) and its metadata."""
    from edgellm.compile.runtime import inspect_library

    name = entry["model_lib"]
    ext = ".pte" if T.artifact_kind(device) == "pte" else ".pt2"
    dest = lib_dir / f"{name}{ext}"
    for old in (dest, lib_dir / f"{name}.json"):
        if old.is_symlink():  # written below: never through a link out of -o
            old.unlink()
    given = lib_map.get(name)
    if given:
        src = (cfg_dir / given).expanduser()
        if not src.exists():
            raise UserError(f"model_lib_path_for_prepare_libs[{name!r}]: {src} does not exist")
        meta, artifact, kind = inspect_library(src)
        _check_overrides(meta, entry, src.name)
        if meta.get("device") != device:
            raise UserError(f"model library {src.name} was compiled for {meta.get('device')}, but the package "
                            f"config's device is {device}")
        if artifact.resolve() != dest.resolve():
            shutil.copy2(artifact, dest)
        log(f"  library {name}: {src.name} -> {dest}")
    else:
        model = entry["model"]
        if _is_url(str(model)):
            raise UserError(f"model_lib {name!r} has no prebuilt library and {model} cannot be downloaded here: "
                            f"convert it, then list its library in model_lib_path_for_prepare_libs")
        from edgellm.compile.compiler import compile_model

        log(f"  library {name}: compiling {model} for {device}")
        res = compile_model(cfg_dir / model, dest, device, "O2", entry.get("overrides") or {}, log=log)
        meta = res.metadata
    (lib_dir / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dest, meta


def _check_overrides(meta: dict, entry: dict, lib_name: str) -> None:
    """A prebuilt library was compiled for fixed sizes: an entry's overrides must say the same."""
    overrides = T.parse_overrides(entry.get("overrides") or {})
    for key in ("context_window_size", "prefill_chunk_size", "max_batch_size"):
        if key in overrides and meta.get(key) is not None and int(meta[key]) != overrides[key]:
            raise UserError(f"{entry['model_id']}: overrides say {key}={overrides[key]}, but the model library "
                            f"{lib_name} was compiled for {key}={meta[key]}; recompile it with --overrides "
                            f"\"{key}={overrides[key]}\" (or drop its model_lib_path_for_prepare_libs entry to "
                            "compile it here), or change the override")


def _check_lib_fits(meta: dict, lib: Path, model_dir: Path, model_id: str) -> None:
    from edgellm.config import load_chat_config
    from edgellm.models.loader import arch_config

    if not (model_dir / CHAT_CONFIG).exists():
        raise UserError(f"{model_id}: {model_dir} is not a converted model directory (no {CHAT_CONFIG})")
    cfg = load_chat_config(model_dir)
    T.check_match(meta, lib, cfg, arch_config(cfg), model_dir)


def _check_bundle_sources(cfg: dict, cfg_dir: Path) -> None:
    from edgellm.weights.tensor_cache import load_manifest

    for entry in cfg["model_list"]:
        model = str(entry["model"])
        if entry.get("bundle_weight", False) and not _is_url(model):
            src = (cfg_dir / model).expanduser()
            if not (src / CHAT_CONFIG).exists():
                raise UserError(f"{entry['model_id']}: {src} is not a converted model directory (no {CHAT_CONFIG})")
            load_manifest(src)


def package(config_path: str | Path = "mlc-package-config.json", output: str | Path = "dist", log=print) -> dict:
    """Write dist/lib and dist/bundle; returns the app config."""
    config_path = Path(config_path).expanduser()
    cfg = read_package_config(config_path)
    device = T.normalize_device(str(cfg["device"]))
    cfg_dir = config_path.parent
    out = Path(output).expanduser()
    _check_bundle_sources(cfg, cfg_dir)  # before writing anything, and before a long compile
    lib_dir, bundle_dir = out / "lib", out / "bundle"
    lib_dir.mkdir(parents=True, exist_ok=True)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    lib_map = cfg.get("model_lib_path_for_prepare_libs", {})
    app = {"device": device, "model_list": []}
    done_libs: dict[str, tuple[Path, dict]] = {}
    for entry in cfg["model_list"]:
        model_id, lib_name = entry["model_id"], entry["model_lib"]
        overrides = T.parse_overrides(entry.get("overrides") or {})
        log(f"Packaging {model_id}")
        if lib_name not in done_libs:
            done_libs[lib_name] = _prepare_lib(entry, device, cfg_dir, lib_map, lib_dir, log)
        lib_path, meta = done_libs[lib_name]
        _check_overrides(meta, entry, lib_path.name)
        model = str(entry["model"])
        if not _is_url(model):
            _check_lib_fits(meta, lib_path, (cfg_dir / model).expanduser(), model_id)
        item = {"model_id": model_id, "model_lib": lib_name,
                "model_lib_path": lib_path.relative_to(out).as_posix(),
                "model_lib_bytes": lib_path.stat().st_size,
                "estimated_vram_bytes": entry["estimated_vram_bytes"],
                "overrides": overrides,
                "context_window_size": meta.get("context_window_size"),
                "model_type": meta.get("model_type"), "quantization": meta.get("quantization")}
        if entry.get("bundle_weight", False):
            if _is_url(model):
                raise UserError(f"{model_id}: bundle_weight needs a local model directory, not {model}")
            src = (cfg_dir / model).expanduser()
            if not (src / CHAT_CONFIG).exists():
                raise UserError(f"{model_id}: {src} is not a converted model directory (no {CHAT_CONFIG})")
            dest = bundle_dir / model_id
            _bundle_model(src, dest, overrides)
            files = sorted(p for p in dest.rglob("*") if p.is_file())
            item["model_path"] = model_id
            item["model_bytes"] = _dir_bytes(dest)
            item["files"] = [{"name": p.relative_to(dest).as_posix(), "bytes": p.stat().st_size} for p in files]
            log(f"  bundled {len(files)} files ({item['model_bytes'] / 1e6:.1f} MB) in {dest}")
        else:
            item["model_url"] = model
        app["model_list"].append(item)
    (bundle_dir / APP_CONFIG).write_text(json.dumps(app, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"Wrote {bundle_dir / APP_CONFIG} ({len(app['model_list'])} models) and {len(done_libs)} libraries "
        f"in {lib_dir}")
    return app

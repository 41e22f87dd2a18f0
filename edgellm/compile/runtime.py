"""Run a compiled model library in the engine in place of the eager model.

`load_library(path, model_dir, ...)` checks that the library was compiled for the model and returns a
runner with ModelRunner's interface (`step(chunks) -> logits [R, vocab]`) and the context window it
supports (`runner.context_window`).

The compiled programs handle one sequence per call and keep their own static KV caches, one
per sequence slot (an AOTInductor library: key and value tensors per layer and slot; an
ExecuTorch program: one loaded copy of the program per slot, the cache inside it). The
engine's KV pool is not used. A runner state remembers which tokens its cache holds, so a
sequence whose cache is missing (more sequences than states, a forked choice, a reused prefix)
is rebuilt by copying a state with the same prefix or by recomputing it: results always equal
the eager engine's. The engine's scheduler keeps only a SlotLedger (slots, no memory) beside it.
The runners share `StaticRunner` (static_runner.py: states, prefix reuse, recomputation); the .pt2
runner is `AOTIRunner` (aoti_runner.py), the .pte runner `PteRunner` (here).
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from edgellm.compile import target as T
from edgellm.compile.aoti_runner import AOTIRunner
from edgellm.compile.static_runner import StaticRunner
from edgellm.errors import UserError


def sniff(path: Path) -> str:
    """'pt2', 'pte' or 'tar' from the file's content."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04" or zipfile.is_zipfile(path):
        return "pt2"
    if head[4:6] == b"ET":
        return "pte"
    if tarfile.is_tarfile(path):
        return "tar"
    raise UserError(f"{path}: not a model library (expected an AOTInductor .pt2, an ExecuTorch .pte "
                    "or an edgellm .tar)")


def inspect_library(path: str | Path) -> tuple[dict, Path, str]:
    """(metadata, artifact path, artifact kind) of a library file; UserError if it is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model library {path}: no such file")
    kind = sniff(path)
    if kind == "tar":
        from edgellm.compile.archive import extract_artifact, read_tar_metadata
        from edgellm.paths import edgellm_home

        meta = read_tar_metadata(path)
        if meta is None:
            raise UserError(f"{path}: not an edgellm model library archive (no metadata.json)")
        art = extract_artifact(path, edgellm_home() / "libs")
        return meta, art, meta.get("artifact", "pt2")
    if kind == "pt2":
        from edgellm.compile.aoti import read_pt2_metadata

        meta = read_pt2_metadata(path)
    else:
        from edgellm.compile.executorch_export import read_pte_metadata

        meta = read_pte_metadata(path)
    if meta is None:
        raise UserError(f"{path}: not an edgellm model library (no edgellm metadata; compile it with "
                        "`edgellm compile`)")
    return meta, path, kind


class PteRunner(StaticRunner):
    """An ExecuTorch program through ExecuTorch's Python runtime (CPU)."""

    def __init__(self, meta: dict, lib: Path, ledger, num_sequences: int, artifact: Path):
        super().__init__(meta, lib, ledger, num_sequences)
        self.artifact = artifact
        self._new_handle()  # fail here, not at the first request, if the program does not load

    def _new_handle(self):
        # Methods of one loaded program share their planned memory (the KV cache): every state
        # loads the program anew (the file is memory-mapped, so the weights are not duplicated).
        from edgellm.compile.executorch_export import PteProgram

        prog = PteProgram(self.artifact)
        return prog, prog.new_method()

    def _forward(self, handle, ids, start):
        from edgellm.compile.executorch_export import run_method

        return run_method(handle[1], ids, start)


def load_library(model_lib: str | Path, model_dir: Path, cfg, arch, device: str, num_sequences: int,
                 ledger) -> StaticRunner:
    """The runner for `model_lib`, checked against the model in `model_dir` (chat config `cfg`, `arch`)."""
    meta, artifact, kind = inspect_library(model_lib)
    lib = Path(model_lib)
    T.check_match(meta, lib, cfg, arch, Path(model_dir))
    dev = meta.get("device")
    if kind == "pt2":
        want = str(device).split(":")[0]
        if dev != want:
            raise UserError(f"model library {lib.name} was compiled for {dev}, but the engine runs on {want}; "
                            f"pass device={dev!r} (--device {dev}) or compile for {want}")
        return AOTIRunner(meta, lib, ledger, num_sequences, artifact, Path(model_dir), device)
    if str(device) != "cpu":
        raise UserError(f"model library {lib.name} is an ExecuTorch program for {dev}; it runs on the CPU "
                        "here: pass device='cpu' (--device cpu)")
    return PteRunner(meta, lib, ledger, num_sequences, artifact)

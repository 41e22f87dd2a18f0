"""LoRA adapters applied at run time: one base model, several adapters, chosen per sequence.

A PEFT adapter names Hugging Face weights (q_proj, k_proj, gate_proj, wqkv, query_key_value, ...);
`adapter_weights` maps each pair onto our module the way conversion maps the weight (the family's
`hf_rename`, `HF_FUSED`, `hf_transform`). For a fused module (qkv_proj = [q; k; v] rows, gate_up_proj)
the parts' A matrices are stacked and their B matrices placed block-diagonally, so
x·A_catᵀ·B_catᵀ is each part's x·Aᵀ·Bᵀ in its own rows (a part the adapter leaves out has zero rows);
a row permutation of the fused weight (internlm2's wqkv, gpt_neox's query_key_value) is applied to B.

`LoraSet` holds the loaded adapters and a forward hook on every adapted linear layer. During a step
the runner binds the row groups ((adapter, rows) of the flattened batch); each hook adds, for each
group, (x[rows]·Aᵀ)·Bᵀ (the scale folded into B) to the base product, which the native quantized
kernels computed once for every row. Outside a bound step the hooks do nothing.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from edgellm.errors import BadRequestError, UserError
from edgellm.models.config import ArchConfig
from edgellm.models.gguf_hooks import llama_part_rows
from edgellm.weights.lora import PeftAdapter, read_adapter

# The facts a split adapter records about its base and the engine compares.
BASE_FACTS = ("model_type", "hidden_size", "num_layers", "vocab_size")


class UnknownAdapterError(BadRequestError):
    """A request or call naming an adapter that is not loaded (HTTP 404, code model_not_found)."""

    def __init__(self, name: str, loaded: list[str], what: str = "lora", served: list[str] | None = None):
        if what == "model":
            msg = f"model {name!r} is not served here; available: {', '.join(served or [])}"
        else:
            msg = f"LoRA adapter {name!r} is not loaded (loaded: {', '.join(loaded) or 'none'})"
        super().__init__(msg, param=what, code="model_not_found")


def base_facts(model_type: str, arch: ArchConfig) -> dict:
    return {"model_type": model_type, "hidden_size": arch.hidden_size, "num_layers": arch.num_layers,
            "vocab_size": arch.vocab_size}


def _fused_part(family: ModuleType, name: str) -> tuple[str, str | None, int]:
    """(our module name, fused HF part or None, index of the part) of our (renamed) weight name."""
    dotted = "." + name
    for fused, parts in family.HF_FUSED.items():
        for idx, part in enumerate(parts):
            token = "." + part + "."
            if token in dotted:
                return dotted.replace(token, "." + fused + ".", 1)[1:-len(".weight")], part, idx
    return name[:-len(".weight")], None, 0


def adapter_weights(peft: PeftAdapter, model: nn.Module, family: ModuleType
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{our module name: (A [R, in], B [out, R])} in float32 for `model`; a UserError names the first
    weight the base lacks (or has in another shape)."""
    where = peft.path.name
    blocks = model.PARTS[1] + "."
    modules = dict(model.named_modules())
    grouped: dict[str, dict[int, tuple[str | None, torch.Tensor, torch.Tensor]]] = {}
    for hf_name, (a, b) in peft.pairs.items():
        ours = family.hf_rename(hf_name)
        module, part, idx = _fused_part(family, ours) if ours else (hf_name, None, 0)
        target = modules.get(module)
        if ours is None or target is None or not hasattr(target, "out_features"):
            raise UserError(f"LoRA adapter {where} targets {hf_name[:-len('.weight')]}, which the base model "
                            "does not have (unknown target module)")
        if not module.startswith(blocks):
            raise UserError(f"LoRA adapter {where} adapts {module}: run-time adapters cover the decoder layers' "
                            "linear layers only (merge it at convert with --lora-adapter)")
        grouped.setdefault(module, {})[idx] = (part, a, b)
    rows = llama_part_rows(model.cfg)
    transform = getattr(family, "hf_transform", None)
    out = {}
    for module, parts in grouped.items():
        layer = modules[module]
        if len(parts) == 1 and next(iter(parts.values()))[0] is None:
            _, a, b = parts[0]
        else:  # a fused module: stack A, B block-diagonal over the parts' rows
            fused = next(f for f, ps in family.HF_FUSED.items() if module.endswith("." + f))
            sizes = [rows[p] for p in family.HF_FUSED[fused]]
            offsets = [0, *itertools.accumulate(sizes)]
            a = torch.cat([parts[i][1] for i in sorted(parts)])
            b = torch.zeros(offsets[-1], a.shape[0])
            col = 0
            for i in sorted(parts):
                _, pa, pb = parts[i]
                if pb.shape[0] != sizes[i]:
                    raise _shape_error(where, module, "outputs", pb.shape[0], sizes[i])
                b[offsets[i]:offsets[i + 1], col:col + pa.shape[0]] = pb
                col += pa.shape[0]
        if a.shape[1] != layer.in_features:
            raise _shape_error(where, module, "inputs", a.shape[1], layer.in_features)
        if b.shape[0] != layer.out_features:
            raise _shape_error(where, module, "outputs", b.shape[0], layer.out_features)
        if transform is not None:
            b = transform(module + ".weight", b, model.cfg)
        out[module] = (a.float().contiguous(), b.float().contiguous())
    return out


def _shape_error(where: str, module: str, what: str, got: int, want: int) -> UserError:
    return UserError(f"LoRA adapter {where} does not fit this base model: {module} has {want} {what}, "
                     f"the adapter {got} (an adapter for another model?)")


@dataclass
class LoraAdapter:
    """A loaded adapter: its weights per module of the model; `key` is unique per load (prefix caches)."""

    name: str
    path: str
    key: str
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


class LoraSet:
    """The adapters loaded into one eager model, and the hooks that apply them to a step's rows."""

    def __init__(self, model: nn.Module, family: ModuleType, model_type: str):
        self.model, self.family, self.model_type = model, family, model_type
        self.adapters: dict[str, LoraAdapter] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._groups: list[tuple[LoraAdapter, torch.Tensor | None]] = []
        self._loads = itertools.count(1)
        self.used = False  # an adapter was ever added (then an unknown model name is an error, not the base)

    def names(self) -> list[str]:
        return list(self.adapters)

    def get(self, name: str) -> LoraAdapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise UnknownAdapterError(name, self.names())
        return adapter

    def read(self, name: str, path: str | Path) -> LoraAdapter:
        """Read and check an adapter against the model (no change to the set: safe off the step thread)."""
        if not name or any(c in name for c in ":/ \t") or name.startswith("."):
            raise UserError(f"bad LoRA adapter name {name!r}: use letters, digits, '-', '_' or '.'")
        peft = read_adapter(path)
        facts = base_facts(self.model_type, self.model.cfg)
        for key, want in peft.base.items():
            if key in facts and facts[key] != want:
                raise UserError(f"LoRA adapter {peft.path} was made for another base model: its {key} is "
                                f"{want}, this model's is {facts[key]}")
        device = self.model.rope.cos.device
        # float32 on a CPU: its half-precision matmuls are many times slower than float32 ones
        dtype = torch.float32 if device.type == "cpu" else None
        weights = {m: (a.to(device, dtype), b.to(device, dtype))
                   for m, (a, b) in adapter_weights(peft, self.model, self.family).items()}
        rank = max(a.shape[0] for a, _ in weights.values())
        return LoraAdapter(name, str(peft.path), f"{name}#{next(self._loads)}", rank, weights)

    def add(self, adapter: LoraAdapter) -> None:
        """Make `adapter` known under its name (call between steps: it may add hooks)."""
        if adapter.name in self.adapters:
            raise UserError(f"a LoRA adapter named {adapter.name!r} is loaded already (unload it first)")
        modules = dict(self.model.named_modules())
        for module in adapter.weights:
            if module not in self._hooks:  # kept once added: a running request may still use the adapter
                self._hooks[module] = modules[module].register_forward_hook(functools.partial(self._apply, module))
        self.adapters[adapter.name] = adapter
        self.used = True

    def remove(self, name: str) -> LoraAdapter:
        """Forget an adapter's name; requests already holding it finish with it."""
        adapter = self.get(name)
        del self.adapters[name]
        return adapter

    @contextmanager
    def bound(self, groups: list[tuple[LoraAdapter, torch.Tensor | None]]) -> Iterator[None]:
        """Apply `groups` ((adapter, row indices or None = every row)) during the forward inside."""
        self._groups = groups
        try:
            yield
        finally:
            self._groups = []

    def _apply(self, module: str, _layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not self._groups:
            return None
        x = args[0]  # [T, in]; out [T, out]
        for adapter, rows in self._groups:
            ab = adapter.weights.get(module)
            if ab is None:
                continue
            a, b = ab
            if rows is not None and rows.device != x.device:
                rows = rows.to(x.device)
            xs = x if rows is None else x.index_select(0, rows)
            delta = ((xs.to(a.dtype) @ a.T) @ b.T).to(out.dtype)  # [rows, R] -> [rows, out]
            if rows is None:
                out = out + delta
            else:
                out = out.index_add(0, rows, delta)
        return out


def row_groups(adapters: list[LoraAdapter | None], lengths: list[int]
               ) -> list[tuple[LoraAdapter, torch.Tensor | None]]:
    """Group a step's rows by adapter: sequence i owns the next lengths[i] rows and uses adapters[i]."""
    rows: dict[str, tuple[LoraAdapter, list[int]]] = {}
    at = 0
    for adapter, n in zip(adapters, lengths):
        if adapter is not None:
            rows.setdefault(adapter.key, (adapter, []))[1].extend(range(at, at + n))
        at += n
    return [(ad, None if len(idx) == at else torch.tensor(idx, dtype=torch.long)) for ad, idx in rows.values()]

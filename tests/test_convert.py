"""Conversion round trips: source formats (sharded safetensors, PyTorch .bin), unquantized
modes, LoRA merging, shard files and manifests, memory-mapped loading."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from edgellm.errors import UserError
from edgellm.models.loader import load_model
from edgellm.weights import tensor_cache
from edgellm.weights.convert import convert_weight
from edgellm.weights.tensor_cache import read_tensors
from tests.helpers import convert, run_logits
from tests.test_quantization import tiny_llama

IDS = torch.randint(5, 384, (24,), generator=torch.Generator().manual_seed(7))


def hf_logits(model, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids[None]).logits[0].float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def same_tensors(a, b) -> None:
    ta, tb = dict(read_tensors(a)), dict(read_tensors(b))
    assert list(ta) == list(tb) or set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


# --------------------------------------------------------------------------------------------
# Source formats
# --------------------------------------------------------------------------------------------

def test_sharded_safetensors(tmp_path):
    model, hf_dir = tiny_llama(tmp_path, "h64")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="60KB")
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(hf_dir / f, sharded / f)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 2 and not (sharded / "model.safetensors").exists()

    out = convert(sharded, tmp_path / "out-sharded", "q0f32", conv_template="chatml")
    assert max_diff(run_logits(out, IDS), hf_logits(model)) < 1e-4
    # Same tensors as converting the single-file checkpoint.
    single = convert(hf_dir, tmp_path / "out-single", "q4f16_1", conv_template="chatml")
    sharded_q = convert(sharded, tmp_path / "out-sharded-q", "q4f16_1", conv_template="chatml")
    same_tensors(single, sharded_q)


def write_torch_bin(model, hf_dir, name="pytorch_model.bin"):
    for f in hf_dir.glob("*.safetensors"):
        f.unlink()
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, hf_dir / name)


def test_pytorch_bin_loaded_weights_only(tmp_path, monkeypatch):
    model, hf_dir = tiny_llama(tmp_path, "h72")
    write_torch_bin(model, hf_dir)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    out = convert(hf_dir, tmp_path / "out", "q0f32", conv_template="chatml")
    assert calls and all(c is True for c in calls), calls
    assert max_diff(run_logits(out, IDS), hf_logits(model)) < 1e-4


class _Payload:
    """Unpickling this runs os.mkdir(path): a stand-in for arbitrary code in a .bin."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pytorch_bin_with_pickled_object_is_refused(tmp_path):
    model, hf_dir = tiny_llama(tmp_path, "h64")
    write_torch_bin(model, hf_dir)
    marker = tmp_path / "code-was-executed"
    sd = torch.load(hf_dir / "pytorch_model.bin", weights_only=True)
    sd["extra"] = _Payload(str(marker))
    torch.save(sd, hf_dir / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model\.bin.*weights_only=True"):
        convert_weight(hf_dir, "q4f16_1", tmp_path / "out", progress=False)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_bf16_source_kept_bit_exact_in_q0bf16(tmp_path):
    model, hf_dir = tiny_llama(tmp_path, "h64")
    model = model.to(torch.bfloat16)
    for f in hf_dir.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(hf_dir)
    out = tmp_path / "out"
    convert_weight(hf_dir, "q0bf16", out, progress=False)
    t = dict(read_tensors(out))
    ref = model.state_dict()
    w = "model.layers.1.mlp.down_proj.weight"
    assert t[w].dtype == torch.bfloat16 and torch.equal(t[w], ref[w])
    qkv = torch.cat([ref[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(t["model.layers.0.self_attn.qkv_proj.weight"], qkv)


@pytest.mark.parametrize("quant,dtype", [("q0f16", torch.float16), ("q0bf16", torch.bfloat16)])
def test_unquantized_half_modes(quant, dtype, tmp_path):
    model, hf_dir = tiny_llama(tmp_path, "h72")
    ref_full = hf_logits(model)
    out = convert(hf_dir, tmp_path / "out", quant, conv_template="chatml")
    t = dict(read_tensors(out))
    assert all(v.dtype == dtype for v in t.values())
    assert "model.layers.0.self_attn.qkv_proj.weight" in t and "lm_head.weight" in t
    ours = run_logits(out, IDS)
    # Exactly transformers with its weights rounded to the mode's dtype ...
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    assert max_diff(ours, hf_logits(model)) < 1e-4
    # ... and close to the full-precision model.
    assert max_diff(ours, ref_full) < 5e-2


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------

def write_peft_adapter(path, model, r=4, alpha=16.0, targets=("q_proj", "v_proj", "down_proj")):
    """A PEFT-format LoRA adapter made by hand; returns {HF weight name: delta}."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "base_model_name_or_path": "tiny"}))
    g = torch.Generator().manual_seed(11)
    tensors, deltas = {}, {}
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 2)[-2]
        if mod in targets and name.endswith(".weight"):
            prefix = "base_model.model." + name[: -len(".weight")]
            a = torch.randn(r, p.shape[1], generator=g) * 0.2
            b = torch.randn(p.shape[0], r, generator=g) * 0.2
            tensors[prefix + ".lora_A.weight"] = a
            tensors[prefix + ".lora_B.weight"] = b
            deltas[name] = (b @ a) * (alpha / r)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return deltas


def test_lora_adapter_merge_through_cli(tmp_path):
    model, hf_dir = tiny_llama(tmp_path, "h72")
    deltas = write_peft_adapter(tmp_path / "adapter", model)
    assert len(deltas) == 6
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "edgellm", "convert_weight", str(hf_dir),
                        "--quantization", "q0f32", "-o", str(out), "--lora-adapter",
                        str(tmp_path / "adapter")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from edgellm.gen_config import gen_config

    gen_config(hf_dir, "q0f32", "chatml", out)
    base = hf_logits(model)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, d in deltas.items():
            params[name].add_(d)
    merged = hf_logits(model)
    assert max_diff(merged, base) > 1e-2  # the adapter matters
    assert max_diff(run_logits(out, IDS), merged) < 1e-4


def test_lora_adapter_for_missing_module_is_refused(tmp_path):
    model, hf_dir = tiny_llama(tmp_path, "h64")
    write_peft_adapter(tmp_path / "adapter", model)
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(t, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="layers.7"):
        convert_weight(hf_dir, "q0f32", tmp_path / "out", lora_adapter=tmp_path / "adapter",
                       progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Shards, manifests, mmap
# --------------------------------------------------------------------------------------------

def check_manifests(out):
    tc = json.loads((out / "tensor-cache.json").read_text())
    nd = json.loads((out / "ndarray-cache.json").read_text())
    assert tc == nd
    assert set(tc["metadata"]) >= {"ParamSize", "ParamBytes", "BitsPerParam"}
    for shard in tc["records"]:
        data = (out / shard["dataPath"]).read_bytes()
        assert shard["format"] == "raw-shard"
        assert shard["nbytes"] == len(data)
        assert shard["md5sum"] == hashlib.md5(data).hexdigest()
        for rec in shard["records"]:
            assert set(rec) >= {"name", "shape", "dtype", "format", "nbytes", "byteOffset"}
            assert rec["byteOffset"] + rec["nbytes"] <= shard["nbytes"]
    assert sorted(p.name for p in out.glob("params_shard_*.bin")) == \
        sorted(s["dataPath"] for s in tc["records"])
    return tc


def test_default_shards_hold_up_to_32_mib(tmp_path):
    """With the default settings a shard is filled up to MLC's 32 MiB and never past it: nine
    4 MiB tensors give a full shard of eight and a second of one, and read back unchanged."""
    writer = tensor_cache.ShardWriter(tmp_path)
    tensors = {f"t{i}": torch.full((1024, 1024), float(i)) for i in range(9)}  # 4 MiB each
    for name, t in tensors.items():
        writer.add(name, t, "float32")
    writer.close()
    shards = check_manifests(tmp_path)["records"]
    assert [s["nbytes"] for s in shards] == [32 * 1024 * 1024, 4 * 1024 * 1024]
    assert [len(s["records"]) for s in shards] == [8, 1]
    back = dict(read_tensors(tmp_path))
    assert set(back) == set(tensors) and all(torch.equal(back[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("quant", ["q0f32", "q4f16_1"])
def test_shards_are_capped_and_checksummed(quant, tmp_path, monkeypatch):
    model, hf_dir = tiny_llama(tmp_path, "h64")
    one = convert(hf_dir, tmp_path / "one", quant, conv_template="chatml")
    assert len(check_manifests(one)["records"]) == 1
    cap = 40_000 if quant == "q0f32" else 6_000
    monkeypatch.setattr(tensor_cache, "SHARD_BYTES", cap)
    many = convert(hf_dir, tmp_path / "many", quant, conv_template="chatml")
    manifest = check_manifests(many)
    assert len(manifest["records"]) >= 4
    for shard in manifest["records"]:
        # a shard exceeds the cap only when it holds one tensor bigger than the cap
        assert shard["nbytes"] <= cap or len(shard["records"]) == 1, shard
    same_tensors(one, many)
    assert torch.equal(run_logits(many, IDS), run_logits(one, IDS))


@pytest.mark.parametrize("quant", ["q0f32", "q4f16_1", "q3f16_1"])
def test_mmap_loading_gives_identical_logits(quant, tmp_path):
    model, hf_dir = tiny_llama(tmp_path, "h72")
    out = convert(hf_dir, tmp_path / "out", quant, conv_template="chatml")
    m1, cfg = load_model(out)
    m2, _ = load_model(out, use_mmap=True)
    from tests.test_mlc_dir import logits_of

    assert torch.equal(logits_of(m1, 64, IDS), logits_of(m2, 64, IDS))
    before = {p.name: p.read_bytes() for p in out.glob("params_shard_*.bin")}
    del m2
    assert {p.name: p.read_bytes() for p in out.glob("params_shard_*.bin")} == before  # untouched


def test_reconvert_into_same_dir_replaces_shards(tmp_path, monkeypatch):
    """Converting again (fewer shards) leaves no stale params_shard_N.bin behind."""
    model, hf_dir = tiny_llama(tmp_path, "h64")
    out = tmp_path / "out"
    monkeypatch.setattr(tensor_cache, "SHARD_BYTES", 40_000)
    convert(hf_dir, out, "q0f32", conv_template="chatml")
    assert len(list(out.glob("params_shard_*.bin"))) > 2
    monkeypatch.setattr(tensor_cache, "SHARD_BYTES", 32 * 1024 * 1024)
    convert_weight(hf_dir, "q4f16_1", out, progress=False)
    check_manifests(out)
    assert len(list(out.glob("params_shard_*.bin"))) == 1

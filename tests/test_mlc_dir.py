"""A model directory written the way MLC-LLM writes it loads in edgellm and computes what our
own conversion of the same weights computes.

The directory is built here by hand from docs/formats.md and ../shared/SPEC.md ("Model directory",
"Quantization"), independently of
edgellm's converter: a numpy group quantizer, MLC's parameter names and fusions, MLC's output
order, `ndarray-cache.json` only (the older name), every record with `"format": "f32-to-bf16"`
(float32 tensors stored as 2-byte bfloat16), records packed tightly without alignment, MLC's
shard policy, and an mlc-chat-config.json with MLC's model_config keys and a conv_template
object.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgellm.models.loader import load_model
from edgellm.weights.tensor_cache import read_tensors
from tests.helpers import convert, forward, kv_pool

CAP = 32 * 1024 * 1024


def mlc_group_quantize(w: np.ndarray, bits: int, group: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """docs/formats.md "Quantization" (MLC's converter): [N, K] -> (uint32 words [N, G*group/epw],
    scales [N, G]) in `dtype`."""
    dt = np.dtype(dtype)
    max_int = 2 ** (bits - 1) - 1
    epw = 32 // bits
    w = w.astype(dt)
    n, k = w.shape
    g = -(-k // group)
    padded = np.zeros((n, g * group), dtype=dt)
    padded[:, :k] = w
    grouped = padded.reshape(n, g, group)
    scale = (np.abs(grouped).max(axis=-1) / dt.type(max_int)).astype(dt)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = (grouped / scale[..., None]).astype(dt)  # each op rounded to the model dtype
        x = (x + dt.type(max_int)).astype(dt)
    codes = np.clip(np.rint(x.astype(np.float64)), 0, 2 * max_int)
    codes = np.nan_to_num(codes, nan=0.0).astype(np.uint64).reshape(n, g * group)
    codes[:, k:] = 0  # padding contributes no bits
    codes = codes.reshape(n, -1, epw)
    words = np.zeros(codes.shape[:2], dtype=np.uint64)
    for r in range(epw):
        words |= codes[..., r] << np.uint64(r * bits)
    return words.astype(np.uint32), scale


def f32_to_bf16_bytes(a: np.ndarray) -> bytes:
    """MLC's "f32-to-bf16" records (docs/formats.md): round-to-nearest-even on the bit pattern for
    finite values, keep the top 16 bits."""
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    limit = np.float32(np.frombuffer(np.uint32(0x7F7F0000).tobytes(), np.float32)[0])
    small = np.abs(a.astype(np.float32)) < limit
    rounded = np.where(small, b + 0x7FFF + ((b >> 16) & 1), b)
    return ((rounded >> 16) & 0xFFFF).astype("<u2").tobytes()


def mlc_llama_params(hf: dict[str, np.ndarray], cfg: dict) -> list[tuple[str, list[str], object]]:
    """(MLC name, HF sources, combine) for llama (notes 2.1), in MLC's output order (1.3)."""
    spec: list[tuple[str, list[str]]] = [("model.embed_tokens.weight", ["model.embed_tokens.weight"])]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        spec += [
            (p + "input_layernorm.weight", [p + "input_layernorm.weight"]),
            (p + "self_attn.qkv_proj.weight", [p + f"self_attn.{x}_proj.weight" for x in "qkv"]),
            (p + "self_attn.o_proj.weight", [p + "self_attn.o_proj.weight"]),
            (p + "post_attention_layernorm.weight", [p + "post_attention_layernorm.weight"]),
            (p + "mlp.gate_up_proj.weight", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
            (p + "mlp.down_proj.weight", [p + "mlp.down_proj.weight"]),
        ]
    spec.append(("model.norm.weight", ["model.norm.weight"]))
    if not cfg.get("tie_word_embeddings"):
        spec.append(("lm_head.weight", ["lm_head.weight"]))
    users: dict[str, list[int]] = {}
    for idx, (_, srcs) in enumerate(spec):
        for s in srcs:
            users.setdefault(s, []).append(idx)
    order, seen = [], set()
    for hf_name in sorted(hf):  # a single safetensors file lists its keys sorted
        for idx in users.get(hf_name, []):
            if idx not in seen:
                seen.add(idx)
                order.append(spec[idx])
    return [(name, srcs, lambda arrs: np.concatenate(arrs, axis=0)) for name, srcs in order]


def write_mlc_dir(out: Path, hf: dict[str, np.ndarray], hf_cfg: dict, quantization: str,
                  tokenizer_from: Path) -> None:
    """Write a directory exactly as MLC-LLM's convert_weight + gen_config would."""
    model_dtype = {"q4f16_1": "float16", "q4f32_1": "float32"}[quantization]
    out.mkdir(parents=True)
    tensors: list[tuple[str, np.ndarray]] = []
    for name, srcs, combine in mlc_llama_params(hf, hf_cfg):
        t = combine([hf[s] for s in srcs]).astype(model_dtype)
        if t.ndim == 2:  # every linear, the embedding and lm_head are quantized in q4*_1
            words, scale = mlc_group_quantize(t, 4, 32, model_dtype)
            base = name[: -len(".weight")]
            tensors += [(base + ".q_weight", words), (base + ".q_scale", scale)]
        else:
            tensors.append((name, t))
    shards: list[dict] = []
    pending: list[tuple[str, np.ndarray, bytes]] = []

    def flush(items):
        data, records, off = b"", [], 0
        for name, arr, raw in items:
            records.append({"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                            "format": "f32-to-bf16", "nbytes": len(raw), "byteOffset": off})
            data += raw
            off += len(raw)
        path = f"params_shard_{len(shards)}.bin"
        (out / path).write_bytes(data)
        shards.append({"dataPath": path, "format": "raw-shard", "nbytes": len(data),
                       "records": records, "md5sum": hashlib.md5(data).hexdigest()})

    for name, arr in tensors:
        raw = f32_to_bf16_bytes(arr) if arr.dtype == np.float32 else arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        size = sum(len(r) for _, _, r in pending)
        if size + len(raw) >= CAP:
            if 2 * len(raw) >= CAP:
                flush([(name, arr, raw)])
                continue
            if pending:
                flush(pending)
                pending = []
        pending.append((name, arr, raw))
    if pending:
        flush(pending)
    logical = sum(a.size * a.dtype.itemsize for _, a in tensors)
    n_src = sum(a.size for a in hf.values())
    cache = {"metadata": {"ParamSize": len(tensors), "ParamBytes": float(logical),
                          "BitsPerParam": logical * 8 / n_src},
             "records": shards}
    (out / "ndarray-cache.json").write_text(json.dumps(cache, indent=4))

    ctx = hf_cfg["max_position_embeddings"]
    theta = hf_cfg.get("rope_theta") or (hf_cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    model_config = {
        "hidden_size": hf_cfg["hidden_size"], "intermediate_size": hf_cfg["intermediate_size"],
        "num_attention_heads": hf_cfg["num_attention_heads"],
        "num_hidden_layers": hf_cfg["num_hidden_layers"], "rms_norm_eps": hf_cfg["rms_norm_eps"],
        "vocab_size": hf_cfg["vocab_size"], "tie_word_embeddings": hf_cfg["tie_word_embeddings"],
        "position_embedding_base": theta, "rope_scaling": None,
        "context_window_size": ctx, "prefill_chunk_size": min(ctx, 8192),
        "num_key_value_heads": hf_cfg["num_key_value_heads"],
        "head_dim": hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"],
        "tensor_parallel_shards": 1, "pipeline_parallel_stages": 1, "max_batch_size": 128,
        "disaggregation": False,
    }
    chatml = {
        "name": "chatml", "system_template": "<|im_start|>system\n{system_message}<|im_end|>\n",
        "system_message": "A conversation between a user and an LLM-based AI assistant. The assistant "
                          "gives helpful and honest answers.",
        "system_prefix_token_ids": None, "add_role_after_system_message": True,
        "roles": {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"},
        "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}",
                           "tool": "{tool_message}"},
        "messages": [], "seps": ["<|im_end|>\n"], "role_content_sep": "\n", "role_empty_sep": "\n",
        "stop_str": ["<|im_end|>"], "stop_token_ids": [2], "function_string": "",
        "use_function_calling": False,
    }
    tok_files = []
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / f, out / f)
        tok_files.append(f)
    chat = {
        "version": "0.1.0", "model_type": "llama", "quantization": quantization,
        "model_config": model_config, "vocab_size": hf_cfg["vocab_size"], "context_window_size": ctx,
        "sliding_window_size": -1, "prefill_chunk_size": min(ctx, 8192), "attention_sink_size": -1,
        "tensor_parallel_shards": 1, "pipeline_parallel_stages": 1,
        "active_vocab_size": hf_cfg["vocab_size"], "temperature": 1.0, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "repetition_penalty": 1.0, "top_p": 1.0,
        "tokenizer_files": tok_files,
        "tokenizer_info": {"token_postproc_method": "byte_level", "prepend_space_in_encode": False,
                           "strip_space_in_decode": False},
        "conv_template": chatml, "pad_token_id": 0, "bos_token_id": 3, "eos_token_id": 2,
        "model_task": "chat", "embedding_metadata": None,
    }
    (out / "mlc-chat-config.json").write_text(json.dumps(chat, indent=2))


def logits_of(model, ctx: int, ids: torch.Tensor) -> torch.Tensor:
    pool, slot = kv_pool(model, ctx)
    with torch.inference_mode():
        return forward(model, pool, slot, ids, 0)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from tests.test_quantization import tiny_llama

    tmp = tmp_path_factory.mktemp("mlcdir")
    # vocab 385 (odd) makes the embedding's f16 q_scale 385*3*2 bytes: every later uint32 record
    # starts at an offset that is not a multiple of 4 (MLC packs records without alignment).
    model, hf_dir = tiny_llama(tmp, "h72", vocab_size=385, rope_theta=50000.0)
    hf = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model, hf_dir, hf, tmp


IDS = torch.randint(5, 384, (20,), generator=torch.Generator().manual_seed(3))


def test_mlc_q4f16_1_dir_loads_like_our_conversion(hf_model):
    model, hf_dir, hf, tmp = hf_model
    mlc = tmp / "mlc-q4f16_1"
    write_mlc_dir(mlc, hf, json.loads((hf_dir / "config.json").read_text()), "q4f16_1", hf_dir)
    assert not (mlc / "tensor-cache.json").exists()
    offsets = [r["byteOffset"] for s in json.loads((mlc / "ndarray-cache.json").read_text())["records"]
               for r in s["records"] if r["dtype"] == "uint32"]
    assert any(o % 4 for o in offsets), "the test should exercise unaligned uint32 records"

    ours = convert(hf_dir, tmp / "ours-q4f16_1", "q4f16_1", conv_template="chatml")
    theirs_t, ours_t = dict(read_tensors(mlc)), dict(read_tensors(ours))
    assert set(theirs_t) == set(ours_t)
    for name, t in theirs_t.items():  # same codes, scales and norms, bit for bit
        assert t.dtype == ours_t[name].dtype and torch.equal(t, ours_t[name]), name

    m_ours, cfg_ours = load_model(ours)
    m_mlc, cfg_mlc = load_model(mlc)
    assert cfg_mlc.conv_template["name"] == "chatml"
    assert m_mlc.cfg.rope["rope_theta"] == 50000.0  # from model_config.position_embedding_base
    ref = logits_of(m_ours, 64, IDS)
    assert torch.equal(logits_of(m_mlc, 64, IDS), ref)
    m_map, _ = load_model(mlc, use_mmap=True)
    assert torch.equal(logits_of(m_map, 64, IDS), ref)


def test_mlc_q4f32_1_dir_decodes_f32_to_bf16(hf_model):
    """float32 scales and norms are stored as bf16 (2 bytes each) and widened when read."""
    model, hf_dir, hf, tmp = hf_model
    mlc = tmp / "mlc-q4f32_1"
    write_mlc_dir(mlc, hf, json.loads((hf_dir / "config.json").read_text()), "q4f32_1", hf_dir)
    manifest = json.loads((mlc / "ndarray-cache.json").read_text())
    norm = next(r for s in manifest["records"] for r in s["records"] if r["name"] == "model.norm.weight")
    assert norm["dtype"] == "float32" and norm["nbytes"] == 2 * 72

    ours = convert(hf_dir, tmp / "ours-q4f32_1", "q4f32_1", conv_template="chatml")
    theirs_t, ours_t = dict(read_tensors(mlc)), dict(read_tensors(ours))
    assert set(theirs_t) == set(ours_t)
    for name, t in ours_t.items():
        expect = t.to(torch.bfloat16).float() if t.dtype == torch.float32 else t
        assert torch.equal(theirs_t[name], expect), name
    assert not torch.equal(theirs_t["model.norm.weight"], ours_t["model.norm.weight"])  # lossy

    m_ours, _ = load_model(ours)
    with torch.no_grad():  # round our float32 tensors the way MLC's encoding does
        for t in list(m_ours.parameters()) + list(m_ours.buffers()):
            if t.dtype == torch.float32 and t.ndim and t is not m_ours.rope.cos and t is not m_ours.rope.sin:
                t.copy_(t.to(torch.bfloat16).float())
    m_mlc, _ = load_model(mlc)
    assert torch.equal(logits_of(m_mlc, 64, IDS), logits_of(m_ours, 64, IDS))


def test_tensor_cache_json_preferred_over_ndarray_cache(hf_model, tmp_path):
    """With both names present the current one (tensor-cache.json) is read."""
    model, hf_dir, hf, tmp = hf_model
    ours = convert(hf_dir, tmp_path / "ours", "q4f16_1", conv_template="chatml")
    bad = json.loads((ours / "ndarray-cache.json").read_text())
    bad["records"][0]["dataPath"] = "nonexistent.bin"
    (ours / "ndarray-cache.json").write_text(json.dumps(bad))
    load_model(ours)
    (ours / "tensor-cache.json").unlink()
    from edgellm.errors import UserError

    with pytest.raises(UserError, match="nonexistent.bin"):
        load_model(ours)

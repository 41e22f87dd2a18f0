"""--group-size (MNN's quant_block: 32, 64, 128, 0 = per channel) and --lm-quant-bit (a separate bit width for
the embedding and lm_head) for the q4 and q8 modes: recorded, loaded, and computing what the dequantized
weights compute."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from edgellm import Engine
from edgellm.gen_config import gen_config
from edgellm.models.loader import load_model
from edgellm.quantization.layers import QuantEmbedding, QuantLinear, repack_model
from edgellm.weights.convert import convert_weight
from tests.helpers import forward, kv_pool

IDS = torch.tensor([5, 17, 200, 33, 90, 4, 250, 11, 64, 120])


def convert_with(hf, out, quantization, **layout):
    convert_weight(hf, quantization, out, progress=False, **layout)
    gen_config(hf, quantization, "chatml", out)
    return out


def logits(model, cfg) -> torch.Tensor:
    pool, slot = kv_pool(model, len(IDS) + 1)
    with torch.inference_mode():
        return forward(model, pool, slot, IDS, 0)


def dequantized_reference(model_dir):
    """The same model with every quantized layer replaced by its dequantized float32 weight."""
    model, cfg = load_model(model_dir)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            if isinstance(mod, QuantLinear):
                new = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                new.weight.data = mod.dequantized_weight(torch.float32)
                if mod.bias is not None:
                    new.bias.data = mod.bias.float()
            else:
                new = torch.nn.Embedding(mod.num_embeddings, mod.embedding_dim)
                new.weight.data = torch.cat([mod(torch.arange(i, min(i + 64, mod.num_embeddings)))
                                             for i in range(0, mod.num_embeddings, 64)]).float()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model, cfg


def float_weights(model_dir) -> dict[str, torch.Tensor]:
    model, _ = load_model(model_dir)
    return {n: p for n, p in model.state_dict().items() if n.endswith(".weight") and p.dim() == 2}


LAYOUTS = [("q4f16_1", {"group_size": 64}), ("q4f16_1", {"group_size": 128}), ("q4f16_1", {"group_size": 0}),
           ("q8f16_1", {"group_size": 64}), ("q8f16_1", {"group_size": 0}),
           ("q4f16_1", {"lm_head_bits": 8}), ("q4f32_1", {"group_size": 128, "lm_head_bits": 8})]


@pytest.mark.parametrize(("quantization", "layout"), LAYOUTS, ids=[f"{q}-{lay}" for q, lay in LAYOUTS])
def test_layout_is_recorded_and_computes_the_dequantized_weights(tiny_hf, tiny_model, tmp_path, quantization,
                                                                 layout):
    out = convert_with(tiny_hf, tmp_path / "m", quantization, **layout)
    cfg = json.loads((out / "mlc-chat-config.json").read_text())
    meta = json.loads((out / "tensor-cache.json").read_text())["metadata"]
    assert cfg["quantization_layout"] == layout == meta["QuantizationLayout"]

    model, mcfg = load_model(out)
    gs = layout.get("group_size", 32)
    head_bits = layout.get("lm_head_bits")
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            k = mod.in_features if isinstance(mod, QuantLinear) else mod.embedding_dim
            head = name.endswith(("embed_tokens", "lm_head"))
            assert mod.q_scale.shape[1] == (1 if gs == 0 else -(-k // gs)), name
            if head and head_bits:
                assert mod.mode.bits == head_bits, name
            else:
                assert mod.mode.bits == (8 if quantization.startswith("q8") else 4), name
    # each dequantized weight is within half a step of the float weight, per group of the chosen size
    ref = float_weights(tiny_model)
    deq_model, _ = dequantized_reference(out)
    for name, w in float_weights_from(deq_model).items():
        w0 = ref[name].float()
        k = w0.shape[1]
        g = k if gs == 0 else gs
        kp = -(-k // g) * g
        padded = torch.nn.functional.pad(w0.abs(), (0, kp - k)).view(w0.shape[0], -1, g)
        head = name.startswith(("model.embed_tokens", "lm_head"))
        levels = {4: 7, 8: 127}[head_bits if head and head_bits else (8 if quantization.startswith("q8") else 4)]
        step = (padded.amax(-1, keepdim=True) / levels).expand_as(padded).reshape(w0.shape[0], kp)[:, :k]
        assert ((w - w0).abs() <= step * 0.505 + w0.abs() * 2e-3 + 1e-6).all(), name  # half a step, f16 rounding

    want = logits(deq_model, mcfg)
    # what the engine does (native kernels for 32-groups, the reference path otherwise), at the exact
    # precision: "normal" rounds activations to 8 bits (its quality is measured by edgellm perplexity)
    repack_model(model, precision="high")
    got = logits(model, mcfg)
    assert (got - want).abs().max().item() < 2e-3 * max(1.0, want.abs().max().item())


def completion_ids(eng, prompt: list[int], n: int) -> list[int]:
    r = eng.completions.create(prompt=prompt, max_tokens=n, temperature=0, ignore_eos=True, logprobs=1,
                               return_tokens_as_token_ids=True)
    return [int(t.split(":", 1)[1]) for t in r.choices[0].logprobs.tokens]


def reference_greedy(model, cfg, n: int) -> list[int]:
    pool, slot = kv_pool(model, len(IDS) + n + 1)
    out = []
    with torch.inference_mode():
        last = forward(model, pool, slot, IDS, 0)[-1]
        for i in range(n):
            out.append(int(last.argmax()))
            last = forward(model, pool, slot, torch.tensor([out[-1]]), len(IDS) + i)[-1]
    return out


def float_weights_from(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.state_dict().items() if n.endswith(".weight") and p.dim() == 2}


def test_cli_flags_and_engine_greedy(tiny_hf, tmp_path):
    out = tmp_path / "m"
    edgellm = [sys.executable, "-m", "edgellm"]
    r = subprocess.run([*edgellm, "convert_weight", str(tiny_hf), "--quantization", "q4f16_1", "--group-size", "128",
                        "--lm-quant-bit", "8", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*edgellm, "gen_config", str(tiny_hf), "--quantization", "q4f16_1", "--conv-template",
                        "chatml", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "mlc-chat-config.json").read_text())["quantization_layout"] == {
        "group_size": 128, "lm_head_bits": 8}
    with Engine(str(out)) as eng:
        ids = completion_ids(eng, IDS.tolist(), 8)
    assert ids == reference_greedy(*dequantized_reference(out), 8)

    r = subprocess.run([*edgellm, "convert_weight", str(tiny_hf), "--quantization", "q4f16_1", "--group-size", "48",
                        "-o", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--group-size 48" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([*edgellm, "convert_weight", str(tiny_hf), "--quantization", "q3f16_1", "--lm-quant-bit", "8",
                        "-o", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "q3f16_1" in r.stderr and len(r.stderr.strip().splitlines()) == 1

"""Every family runs the one-call native decode step (O2) and computes what the reference (O0) does:
the same greedy tokens and logits within 1e-3 (5e-3 for gemma2's soft-capped logits) on tiny random
models of all 8 families, and at q0f32 transformers' tokens and logits too."""

from __future__ import annotations

import pytest
import torch

from edgellm.quantization import kernels
from tests.helpers import convert, save_hf
from tests.test_speed_paths import TOL, _close, generate

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"native kernels unavailable: {kernels.unavailable_reason()}")

FAMILY_CASE = {"llama": "llama", "mistral": "mistral-window", "qwen2": "qwen2-tied", "qwen3": "qwen3-untied-bias",
               "phi3": "phi3-longrope-partial", "gemma2": "gemma2", "gpt_neox": "gpt_neox-parallel"}


def _family_model_dir(family: str, tmp_path, quant: str = "q4f16_1"):
    """A tiny random model of `family` with peaked logits (the transformers model, and it converted to `quant`)."""
    from edgellm.models.registry import MODEL_FAMILIES

    assert set(FAMILY_CASE) | {"internlm2"} == set(MODEL_FAMILIES)  # a new family needs a case here
    if family == "internlm2":
        from tests.test_internlm2 import llama, write_internlm2

        model = llama(False)
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)
        write_internlm2(model, False, tmp_path / "hf")
        hf = tmp_path / "hf"
    else:
        from tests.test_models_parity import CASES, COMMON

        # gpt_neox: the parallel residual quantized, the sequential one against transformers
        case = "gpt_neox-sequential" if family == "gpt_neox" and quant == "q0f32" else FAMILY_CASE[family]
        cfg_cls, model_cls, over = CASES[case]
        torch.manual_seed(0)
        model = model_cls(cfg_cls(**{k: v for k, v in {**COMMON, **over}.items() if v is not None})).eval()
        with torch.no_grad():  # perturbed norms and biases; peaked logits so float noise decides no token
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(torch.randn_like(p) * 0.1)
            model.get_output_embeddings().weight.mul_(40.0)
        hf = save_hf(model, tmp_path / "hf")
    return model.eval(), convert(hf, tmp_path / quant, quant)


def test_every_family_declares_the_native_decode_step():
    from edgellm.models.registry import MODEL_FAMILIES, native_decode_families

    assert native_decode_families() == list(MODEL_FAMILIES)


@pytest.mark.parametrize("quant", ["q4f16_1", "q0f32"])
@pytest.mark.parametrize("family", sorted(FAMILY_CASE) + ["internlm2"])
def test_every_family_o2_equals_o0(family, quant, tmp_path):
    """O2 takes the family's one-call native decode step (every family declares one) and gives O0's
    greedy tokens and logits; at q0f32 both also give transformers' tokens and logits."""
    hf_model, d = _family_model_dir(family, tmp_path, quant)
    prompts = [list(range(3, 30)), [3, 44, 45]]  # the first is longer than the windowed cases' 16
    ref_tokens, ref_logits, _, _ = generate(d, prompts, 10, "O0")
    tokens, logits, runner, fused = generate(d, prompts, 10, "O2")
    assert runner.fused is not None and fused > 0  # the decode steps ran as the one native call
    assert tokens == ref_tokens
    # gemma2's final soft-cap squeezes every logit into (-0.3, 0.3): the kernels' ~1e-5 is a larger share of that
    tol = 5 * TOL if family == "gemma2" else TOL
    for a, b in zip(logits, ref_logits):
        _close(a, b, tol)
    if quant == "q0f32":
        for prompt, toks, ours in zip(prompts, tokens, logits):
            with torch.inference_mode():
                hf = hf_model(torch.tensor([prompt + toks[:-1]])).logits[0, len(prompt) - 1:].float()
            assert hf.argmax(-1).tolist() == toks
            _close(ours, hf, tol)

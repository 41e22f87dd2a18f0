"""convert_weight flags the seeds use that must fail with one clear line (exit 2) when they do not fit."""

from __future__ import annotations

import pytest
import torch

from tests.test_convert_errors import convert_fails
from tests.test_gguf_reader import _write_tiny


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(tiny_hf, tmp_path):
    convert_fails(tmp_path, tiny_hf, "--device cuda", "CUDA is not available", extra=("--device", "cuda"))


def test_unknown_device(tiny_hf, tmp_path):
    convert_fails(tmp_path, tiny_hf, "--device tpu", "unknown device", extra=("--device", "tpu"))


def test_safetensor_format_on_a_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny(path, "llama", {})
    convert_fails(tmp_path, path, "is a GGUF file", "--source-format gguf",
                  extra=("--source-format", "huggingface-safetensor"))


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_prequantized_format_on_an_unquantized_model(tiny_hf, tmp_path, fmt):
    convert_fails(tmp_path, tiny_hf, f"--source-format {fmt}", "not quantized", extra=("--source-format", fmt))

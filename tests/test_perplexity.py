"""`edgellm perplexity`: perplexity and KL divergence of the kernels against the float32 dequantized
reference, on the shipped public-domain text; precision=normal keeps SmolLM2's perplexity within 1%."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.quantization import kernels

TEXT = Path(__file__).parent / "data" / "declaration_of_independence.txt"
needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"native kernels unavailable: {kernels.unavailable_reason()}")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm", "perplexity", *args], capture_output=True, text=True,
                          timeout=600)


@needs_kernels
def test_cli_reports_high_equal_to_reference_and_normal_close(tiny_model_q4):
    reports = {}
    for precision in ("high", "normal"):
        r = _cli(str(tiny_model_q4), "--file", str(TEXT), "--ctx", "128", "--chunks", "3", "--precision", precision,
                 "--json")
        assert r.returncode == 0, r.stderr
        reports[precision] = json.loads(r.stdout)
    high, normal = reports["high"], reports["normal"]
    assert high["chunks"] == 3 and high["tokens"] == 3 * 63  # the second half of each chunk is scored
    assert abs(high["ppl"] / high["ref_ppl"] - 1) < 1e-4  # 16-bit activations: the reference's numbers
    assert high["mean_kld"] < 1e-6 and high["top1_agreement"] > 99
    assert normal["ref_ppl"] == high["ref_ppl"]
    assert high["mean_kld"] < normal["mean_kld"] < 0.01
    assert abs(normal["ppl"] / normal["ref_ppl"] - 1) < 0.02


@pytest.mark.parametrize("args,message", [
    (["--file", "/nonexistent/text.txt"], "--file /nonexistent/text.txt: cannot read it"),
    (["--ctx", "100000"], "exceeds the model's context window"),
    (["--ctx", "2"], "--ctx must be at least 4"),
    (["--chunks", "0"], "--chunks must be at least 1"),
])
def test_cli_bad_input_one_line(tiny_model_q4, args, message):
    if "--file" not in args:
        args = ["--file", str(TEXT), *args]
    r = _cli(str(tiny_model_q4), *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_text_shorter_than_a_chunk(tiny_model_q4, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("We hold these truths to be self-evident.")
    r = _cli(str(tiny_model_q4), "--file", str(short), "--ctx", "256")
    assert r.returncode == 2 and "fewer than one chunk of --ctx 256" in r.stderr, r.stderr
    r = _cli(str(tiny_model_q4), "--file", str(TEXT), "--precision", "low")
    assert r.returncode == 2 and "invalid choice: 'low'" in r.stderr


@needs_kernels
@pytest.mark.slow
def test_smollm2_normal_perplexity_within_one_percent_and_paris(smollm2_q4):
    from edgellm.quality import perplexity
    from edgellm.tokenizer import Tokenizer
    from tests.test_speed_paths import generate

    r = perplexity(smollm2_q4, TEXT.read_text(), ctx=512, precision="normal")
    assert r.chunks >= 2
    assert abs(r.ppl / r.ref_ppl - 1) < 0.01, (r.ppl, r.ref_ppl)
    assert r.top1_agreement > 90
    tok = Tokenizer.from_dir(smollm2_q4)
    ids = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    tokens, _, runner, _ = generate(smollm2_q4, [ids], 12, "O2", precision="normal")
    assert runner.fused is not None
    assert "Paris" in tok.decode(tokens[0])

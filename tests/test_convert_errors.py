"""Bad input through the real CLI: exit code 2, ONE line on stderr naming the cause (never a
traceback), and no half-finished output directory. Also the CLI spellings and the exact
commands of the seed documents."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgellm.errors import UserError
from edgellm.models.loader import load_model
from tests.test_quantization import tiny_llama

EDGELLM = [sys.executable, "-m", "edgellm"]


def run(*args, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELLM, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under d (relative path -> content); the directory itself must exist."""
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(d.rglob("*"))}


def assert_user_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    err = r.stderr
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stderr should be one line, got {len(lines)}:\n{err}"
    for n in needles:
        assert n.lower() in err.lower(), f"{n!r} not in {err!r}"
    return lines[0]


def convert_fails(tmp_path: Path, src, *needles: str, extra=()) -> str:
    """convert_weight SRC ... -o tmp/work/out must fail cleanly and leave tmp/work unchanged."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    before = snapshot(work)
    r = run("convert_weight", src, "--quantization", "q4f16_1", "-o", work / "out", *extra)
    line = assert_user_error(r, *needles)
    assert not (work / "out").exists()
    assert snapshot(work) == before  # no staging leftovers either
    return line


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errs")
    model, hf_dir = tiny_llama(tmp, "h64")
    return model, hf_dir


def copy_hf(hf_dir: Path, dst: Path) -> Path:
    shutil.copytree(hf_dir, dst)
    return dst


# --------------------------------------------------------------------------------------------
# convert_weight input errors
# --------------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    convert_fails(tmp_path, tmp_path / "no-such-model", "no-such-model", "no such file")


def test_config_without_model_type(hf, tmp_path):
    d = copy_hf(hf[1], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["model_type"]
    (d / "config.json").write_text(json.dumps(cfg))
    convert_fails(tmp_path, d, "model_type", "llama")
    convert_fails(tmp_path, d / "config.json", "model_type")  # CONFIG given as the file


def test_unsupported_model_type(hf, tmp_path):
    d = copy_hf(hf[1], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    line = convert_fails(tmp_path, d, "bert")
    for name in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "internlm2", "gpt_neox"):
        assert name in line


def test_unknown_quantization(hf, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    r = run("convert_weight", hf[1], "--quantization", "q5f16_9", "-o", work / "out")
    line = assert_user_error(r, "q5f16_9")
    for name in ("q0f16", "q0bf16", "q4f16_1", "q4f32_1", "q4f16_2", "q3f16_1", "q8f16_1"):
        assert name in line
    assert not (work / "out").exists()
    r = run("gen_config", hf[1], "--quantization", "q5f16_9", "--conv-template", "chatml",
            "-o", work / "out")
    assert_user_error(r, "q5f16_9", "q4f16_1")
    assert not (work / "out").exists()


def test_missing_required_option_is_one_line(hf, tmp_path):
    r = run("convert_weight", hf[1], "-o", tmp_path / "out")
    assert_user_error(r, "--quantization")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(hf, tmp_path):
    d = copy_hf(hf[1], tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    convert_fails(tmp_path, d, "model.safetensors")
    # An existing model directory is left exactly as it was by a failed re-conversion.
    from tests.helpers import convert

    out = convert(hf[1], tmp_path / "existing", "q4f16_1", conv_template="chatml")
    before = snapshot(out)
    r = run("convert_weight", d, "--quantization", "q3f16_1", "-o", out)
    assert_user_error(r, "model.safetensors")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "m", "work"]


def test_truncated_safetensors_shard_of_index(hf, tmp_path):
    """The damage is in the second file of a sharded checkpoint, found mid-conversion."""
    model, hf_dir = hf
    d = tmp_path / "m"
    model.save_pretrained(d, max_shard_size="60KB")
    for fname in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(hf_dir / fname, d / fname)
    files = sorted(d.glob("model-*.safetensors"))
    assert len(files) >= 3
    victim = files[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    convert_fails(tmp_path, d, victim.name)


def test_config_disagrees_with_weights(hf, tmp_path):
    """Found mid-conversion, after the progress bar started: still one line, nothing left."""
    d = copy_hf(hf[1], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    convert_fails(tmp_path, d, "shape", "[64, 128]")


def test_checkpoint_missing_a_tensor(hf, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_hf(hf[1], tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    convert_fails(tmp_path, d, "model.norm.weight")


def test_unreadable_source_format(hf, tmp_path):
    convert_fails(tmp_path, hf[1], "pytorch_model.bin", extra=("--source-format", "huggingface-torch"))
    convert_fails(tmp_path, hf[1], "source format", extra=("--source-format", "onnx"))


def test_pickled_object_in_pytorch_bin(hf, tmp_path):
    from tests.test_convert import _Payload, write_torch_bin

    model, hf_dir = hf
    d = copy_hf(hf_dir, tmp_path / "m")
    write_torch_bin(model, d)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    marker = tmp_path / "code-was-executed"
    sd["optimizer_state"] = _Payload(str(marker))
    torch.save(sd, d / "pytorch_model.bin")
    convert_fails(tmp_path, d, "pytorch_model.bin", "weights_only")
    assert not marker.exists()


def write_gguf(path: Path, unsupported: bool) -> None:
    import gguf
    from gguf import GGMLQuantizationType as QT

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tensor("token_embd.weight", np.zeros((16, 256), dtype=np.float32))
    if unsupported:
        # IQ2_XXS: 256 values in 66 bytes; raw bytes of a [4, 256] weight
        block, size = gguf.GGML_QUANT_SIZES[QT.IQ2_XXS]
        raw = np.zeros((4, 256 // block * size), dtype=np.uint8)
        w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=QT.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_with_unsupported_tensor_type(tmp_path):
    try:
        import edgellm.weights.gguf_reader  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "edgellm.weights.gguf_reader":
            pytest.xfail("the GGUF reader (edgellm/weights/gguf_reader.py) is not written yet")
        raise
    f = tmp_path / "bad.gguf"
    write_gguf(f, unsupported=True)
    convert_fails(tmp_path, f, "IQ2_XXS", "blk.0.attn_q.weight")


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 10)  # magic, then garbage
    convert_fails(tmp_path, f, "model.gguf")


# --------------------------------------------------------------------------------------------
# Output directory
# --------------------------------------------------------------------------------------------

def test_output_dir_with_other_files_needs_force(hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "keep.bin").write_bytes(b"x")
    before = snapshot(tmp_path)
    r = run("convert_weight", hf[1], "--quantization", "q4f16_1", "-o", out)
    assert_user_error(r, str(out.name), "--force")
    assert snapshot(tmp_path) == before
    r = run("gen_config", hf[1], "--quantization", "q4f16_1", "--conv-template", "chatml", "-o", out)
    assert_user_error(r, "--force")
    assert snapshot(tmp_path) == before

    r = run("convert_weight", hf[1], "--quantization", "q4f16_1", "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    r = run("gen_config", hf[1], "--quantization", "q4f16_1", "--conv-template", "chatml", "-o", out,
            "--force")
    assert r.returncode == 0, r.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "keep.bin").exists()
    assert (out / "params_shard_0.bin").exists()
    load_model(out)


def test_output_path_is_a_file(hf, tmp_path):
    f = tmp_path / "out"
    f.write_text("a file")
    r = run("convert_weight", hf[1], "--quantization", "q4f16_1", "-o", f)
    assert_user_error(r, "out")
    assert f.read_text() == "a file"


def test_unknown_conv_template(hf, tmp_path):
    r = run("gen_config", hf[1], "--quantization", "q4f16_1", "--conv-template", "no-such-template",
            "-o", tmp_path / "out")
    assert_user_error(r, "no-such-template", "chatml")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


# --------------------------------------------------------------------------------------------
# Corrupted converted weights
# --------------------------------------------------------------------------------------------

@pytest.fixture()
def converted(hf, tmp_path):
    from tests.helpers import convert

    return convert(hf[1], tmp_path / "model", "q4f16_1", conv_template="chatml")


def test_corrupted_shard_is_named_at_load(converted):
    load_model(converted)  # verified once; the stamp must not hide later damage
    shard = converted / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    for i in (100, 101, 102):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"params_shard_0\.bin") as e:
        load_model(converted)
    assert "corrupt" in str(e.value)
    with pytest.raises(UserError, match=r"params_shard_0\.bin"):
        load_model(converted, use_mmap=True)


def test_truncated_shard_is_named_at_load(converted):
    shard = converted / "params_shard_0.bin"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(UserError, match=r"params_shard_0\.bin.*truncated"):
        load_model(converted, verify=False)
    with pytest.raises(UserError, match=r"params_shard_0\.bin"):
        load_model(converted)


def test_corrupted_shard_through_chat_cli(converted):
    import importlib.util

    if importlib.util.find_spec("edgellm.cli.chat") is None:
        pytest.skip("no chat command yet")
    shard = converted / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = subprocess.run([*EDGELLM, "chat", str(converted), "--device", "cpu"], input="/exit\n",
                       capture_output=True, text=True, timeout=180)
    assert_user_error(r, "params_shard_0.bin")


# --------------------------------------------------------------------------------------------
# Spellings and the seed documents' commands
# --------------------------------------------------------------------------------------------

def test_dash_spelling_and_console_script(hf, tmp_path):
    r = run("convert-weight", hf[1], "--quantization", "q4f16_1", "-o", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    script = Path(sys.executable).parent / "edgellm"
    if not script.exists():
        pytest.skip("edgellm console script not installed next to the interpreter")
    r = subprocess.run([str(script), "gen-config", str(hf[1]), "--quantization", "q4f16_1",
                        "--conv-template", "chatml", "-o", str(tmp_path / "a")],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    load_model(tmp_path / "a")
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "convert_weight" in r.stdout


def test_seed_commands(hf, tmp_path):
    """The commands of the seed documents, with edgellm in place of mlc_llm, run from a cwd."""
    model, hf_dir = hf
    d = copy_hf(hf_dir, tmp_path / "HF-Model")
    r = run("convert_weight", "HF-Model", "--source-format", "huggingface-safetensor",
            "--quantization", "q4f16_1", "-o", "out/", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("gen_config", "HF-Model", "--quantization", "q4f16_1", "--conv-template", "chatml",
            "--context-window-size", "2048", "--prefill-chunk-size", "512", "-o", "out/", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    cfg = json.loads((out / "mlc-chat-config.json").read_text())
    assert cfg["quantization"] == "q4f16_1"
    assert cfg["model_type"] == "llama"
    assert cfg["context_window_size"] == 2048
    assert cfg["prefill_chunk_size"] == 512
    conv = cfg["conv_template"]
    assert isinstance(conv, dict) and conv.get("name") == "chatml"
    assert "tokenizer.json" in cfg["tokenizer_files"] and (out / "tokenizer.json").exists()
    assert d.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["HF-Model", "out"]
    m, chat = load_model(out)
    assert chat.context_window_size == 2048 and chat.prefill_chunk_size == 512

"""`edgellm compile`: model libraries for cpu (.pt2, AOTInductor), android (.pte, ExecuTorch) and
the .tar form, run by the engine in place of the eager model, and the one-line errors.

One tiny random q4f16_1 Llama (tied embeddings, like SmolLM2) is compiled once per form
(module-scoped fixtures; inductor's cache lives under the test's tmp directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import transformers as tf

from edgellm.api.engine import Engine
from edgellm.cli.main import main
from edgellm.compile.archive import extract_artifact
from edgellm.compile.executorch_export import PteProgram, run_method
from edgellm.errors import UserError
from tests.helpers import convert, forward, kv_pool, save_hf

PROMPTS = ["The capital of France is", "def add(a, b):\n    return",
           "Hello! How can I help you today? I am a small language model and"]
GEN = 12
CTX, CHUNK = 128, 16  # the .pt2's overrides: prompts longer than CHUNK exercise chunked prefill


def tiny_llama(out: Path, layers: int = 2, quantization: str = "q4f16_1", seed: int = 0) -> Path:
    """A converted tiny Llama; initializer_range 0.2 so greedy decoding does not just repeat one token."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=3, eos_token_id=2, tie_word_embeddings=True,
                         initializer_range=0.2)
    save_hf(tf.LlamaForCausalLM(cfg), out / "hf")
    return convert(out / "hf", out / f"tiny-{quantization}", quantization)


def cli(*args: str) -> tuple[int, str]:
    """Run `edgellm ARGS` in this process: (exit code, stderr is captured by the caller)."""
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0), ""
    return 0, ""


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(tmp_path_factory):
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    yield
    if old is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pt2(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lib") / "tiny-q4f16_1-cpu.pt2"
    code, _ = cli("compile", str(tiny / "mlc-chat-config.json"), "--device", "cpu", "-o", str(out),
                  "--overrides", f"context_window_size={CTX};prefill_chunk_size={CHUNK}")
    assert code == 0 and out.exists()
    return out


@pytest.fixture(scope="module")
def android_tar(tiny) -> Path:
    """Seed 001's command, verbatim but for the program name: `python -m edgellm compile
    .../mlc-chat-config.json --device android -o .../NAME-android.tar`."""
    out = tiny / "tiny-q4f16_1-android.tar"
    r = subprocess.run([sys.executable, "-m", "edgellm", "compile", f"{tiny}/mlc-chat-config.json",
                        "--device", "android", "-o", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def eager_tokens(tiny) -> list[list[int]]:
    return engine_tokens(tiny, None)


def engine_tokens(model_dir: Path, lib: Path | None, n: int = GEN, **options) -> list[list[int]]:
    """n greedy token ids after each prompt, through Engine (model_lib=lib)."""
    with Engine(str(model_dir), model_lib=str(lib) if lib else None, device="cpu", **options) as eng:
        return [completion_ids(eng, eng.tokenizer.encode(p), n) for p in PROMPTS]


def completion_ids(eng: Engine, prompt: list[int], max_tokens: int, **kw) -> list[int] | list[list[int]]:
    r = eng.completions.create(prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=1,
                               return_tokens_as_token_ids=True, **kw)
    outs = [[int(t.split(":", 1)[1]) for t in ch.logprobs.tokens] for ch in r.choices]
    return outs if kw.get("n", 1) > 1 else outs[0]


# ---- 1. .pt2 for cpu ------------------------------------------------------------------------------
@pytest.mark.slow  # compiles a library (minutes, once per module)
def test_pt2_greedy_tokens_equal_eager(tiny, pt2, eager_tokens):
    got = engine_tokens(tiny, pt2)
    assert got == eager_tokens
    assert len({tuple(t) for t in eager_tokens}) == 3 and all(len(set(t)) > 2 for t in eager_tokens), \
        "the tiny model should not just repeat one token"


@pytest.mark.slow  # compiles a library (minutes, once per module)
def test_pt2_records_what_it_was_compiled_for(pt2):
    from edgellm.compile.runtime import inspect_library

    meta, art, kind = inspect_library(pt2)
    assert kind == "pt2" and art == pt2
    assert meta["device"] == "cpu" and meta["model_type"] == "llama" and meta["quantization"] == "q4f16_1"
    assert meta["context_window_size"] == CTX and meta["prefill_chunk_size"] == CHUNK
    assert meta["overrides"] == {"context_window_size": CTX, "prefill_chunk_size": CHUNK}
    assert meta["edgellm_version"]
    assert meta["format_version"] == 3 and meta["native_ops"] is True  # calls edgellm::qlinear / qgather / attend
    assert meta["kv_cache_dtype"] == "float16"  # as the eager pool keeps a float16 model's KV


@pytest.mark.slow  # compiles a library (minutes, once per module)
def test_pt2_engine_caps_context_and_runs_two_sequences(tiny, pt2, eager_tokens):
    """The library's context window applies; n=2 choices (a forked prefix) give the same tokens."""
    with Engine(str(tiny), model_lib=str(pt2), device="cpu") as eng:
        assert eng.context_window == CTX
        prompt = eng.tokenizer.encode(PROMPTS[0])
        assert completion_ids(eng, prompt, GEN, n=2) == [eager_tokens[0]] * 2
        assert completion_ids(eng, prompt, GEN) == eager_tokens[0]  # again: a reused prefix
        with pytest.raises(UserError, match="context window"):
            eng.completions.create(prompt=[5] * (CTX + 1), max_tokens=2)


# ---- 2/3. .pte for android, in the .tar of the command in ../shared/seeds/001_0707eec21f6724f1.txt ----
@pytest.mark.slow  # compiles a library (minutes, once per module)
def test_tar_holds_metadata_naming_the_device_and_a_loadable_program(android_tar, tiny):
    with tarfile.open(android_tar) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("metadata.json").read())
    assert names == ["metadata.json", "tiny-q4f16_1-android.pte"]
    assert meta["device"] == "android" and meta["artifact"] == "pte"
    assert meta["model_type"] == "llama" and meta["quantization"] == "q4f16_1"
    assert meta["weights"] == "exact" and meta["layers"] == {"linear_exact": 8, "embedding_exact": 1}
    prog = PteProgram(extract_artifact(android_tar, tiny / "extracted"))
    logits = run_method(prog.new_method(), torch.tensor([5, 6, 7]), 0)
    assert logits.shape == (1, 384) and torch.isfinite(logits).all()


@pytest.mark.slow  # compiles a library (minutes, once per module)
def test_pte_matches_eager_engine(tiny, android_tar):
    """The .pte runs through ExecuTorch's Python runtime; its greedy tokens equal the eager
    engine's on the 3 prompts (at precision="high", the engine's exact path: its default int8
    activations pick other tokens at this random model's near-ties), and its logits
    (teacher-forced, prompt in one chunk then one token at a time through the program's own KV
    cache) equal the eager model's float reference within float32 summation noise: the program
    holds the model's own 4-bit codes and scales, no second quantization (measured: ~1e-5 of
    logits of size ~6; 8da4w's int8 activations and bfloat16 scales were 1e-1)."""
    from edgellm.compile.executorch_export import mobile_model
    from edgellm.models.loader import load_model
    from edgellm.quantization.pack import unpack
    from edgellm.tokenizer.tokenizer import Tokenizer

    model, cfg = load_model(tiny)
    tok = Tokenizer.from_dir(tiny)
    program = extract_artifact(android_tar, tiny / "extracted")
    pte_tokens = engine_tokens(tiny, android_tar)
    eager_tokens = engine_tokens(tiny, None, precision="high")
    assert pte_tokens == eager_tokens
    for prompt_text, ref in zip(PROMPTS, eager_tokens):
        ids = tok.encode(prompt_text) + ref  # teacher forcing with eager's continuation
        n = len(ids) - len(ref)
        pool, slot = kv_pool(model, cfg.context_window_size)
        method = PteProgram(program).new_method()
        with torch.inference_mode():
            eager = forward(model, pool, slot, torch.tensor(ids), 0)[n - 1:-1]
        got = [run_method(method, torch.tensor(ids[:n]), 0)]
        got += [run_method(method, torch.tensor([ids[i]]), i) for i in range(n, len(ids) - 1)]
        assert (torch.cat(got) - eager).abs().max() < 1e-4
    # the program's constants are the converted codes: the first linear's nibbles, unpacked (the
    # fused qkv product is kept as its q, k and v rows: one product each)
    mm, _ = mobile_model(model)
    src, parts = model.model.layers[0].self_attn.qkv_proj, mm.model.layers[0].self_attn.qkv_proj.parts
    packed, scales = torch.cat([p.packed for p in parts]), torch.cat([p.scales for p in parts])
    nib = torch.stack([packed >> 4, packed & 15], -1).view(packed.shape[0], -1)
    assert torch.equal(nib.int() - 1, unpack(src.q_weight, src.mode))  # stored as code + 1 (read as u - 8)
    assert torch.equal(scales, src.q_scale.float())


def test_awq_model_exports_its_own_zero_points(tmp_path):
    """A q4f16_awq model's program form (what export_pte lowers; run here in eager PyTorch with
    ExecuTorch's reference ops) computes the model's logits: codes, scales and zero points kept."""
    from edgellm.compile.executorch_export import mobile_model
    from edgellm.compile.static_cache import BufferCacheStep
    from edgellm.models.loader import load_model
    from tests.test_prequantized import make_checkpoint

    _, hf = make_checkpoint("awq", tmp_path, half=True)
    model, cfg = load_model(convert(hf, tmp_path / "awq", "q4f16_awq"))
    mm, counts = mobile_model(model)
    assert counts == {"linear_exact": 8}  # 2 layers x (qkv, o, gate_up, down); embedding and head float
    ids = torch.randint(5, 384, (12,), generator=torch.Generator().manual_seed(1))
    pool, slot = kv_pool(model, 64)
    with torch.inference_mode():
        eager = forward(model, pool, slot, ids, 0)[-1:]
        got = BufferCacheStep(mm, 64).eval()(ids.view(1, -1), torch.tensor([0]))
    assert (got - eager).abs().max() < 1e-4


@pytest.mark.slow  # compiles a library (minutes, once per module)
def test_tar_runs_in_engine_and_chat_cli(tiny, android_tar, capsys):
    with Engine(str(tiny), model_lib=str(android_tar), device="cpu") as eng:
        assert type(eng.runner).__name__ == "PteRunner"
        r = eng.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1


# ---- 5. errors: one line, exit 2 ---------------------------------------------------------------------
def _one_line_error(capsys, *args: str) -> str:
    capsys.readouterr()
    code, _ = cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_unknown_device_lists_the_supported_ones(tiny, tmp_path, capsys):
    for dev in ("tpu", "webgpu"):
        err = _one_line_error(capsys, "compile", str(tiny), "--device", dev, "-o", str(tmp_path / "x.so"))
        assert repr(dev) in err and "cpu, cuda, mps, android, iphone" in err
    assert not list(tmp_path.iterdir())


def test_metal_means_mps(tiny, tmp_path, capsys):
    err = _one_line_error(capsys, "compile", str(tiny), "--device", "metal:x86-64", "-o", str(tmp_path / "x.dylib"))
    assert "mps" in err and "not available" in err


@pytest.mark.parametrize("device,name", [("cpu", "x.pte"), ("android", "x.pt2"), ("iphone", "x.so"),
                                         ("cpu", "x.wasm"), ("android", "x")])
def test_suffix_that_does_not_fit_the_device(tiny, tmp_path, capsys, device, name):
    err = _one_line_error(capsys, "compile", str(tiny), "--device", device, "-o", str(tmp_path / name))
    assert f"does not fit device {device}" in err and ".tar" in err


def test_bad_overrides_and_missing_model(tiny, tmp_path, capsys):
    err = _one_line_error(capsys, "compile", str(tiny), "-o", str(tmp_path / "x.pt2"), "--overrides", "foo=1")
    assert "unknown key 'foo'" in err and "context_window_size" in err
    err = _one_line_error(capsys, "compile", str(tmp_path / "nope"), "-o", str(tmp_path / "x.pt2"))
    assert "no such file" in err


@pytest.mark.slow  # compiles a library (minutes, once per module)
def test_library_loaded_with_the_wrong_model(tiny, pt2, android_tar, tmp_path_factory, capsys):
    root = tmp_path_factory.mktemp("others")
    deeper = tiny_llama(root / "deep", layers=3)
    q0 = convert(tiny.parent / "hf", root / "tiny-q0f32", "q0f32")
    for model, lib, want in ((deeper, pt2, "different architecture"), (q0, pt2, "compiled for llama q4f16_1"),
                             (deeper, android_tar, "different architecture")):
        with pytest.raises(UserError, match=want):
            Engine(str(model), model_lib=str(lib), device="cpu")
    # the same model's architecture but other weights: a .pte holds its weights, so that is refused too
    other = tiny_llama(root / "reseeded", seed=1)
    with pytest.raises(UserError, match="holds the weights of"):
        Engine(str(other), model_lib=str(android_tar), device="cpu")
    Engine(str(other), model_lib=str(pt2), device="cpu").terminate()  # a .pt2 takes the model's weights
    err = _one_line_error(capsys, "chat", str(deeper), "--model-lib", str(pt2))
    assert "different architecture" in err and pt2.name in err
    not_a_lib = root / "junk.pt2"
    not_a_lib.write_bytes(b"\0" * 64)
    with pytest.raises(UserError, match="not a model library"):
        Engine(str(tiny), model_lib=str(not_a_lib), device="cpu")
    with pytest.raises(UserError, match="keeps its own KV cache"):  # never silently ignored
        Engine(str(tiny), model_lib=str(pt2), device="cpu", kv_cache_dtype="int8")
    old = root / "old.pt2"  # a library from before the KV layout changed (format_version 1)
    with zipfile.ZipFile(pt2) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("edgellm/metadata.json"):
                data = json.dumps({**json.loads(data), "format_version": 1}).encode()
            dst.writestr(item, data)
    with pytest.raises(UserError, match="older edgellm.*compile it again"):
        Engine(str(tiny), model_lib=str(old), device="cpu")

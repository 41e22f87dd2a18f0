"""Issue 18 item 7: malformed model files and configs end in one line naming the file and the field, exit 2.

Through the CLI's entry function `edgellm.cli.main.main` (what the `edgellm` script runs) in this
process, so that many cases and the randomized (hypothesis) ones stay fast; a few run as real
subprocesses too. Never an internal error, never an allocation sized from a bad value.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm.cli.main import main
from tests.test_convert_errors import assert_user_error, run


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and "internal error" not in err and "Traceback" not in err, err
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def hf_dir(tiny_hf, tmp_path_factory) -> Path:
    """config.json and the tokenizer of the tiny model (gen_config needs no weights)."""
    d = tmp_path_factory.mktemp("cfg") / "hf"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_hf / name, d / name)
    return d


@pytest.fixture(scope="module")
def model_copy(tiny_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mlc") / "model"
    shutil.copytree(tiny_model, d)
    return d


def gen_config(capsys, hf: Path, out: Path, *extra) -> tuple[int, str]:
    return cli(capsys, "gen_config", hf, "--quantization", "q0f32", "--conv-template", "chatml", "-o", out, *extra)


def bench(capsys, model: Path) -> tuple[int, str]:
    return cli(capsys, "bench", model, "--prompt-len", "4", "--gen-len", "2", "--repeat", "1", "--no-bandwidth")


CONFIG_CASES = [
    ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    ({"num_hidden_layers": 1e9}, "num_hidden_layers"),
    ({"hidden_size": -64}, "hidden_size"),
    ({"hidden_act": "swiglu9"}, "hidden_act"),
    ({"rope_scaling": {"type": "linear"}}, "factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"rope_theta": "10000"}, "rope_theta"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"bos_token_id": 100000}, "bos_token_id"),
    ({"eos_token_id": [2, 100000]}, "eos_token_id"),
    ({"vocab_size": 1 << 30}, "vocab_size"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    ({"intermediate_size": None}, "intermediate_size"),
]


@pytest.mark.parametrize("change, field", CONFIG_CASES)
def test_bad_config_json(capsys, hf_dir, tmp_path, change, field):
    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(change)
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_one_line(*gen_config(capsys, bad, tmp_path / "out"), "config.json", field)
    assert not (tmp_path / "out").exists()


def test_config_json_that_is_a_list(capsys, hf_dir, tmp_path):
    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    (bad / "config.json").write_text("[1, 2]")
    assert_one_line(*gen_config(capsys, bad, tmp_path / "out"), "config.json", "object")


def test_gen_config_context_window_too_large(capsys, hf_dir, tmp_path):
    assert_one_line(*gen_config(capsys, hf_dir, tmp_path / "out", "--context-window-size", str(2**40)),
                    "context-window-size")


CHAT_CASES = [
    ({"temperature": "0.7"}, "temperature"),
    ({"prefill_chunk_size": -1}, "prefill_chunk_size"),
    ({"context_window_size": 2**40}, "context_window_size"),
    ({"bos_token_id": 100000}, "bos_token_id"),
    ({"top_p": 5}, "top_p"),
    ({"model_config": {"num_hidden_layers": "x"}}, "num_hidden_layers"),
    ({"model_config": {"hidden_act": "nope"}}, "hidden_act"),
]


def _write_chat(model: Path, change: dict) -> None:
    cfg = json.loads((model / "mlc-chat-config.json").read_text())
    for k, v in change.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    (model / "mlc-chat-config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, field", CHAT_CASES)
def test_bad_mlc_chat_config(capsys, tiny_model, tmp_path, change, field):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    _write_chat(model, change)
    assert_one_line(*bench(capsys, model), "mlc-chat-config.json", field)


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "records"),
    ('{"records": [{"dataPath": "params_shard_0.bin", "records": []}]}', "nbytes"),
    ('{"records": [{"dataPath": "params_shard_0.bin", "nbytes": 4}]}', "records"),
    ("DUPLICATE", "listed twice"),
])
def test_bad_tensor_cache(capsys, tiny_model, tmp_path, text, needle):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    if text == "DUPLICATE":
        cache = json.loads((model / "tensor-cache.json").read_text())
        cache["records"][0]["records"].append(cache["records"][0]["records"][0])
        text = json.dumps(cache)
    (model / "tensor-cache.json").write_text(text)
    assert_one_line(*bench(capsys, model), "tensor-cache.json", needle)


def test_bad_runtime_options_through_real_cli(tiny_model):
    for override, needle in (("prefill_chunk_size=-1", "prefill_chunk_size"),
                             ("context_window_size=1099511627776", "context_window_size"),
                             ("max_num_sequence=abc", "max_num_sequence")):
        r = run("serve", tiny_model, "--overrides", override, "--port", "9")
        assert_user_error(r, needle)


def test_chat_config_temperature_string_through_real_cli(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    _write_chat(model, {"temperature": "hot"})
    assert_user_error(run("bench", model, "--prompt-len", "4", "--gen-len", "2", "--repeat", "1", "--no-bandwidth"),
                      "mlc-chat-config.json", "temperature")


# -- GGUF headers ------------------------------------------------------------------------------


def write_gguf(path: Path, block_count: int = 1, head_count: int = 4, merges=("a b",)) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(block_count)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(64)
    w.add_head_count(head_count)
    w.add_head_count_kv(head_count)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    tokens = ["<s>", "</s>", "a", "b", "ab"] + [f"t{i}" for i in range(11)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * 14)
    w.add_token_merges(list(merges))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_huge_array_length(capsys, tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key) + 4 + 4  # value type (array), item type (string), then the uint64 count
    assert int.from_bytes(data[at:at + 8], "little") == 16
    data[at:at + 8] = (1 << 60).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    assert_one_line(*cli(capsys, "convert_weight", path, "--quantization", "q0f32", "-o", tmp_path / "out"),
                    "m.gguf")


@pytest.mark.parametrize("kwargs, needle", [
    ({"block_count": 10**9}, "num_hidden_layers"),
    ({"head_count": 0}, "head_count"),
    ({"merges": ("a b", "nospace")}, "merges"),
    ({"merges": ("a zz",)}, "merges"),
])
def test_gguf_bad_metadata(capsys, tmp_path, kwargs, needle):
    path = write_gguf(tmp_path / "m.gguf", **kwargs)
    assert_one_line(*gen_config(capsys, path, tmp_path / "out"), "m.gguf", needle)


# -- randomized ----------------------------------------------------------------------------------

not_an_int = st.one_of(st.text(max_size=8), st.booleans(), st.floats(allow_nan=True).filter(
    lambda f: f != f or f in (float("inf"), float("-inf")) or not float(f).is_integer()), st.lists(st.integers(),
                                                                                                  max_size=2))
not_a_number = st.one_of(st.text(max_size=8), st.booleans(), st.lists(st.floats(), max_size=2),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))
INT_FIELDS = {"hidden_size": 1 << 17, "intermediate_size": 1 << 17, "num_hidden_layers": 4096,
              "num_attention_heads": 4096, "vocab_size": 1 << 24}


@st.composite
def bad_config_json(draw):
    field = draw(st.sampled_from(sorted(INT_FIELDS) + ["rope_theta", "rms_norm_eps", "hidden_act", "rope_scaling"]))
    if field in INT_FIELDS:
        value = draw(st.one_of(not_an_int, st.integers(max_value=0), st.integers(min_value=INT_FIELDS[field] + 1)))
    elif field == "hidden_act":
        value = draw(st.one_of(st.text(max_size=8).filter(lambda s: s not in ("silu", "swish", "gelu", "relu")),
                               st.integers()))
    elif field == "rope_scaling":
        value = draw(st.one_of(st.builds(dict, type=st.sampled_from(["linear", "yarn", "dynamic"])),
                               st.builds(dict, rope_type=st.sampled_from(["llama3", "longrope"])),
                               st.builds(dict, type=st.text(max_size=5).filter(lambda s: s not in ("default", "su"))),
                               st.builds(dict, type=st.just("linear"), factor=not_a_number)))
    else:
        value = draw(st.one_of(not_a_number, st.floats(max_value=0.0, allow_nan=False)))
    return field, value


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_config_json())
def test_random_bad_config_json(capsys, hf_dir, tmp_path_factory, bad):
    field, value = bad
    d = tmp_path_factory.mktemp("rnd") / "hf"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    line = assert_one_line(*gen_config(capsys, d, d.parent / "out"), "config.json")
    assert field in line or "rope" in line, line


CHAT_FIELDS = {"context_window_size": (-1, 1 << 24), "prefill_chunk_size": (1, 1 << 24),
               "max_batch_size": (1, 1 << 16), "vocab_size": (1, 1 << 24)}
# valid ranges; the strategy draws values outside them (below lo, above hi). top_p accepts any positive value
# up to 1 (a subnormal top_p keeps only the top token), so only values <= 0 are below its range.
CHAT_NUMBERS = {"temperature": (0.0, 100.0), "top_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
                "frequency_penalty": (-2.0, 2.0)}


@st.composite
def bad_chat_config(draw):
    field = draw(st.sampled_from(sorted(CHAT_FIELDS) + sorted(CHAT_NUMBERS) + ["model_config", "tokenizer_files"]))
    if field in CHAT_FIELDS:
        lo, hi = CHAT_FIELDS[field]
        value = draw(st.one_of(not_an_int, st.integers(max_value=lo - 1), st.integers(min_value=hi + 1)))
    elif field in CHAT_NUMBERS:
        lo, hi = CHAT_NUMBERS[field]
        value = draw(st.one_of(not_a_number, st.floats(max_value=lo, exclude_max=True, allow_nan=False,
                                                       allow_infinity=False),
                               st.floats(min_value=hi, exclude_min=True, allow_nan=False)))
    elif field == "model_config":
        value = draw(st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=4),
                               st.builds(dict, num_hidden_layers=not_an_int)))
    else:
        value = draw(st.one_of(st.text(max_size=4), st.lists(st.integers(), min_size=1, max_size=2)))
    return field, value


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_chat_config())
def test_random_bad_mlc_chat_config(capsys, model_copy, bad):
    field, value = bad
    path = model_copy / "mlc-chat-config.json"
    original = path.read_text()
    try:
        cfg = json.loads(original)
        cfg[field] = value
        path.write_text(json.dumps(cfg))
        assert_one_line(*bench(capsys, model_copy), "mlc-chat-config.json")
    finally:
        path.write_text(original)

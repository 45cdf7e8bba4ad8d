"""The `tbptt` console script and its demo."""

import os
import subprocess
import sys

import pytest

from tbptt._src import cli, demo


def test_demo_runs_and_writes_a_plot(tmp_path, capsys):
    path = tmp_path / "demo.png"
    code = cli.main(["demo", "--steps", "3", "--length", "10", "--delay", "5",
                     "--chunk-size", "3", "--plot", str(path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "exact loss" in out and "truncated loss" in out
    assert path.stat().st_size > 1000


def test_demo_rejects_a_chunk_that_covers_the_delay(capsys):
    assert cli.main(["demo", "--chunk-size", "8", "--delay", "8"]) == 2
    assert "--chunk-size < --delay" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "tbptt._src.cli", "--help"], capture_output=True,
                         text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0 and "demo" in out.stdout


def test_echo_batch_targets_are_the_delayed_inputs():
    import numpy as np
    x, y, w = demo.echo_batch(np.random.RandomState(0), 4, 12, 5)
    np.testing.assert_array_equal(y[:, 5:, 0], (x[:, :-5, 0] + 1) / 2)
    assert w[:, :5].sum() == 0 and w[:, 5:].min() == 1


@pytest.mark.slow
def test_demo_shows_exact_learning_what_truncated_cannot():
    final = demo.run(plot_path=None, quiet=True)
    assert final["exact"] > 0.95
    assert final["truncated"] < 0.75

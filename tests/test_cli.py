"""The `tbptt` console script and its demo."""

import os
import subprocess
import sys

import pytest

from tbptt._src import cli, demo


def test_demo_runs_and_writes_a_plot(tmp_path, capsys):
    path = tmp_path / "demo.png"
    code = cli.main(
        [
            "demo",
            "--steps",
            "3",
            "--length",
            "10",
            "--delay",
            "5",
            "--chunk-size",
            "3",
            "--plot",
            str(path),
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "train loss" in out and "held-out acc" in out and "truncated" in out
    assert path.stat().st_size > 1000


def test_demo_rejects_a_chunk_that_covers_the_delay(capsys):
    assert cli.main(["demo", "--chunk-size", "8", "--delay", "8"]) == 2
    assert "--chunk-size < --delay" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "tbptt._src.cli", "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert out.returncode == 0 and "demo" in out.stdout


def test_help_and_version_do_not_import_tensorflow():
    code = (
        "import sys\nfrom tbptt._src import cli\n"
        "for argv in (['--help'], ['--version'], ['reproduce', '--help']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().endswith("False"), out.stdout
    assert "tbptt 0.1.0" in out.stdout
    assert "cut into two models" in out.stdout  # each experiment says what it is


@pytest.mark.slow
def test_commands_are_quiet_unless_verbose():
    args = [
        sys.executable,
        "-m",
        "tbptt._src.cli",
        "diagnose",
        "--train-steps",
        "0",
        "--length",
        "10",
        "--delay",
        "5",
        "--chunk-sizes",
        "4",
        "--backprop-chunks",
        "1",
        "--plot",
        "",
        "--quiet",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "I0000" not in out.stderr and "E0000" not in out.stderr, out.stderr


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


@pytest.mark.slow
def test_diagnose_runs_on_the_demo_model_and_writes_a_plot(tmp_path, capsys):
    path = tmp_path / "diagnose.png"
    code = cli.main(
        [
            "diagnose",
            "--train-steps",
            "2",
            "--length",
            "16",
            "--delay",
            "5",
            "--chunk-sizes",
            "4",
            "--backprop-chunks",
            "2",
            "--plot",
            str(path),
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "Truncated vs exact gradient (T=16, batch=64" in out and "Carried dLoss/dstate" in out
    assert path.stat().st_size > 1000


@pytest.mark.parametrize(
    "args,message",
    [
        (["--chunk-sizes", "4,x"], "positive ints separated by commas"),
        (["--backprop-chunks", "0"], "positive ints separated by commas"),
    ],
)
@pytest.mark.default_cases("args0-positive ints separated by commas")
def test_diagnose_rejects_bad_lists(args, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["diagnose"] + args)
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_diagnose_on_the_trained_demo_model_finds_the_delay():
    """Trained on the 8-step echo, the model's gradient needs the delay: a window of one
    4-step chunk loses much of it, windows of 16+ steps almost none."""
    report = demo.diagnose(plot_path=None, quiet=True, chunk_sizes=(4,), backprop_chunks=(1, 4, 8))
    cosine = {row.backprop_chunks: row.cosine for row in report.rows}
    assert cosine[1] < 0.8 and cosine[4] > 0.95 and cosine[8] > 0.999

"""The examples run as printed in their docstrings, at small sizes."""

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("name", ["classify.py", "char_lm.py"])
@pytest.mark.default_cases("classify.py")
def test_help_explains_every_option(name):
    text = run_example(name, "--help")
    assert "default:" in text and "usage:" in text


@pytest.mark.slow
def test_the_classification_example_trains_as_keras_does():
    """The chunked exact run and the one-tape Keras model see the same batches from the same
    weights: their held-out losses and training curves agree to float32 round-off."""
    rows = {
        line.split()[0]: line.split()[1:]
        for line in run_example("classify.py", "--steps", "25", "--plot", "").splitlines()[1:]
    }
    keras_loss, exact_loss = float(rows["keras"][0]), float(rows["exact"][0])
    assert abs(exact_loss - keras_loss) <= 1e-3 * keras_loss
    assert float(rows["exact"][2]) < 1e-4  # the largest training-loss gap to keras

"""Shared set-up of the TF1-style examples: legacy Keras for `tf.compat.v1.nn.rnn_cell`.

On TensorFlow >= 2.16, `tf.compat.v1.nn.rnn_cell` and `tf.compat.v1.layers` live in the
`tf-keras` package and need TF_USE_LEGACY_KERAS=1 before TensorFlow is first imported.
"""

import importlib.util
import os
import sys

# Only where tf-keras is installed: on TF 2.15 the TF1 cells are native and the variable would
# point tf.keras at a package that is not there.
if importlib.util.find_spec("tf_keras") is not None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def require_legacy_cells() -> None:
    """Exits with a clear message where the TF1 cells cannot be had."""
    try:
        tf.compat.v1.nn.rnn_cell.GRUCell(1)
    except Exception as error:  # noqa: BLE001 - any failure here means the same fix
        sys.exit(
            "tf.compat.v1.nn.rnn_cell is not available on TensorFlow "
            f"{tf.__version__} ({type(error).__name__}: {error}). Install the legacy extra, "
            "pip install 'tbptt[legacy]', and set TF_USE_LEGACY_KERAS=1 before TensorFlow "
            "is imported."
        )


def quiet_tf1_warnings() -> None:
    tf.get_logger().setLevel("ERROR")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)


def relative_error(actual, expected) -> float:
    import numpy as np

    actual, expected = np.asarray(actual, "float64"), np.asarray(expected, "float64")
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))

"""Shared helpers: meaningful test data, weight copying and independent references."""

import functools
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tbptt._src.core import chunking  # noqa: E402


def make_sequence(batch, steps, features, dtype="float32", offset=0.0):
    """Deterministic, non-zero, not-constant inputs: no dropped state can pass unnoticed."""
    t = np.arange(steps, dtype="float64")[None, :, None]
    b = np.arange(batch, dtype="float64")[:, None, None]
    f = np.arange(features, dtype="float64")[None, None, :]
    values = np.sin(0.3 * t + 0.7 * b + 1.1 * f + offset) + 0.1 * (f + 1) / features
    return values.astype(dtype)


def l1_loss(y_true, y_pred):
    """Seed 001's reduce_sum(sqrt(square(.))) loss, written smoothly enough for float64 FD."""
    return tf.reduce_sum(tf.sqrt(tf.square(y_true - y_pred) + 1e-3))


def float64_loss(loss_class, **kwargs):
    """A Keras loss computing in float64 (Keras 3 casts to floatx unless told; Keras 2 keeps the
    inputs' dtype and takes no `dtype`)."""
    try:
        return loss_class(dtype="float64", **kwargs)
    except TypeError:
        return loss_class(**kwargs)


def sum_squares(y_true, y_pred):
    return tf.reduce_sum(tf.square(y_true - y_pred))


def dense(value):
    """A gradient as one array (an embedding's IndexedSlices summed densely)."""
    return tf.convert_to_tensor(value) if isinstance(value, tf.IndexedSlices) else value


def max_rel_error(actual, expected):
    """max |a - e| / max(|e|), over a list of tensors (0 for an all-zero reference)."""
    errors = []
    for a, e in zip(actual, expected):
        a, e = np.asarray(dense(a), "float64"), np.asarray(dense(e), "float64")
        scale = max(np.max(np.abs(e)), 1e-30)
        errors.append(np.max(np.abs(a - e)) / scale)
    return max(errors)


def assert_all_close(actual, expected, rtol, what=""):
    actual, expected = tf.nest.flatten(actual), tf.nest.flatten(expected)
    assert len(actual) == len(expected), what
    error = max_rel_error(actual, expected)
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:.1g}"


def run_python(code: str, *args, timeout: float = 300) -> str:
    """Runs `code` in a new Python process (`sys.argv[1:]` are `args`) and returns its stdout;
    a failure shows the process's own traceback."""
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def copy_weights(source, target, input_shape):
    source.build(input_shape)
    target.build(input_shape)
    assert len(source.trainable_variables) == len(target.trainable_variables) > 0
    for s, t in zip(source.trainable_variables, target.trainable_variables):
        t.assign(s)


# Two logical CPUs, so that placing stages on devices can be tested without a second device.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


@functools.cache
def mirrored() -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy over the two logical CPUs for the whole test process: TensorFlow's
    collective ops go wrong when several strategies over the same devices run reductions of
    different dtypes in one process (plain Keras fails so too), whatever tbptt does."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


# tests/legacy needs the TF1 cells, which on TF >= 2.16 exist only with TF_USE_LEGACY_KERAS=1
# set before TensorFlow is imported: tests/test_compat_v1.py runs it in a subprocess.
LEGACY_CELLS_HERE = os.environ.get("TF_USE_LEGACY_KERAS") == "1" or tuple(
    int(v) for v in tf.__version__.split(".")[:2]
) < (2, 16)
# tests/data holds the script that wrote the saved models kept there, not tests.
collect_ignore = ["data"] + ([] if LEGACY_CELLS_HERE else ["legacy"])


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture(autouse=True)
def _chunk_by_chunk(request, monkeypatch):
    """The tests of chunking run their chunks as cut: memory_budget="auto" keeps nothing here
    (its 1 GiB would hold every test's whole call as one chunk, and the chunked path would go
    untested). Tests of the default itself are marked `default_budget`; subprocesses and
    explicit budgets are untouched."""
    if request.node.get_closest_marker("default_budget") is None:
        monkeypatch.setattr(chunking, "DEFAULT_MEMORY_BUDGET", 0)
    yield


# tbptt.keras.ChunkedModel needs Keras 3; CI's TF 2.15 leg runs the core tests with Keras 2.
needs_keras3 = pytest.mark.skipif(
    int(keras.__version__.split(".")[0]) < 3, reason="tbptt.keras needs Keras 3"
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the marks added here count
def pytest_collection_modifyitems(config, items):
    """The default suite runs, of each parametrized test, the cases its `default_cases` mark
    names: the test's own choice, not the order of its parameters. Its other cases are marked
    `slow` (and `more_cases`) and run with `pytest -m slow`, as CI does. A parametrized test
    without the mark, or naming a case it does not have, is refused."""
    cases, problems = {}, []
    # Cases chosen by id on the command line: the others are not collected to be compared.
    chosen = any("[" in arg for arg in config.args)
    for item in items:
        if getattr(item, "callspec", None) is not None:
            cases.setdefault(item.nodeid.split("[")[0], (item, set()))[1].add(item.callspec.id)
    for function, (item, ids) in cases.items():
        mark = item.get_closest_marker("default_cases")
        if mark is None:
            problems.append(f"{function} has no @pytest.mark.default_cases(...)")
        elif not mark.kwargs.get("every") and set(mark.args) - ids and not chosen:
            problems.append(f"{function}: no case {sorted(set(mark.args) - ids)}")
    if problems:
        raise pytest.UsageError("\n".join(problems))
    for item in items:
        if getattr(item, "callspec", None) is None:
            continue
        mark = item.get_closest_marker("default_cases")
        if not mark.kwargs.get("every") and item.callspec.id not in mark.args:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.more_cases)

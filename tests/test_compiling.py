"""The compile cache: what shares a trace, what warns, and memory that stays flat over many
calls (RSS measured over thousands of calls, not timed)."""

import gc
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close, mirrored
from references import full_bptt

import tbptt


def chain(chunk_size=5):
    return tbptt.RecurrentChain(
        [keras.layers.GRUCell(8, dtype="float64")],
        head=keras.layers.Dense(2, dtype="float64"),
        chunk_size=chunk_size,
        dtype="float64",
    )


def data(steps=20):
    rng = np.random.RandomState(steps)
    return rng.randn(2, steps, 3), rng.randn(2, steps, 2)


def resident_mb() -> float:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def scaled_squares(scale):
    return lambda a, b: scale * tf.reduce_sum(tf.square(a - b))


def test_a_lambda_made_anew_each_call_is_one_trace_and_right():
    model = chain()
    x, y = data()
    for _ in range(3):
        result = model.value_and_gradients(x, y, scaled_squares(2.0))
    assert model.trace_count == 1
    expected = full_bptt(model, x, y, lambda a, b: 2.0 * tf.reduce_sum(tf.square(a - b)))
    assert_all_close([result.loss] + result.grads, [expected[0]] + expected[1], 1e-10)
    # ... and closing over another value, it is another function: traced, and warned of.
    with pytest.warns(UserWarning, match="kind traced before but with other values"):
        other = model.value_and_gradients(x, y, scaled_squares(3.0))
    np.testing.assert_allclose(float(other.loss), 1.5 * float(result.loss), rtol=1e-12)


def test_a_keras_loss_annealed_each_call_warns_at_once():
    model = chain()
    x, y = data()
    model.value_and_gradients(x, y, keras.losses.Huber(delta=1.0, dtype="float64"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.value_and_gradients(x, y, keras.losses.Huber(delta=0.5, dtype="float64"))
    assert [w for w in caught if "tf.Variable" in str(w.message)]


@pytest.mark.slow
def test_memory_stays_flat_over_new_loss_objects_and_new_lengths():
    model = chain(chunk_size=50)
    x, y = data(120)
    for _ in range(20):  # warm: the traces and XLA programs every later call reuses
        model.value_and_gradients(x, y, lambda a, b: tf.reduce_sum(tf.square(a - b)))
        model.value_and_gradients(x, y, keras.losses.MeanSquaredError(dtype="float64"))
    start = resident_mb()
    for _ in range(1000):
        model.value_and_gradients(x, y, lambda a, b: tf.reduce_sum(tf.square(a - b)))
        model.value_and_gradients(x, y, keras.losses.MeanSquaredError(dtype="float64"))
    after_losses = resident_mb()
    loss = keras.losses.MeanSquaredError(dtype="float64")
    lengths = range(51, 551)  # 500 lengths: every last chunk length from 1 to 50

    def each_length():
        for steps in lengths:
            model.value_and_gradients(*data(steps), loss)
            model(data(steps)[0])
        return resident_mb()

    # The first pass fills TensorFlow's caches of a shape (15-45 MB over these 500 lengths,
    # the same with oneDNN off); the second, over the same lengths, must keep nothing more.
    first_pass = each_length()
    second_pass = each_length()
    assert after_losses - start < 50, (start, after_losses)
    assert first_pass - after_losses < 100, (after_losses, first_pass)
    assert second_pass - first_pass < 10, (first_pass, second_pass)
    assert model.trace_count <= 4


def test_each_replica_of_an_eager_strategy_run_reads_its_own_weights():
    """The kept concrete functions are one per key only outside a strategy: each replica of
    `strategy.run` traces its own, on its own device and copy of the variables."""
    strategy = mirrored()
    with strategy.scope():
        model = chain()
        model.build([None, None, 3])
    x, y = data()
    loss = keras.losses.MeanSquaredError(dtype="float64")
    # Replica 1's copy of the first kernel differs: its loss shows whose weights it read.
    kernel = tbptt._src.core.compat.tf_variable(model.trainable_variables[0])
    kernel.values[1].assign(kernel.values[1] * 0 + 0.5)
    for _ in range(2):
        results = strategy.run(lambda: model.value_and_gradients(x, y, loss).loss)
        losses = [float(r) for r in strategy.experimental_local_results(results)]
    with tf.device("/cpu:1"):
        other = tbptt.RecurrentChain(
            [keras.layers.GRUCell(8, dtype="float64")],
            head=keras.layers.Dense(2, dtype="float64"),
            chunk_size=5,
            dtype="float64",
        )
        other.build([None, None, 3])
        for target, source in zip(other.trainable_variables, model.trainable_variables):
            target.assign(tbptt._src.core.compat.tf_variable(source).values[1])
        expected = float(full_bptt(other, x, y, loss)[0])
    assert losses[0] != losses[1]
    # A mean loss is a replica's share of the global batch's, as in Keras under a strategy.
    np.testing.assert_allclose(losses[1] * strategy.num_replicas_in_sync, expected, rtol=1e-12)

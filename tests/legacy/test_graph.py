"""compat.v1 in TF1-style graphs with the native tf.compat.v1.nn.rnn_cell cells.

Needs TF_USE_LEGACY_KERAS=1 (and tf-keras) on TF >= 2.16, so tests/test_compat_v1.py runs this
folder in a subprocess; on TF 2.15 the cells are native and it runs as it is.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tbptt

v1 = tf.compat.v1
B, F, STEPS, CHUNKS = 3, 4, 5, 3


def inputs():
    t = np.arange(STEPS * CHUNKS, dtype="float64")[None, :, None]
    x = np.sin(0.3 * t + np.arange(B)[:, None, None] + np.arange(F)[None, None, :])
    return x.astype("float32"), np.cos(x[..., :2]).astype("float32")


def chunked_graph(make_cell, initial_state_fn, loss_mask=None):
    """A cell unrolled chunk by chunk with dynamic_rnn (shared weights), a dense head per chunk."""
    x_value, y_value = inputs()
    x = v1.placeholder(tf.float32, [B, STEPS * CHUNKS, F])
    y = v1.placeholder(tf.float32, [B, STEPS * CHUNKS, 2])
    cell = make_cell()
    state = initial_state_fn(cell)
    boundary, losses = [state], []
    dense = v1.layers.Dense(2)
    with v1.variable_scope("rnn", reuse=v1.AUTO_REUSE):
        for k in range(CHUNKS):
            window = slice(k * STEPS, (k + 1) * STEPS)
            out, state = v1.nn.dynamic_rnn(cell, x[:, window], initial_state=state)
            loss = tf.reduce_sum(tf.abs(dense(out) - y[:, window]))
            if loss_mask is not None and not loss_mask[k]:
                loss = tf.constant(0.0)  # this chunk's loss reaches nothing
            boundary.append(state)
            losses.append(loss)
    return {x: x_value, y: y_value}, losses, boundary


def compare(feed, losses, boundary, final_state_grad=None, extra_feed=None):
    variables = v1.trainable_variables()
    result = tbptt.compat.v1.backprop_chunks(
        losses, boundary, variables, final_state_grad=final_state_grad
    )
    total = tf.add_n(losses)
    if final_state_grad is not None:
        total += tf.add_n(
            [
                tf.reduce_sum(g * s)
                for g, s in zip(tf.nest.flatten(final_state_grad), tf.nest.flatten(boundary[-1]))
            ]
        )
    initial = tf.nest.flatten(boundary[0])
    reference = tf.gradients(total, variables + initial)
    reference_mid = tf.gradients(
        total, tf.nest.flatten(boundary[1]), stop_gradients=tf.nest.flatten(boundary[1])
    )
    with v1.Session() as sess:
        sess.run(v1.global_variables_initializer())
        feed = {**feed, **(extra_feed or {})}
        ours, theirs, mid_ours, mid_theirs = sess.run(
            [
                result.variable_grads + tf.nest.flatten(result.initial_state_grad),
                [
                    tf.zeros_like(v) if g is None else g
                    for g, v in zip(reference, variables + initial)
                ],
                tf.nest.flatten(result.state_grads[1]),
                [
                    tf.zeros_like(s) if g is None else g
                    for g, s in zip(reference_mid, tf.nest.flatten(boundary[1]))
                ],
            ],
            feed,
        )
    for a, b in zip(ours + mid_ours, theirs + mid_theirs):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    assert any(np.abs(a).max() > 1e-3 for a in ours)  # not vacuous


@pytest.fixture
def graph():
    with tf.Graph().as_default() as g:
        v1.set_random_seed(3)
        yield g


def test_gru_chunks_equal_one_gradient(graph):
    feed, losses, boundary = chunked_graph(
        lambda: v1.nn.rnn_cell.GRUCell(6), lambda cell: tf.ones([B, 6]) * 0.2
    )
    compare(feed, losses, boundary)


def test_final_state_grad_from_the_next_mini_batch(graph):
    feed, losses, boundary = chunked_graph(
        lambda: v1.nn.rnn_cell.GRUCell(6), lambda cell: tf.zeros([B, 6])
    )
    grad = v1.placeholder(tf.float32, [B, 6])
    compare(feed, losses, boundary, grad, {grad: np.full([B, 6], 0.7, "float32")})


def test_lstm_state_tuples(graph):
    feed, losses, boundary = chunked_graph(
        lambda: v1.nn.rnn_cell.LSTMCell(5),
        lambda cell: v1.nn.rnn_cell.LSTMStateTuple(tf.ones([B, 5]) * 0.1, tf.ones([B, 5]) * 0.3),
    )
    assert isinstance(boundary[1], v1.nn.rnn_cell.LSTMStateTuple)
    compare(feed, losses, boundary)


def test_multi_rnn_cell_nested_tuples(graph):
    feed, losses, boundary = chunked_graph(
        lambda: v1.nn.rnn_cell.MultiRNNCell(
            [v1.nn.rnn_cell.LSTMCell(4), v1.nn.rnn_cell.GRUCell(3)]
        ),
        lambda cell: cell.zero_state(B, tf.float32),
    )
    compare(feed, losses, boundary)


def test_chunks_whose_loss_reaches_nothing_get_zeros(graph):
    feed, losses, boundary = chunked_graph(
        lambda: v1.nn.rnn_cell.GRUCell(6), lambda cell: tf.zeros([B, 6]), [True, False, False]
    )
    compare(feed, losses, boundary)


def test_tf1_gru_weights_convert_to_keras():
    x = np.random.RandomState(0).randn(B, 7, F).astype("float32")
    with tf.Graph().as_default():
        cell = v1.nn.rnn_cell.GRUCell(6)
        out, _ = v1.nn.dynamic_rnn(cell, tf.constant(x), initial_state=tf.ones([B, 6]) * 0.3)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            # Random biases too, so that a swapped gate would show.
            for i, variable in enumerate(cell.variables):
                sess.run(variable.assign(np.random.RandomState(i).randn(*variable.shape)))
            expected, weights = sess.run([out, cell.variables])
    keras_cell = keras.layers.GRUCell(6, reset_after=False)
    rnn = keras.layers.RNN(keras_cell, return_sequences=True)
    state = [tf.constant(np.full([B, 6], 0.3, "float32"))]
    rnn(x[:, :1], initial_state=state)
    keras_cell.set_weights(tbptt.compat.v1.gru_weights_from_tf1(*weights))
    np.testing.assert_allclose(rnn(x, initial_state=state), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="TF1 GRUCell weights"):
        tbptt.compat.v1.gru_weights_from_tf1(weights[0].T, *weights[1:])


def test_errors(graph):
    _, losses, boundary = chunked_graph(
        lambda: v1.nn.rnn_cell.GRUCell(6), lambda cell: tf.zeros([B, 6])
    )
    with pytest.raises(ValueError, match="one state per cut"):
        tbptt.compat.v1.backprop_chunks(losses, boundary[:-1])
    with pytest.raises(ValueError, match="final_state_grad must have the structure"):
        tbptt.compat.v1.backprop_chunks(losses, boundary, final_state_grad=(1.0, 2.0))

"""Hoisted GRU/LSTM runners and their hand-written backward against Keras's own cells."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close

from tbptt._src.recurrent.loops import gru, lstm, runners, stock, timeloop

CELLS = {
    "gru": lambda: keras.layers.GRUCell(5, dtype="float64"),
    "gru_reset_before": lambda: keras.layers.GRUCell(5, reset_after=False, dtype="float64"),
    "gru_no_bias": lambda: keras.layers.GRUCell(5, use_bias=False, dtype="float64"),
    "gru_relu": lambda: keras.layers.GRUCell(5, activation="relu", dtype="float64"),
    "lstm": lambda: keras.layers.LSTMCell(4, dtype="float64"),
    "lstm_no_bias": lambda: keras.layers.LSTMCell(4, use_bias=False, dtype="float64"),
    "lstm_hard_sigmoid": lambda: keras.layers.LSTMCell(
        4, recurrent_activation="hard_sigmoid", dtype="float64"
    ),
}


def random_cell(kind, features, seed=0):
    """A built cell with random weights and biases (zero biases would hide bias bugs)."""
    rng = np.random.RandomState(seed)
    cell = CELLS[kind]()
    rnn = keras.layers.RNN(cell, return_sequences=True, return_state=True, dtype="float64")
    rnn(np.zeros([1, 1, features]))
    for variable in cell.trainable_variables:
        variable.assign(rng.randn(*variable.shape) * 0.6)
    return cell, rnn


def problem(cell, batch=3, steps=9, features=4, seed=1):
    rng = np.random.RandomState(seed)
    x = tf.constant(rng.randn(batch, steps, features))
    states = [tf.constant(rng.randn(batch, size)) for size in tf.nest.flatten(cell.state_size)]
    weights = tf.constant(rng.randn(batch, steps, cell.units))  # makes every output matter
    return x, states, weights


def value_and_grads(run, cell, x, states, weights, graph):
    """Loss (outputs and final states both reach it) and its gradient wrt x, states, weights."""

    def loss_of(x, states):
        outputs, final = run(x, states)
        return (
            (
                tf.reduce_sum(outputs * weights)
                + tf.add_n([tf.reduce_sum(tf.sin(s)) for s in final])
            ),
            outputs,
            final,
        )

    wrt = lambda: [x] + states + list(cell.trainable_variables)  # noqa: E731
    if graph:

        @tf.function
        def compute(x, states):
            loss, outputs, final = loss_of(x, states)
            return (
                [loss, outputs]
                + final
                + tf.gradients(
                    loss,
                    [x]
                    + states
                    + [
                        v.value if hasattr(v, "value") and isinstance(v.value, tf.Variable) else v
                        for v in cell.trainable_variables
                    ],
                )
            )

        return compute(x, states)
    with tf.GradientTape() as tape:
        tape.watch([x] + states)
        loss, outputs, final = loss_of(x, states)
    return [loss, outputs] + list(final) + tape.gradient(loss, wrt())


def keras_run(rnn):
    def run(x, states):
        out = rnn(x, initial_state=states)
        return out[0], list(out[1:])

    return run


def hoisted_run(cell, xla=True):
    def run(x, states):
        top, (final,) = runners.run_layers(
            [runners.runner_for(cell)],
            [states],
            x,
            training=True,
            loop=timeloop.LoopSettings(xla=xla),
        )
        return timeloop.time_major(top), final

    return run


@pytest.mark.parametrize("graph", [False, True], ids=["tape", "tf_gradients"])
@pytest.mark.parametrize("kind", sorted(CELLS))
@pytest.mark.default_cases("gru-tape")
def test_hoisted_runner_equals_keras_cell(kind, graph):
    """With the time loops compiled by XLA (the default)."""
    cell, rnn = random_cell(kind, 4)
    x, states, weights = problem(cell)
    expected = value_and_grads(keras_run(rnn), cell, x, states, weights, graph)
    actual = value_and_grads(hoisted_run(cell), cell, x, states, weights, graph)
    assert len(actual) == len(expected)
    assert_all_close(actual, expected, 1e-12, kind)


@pytest.mark.parametrize("graph", [False, True], ids=["tape", "tf_gradients"])
@pytest.mark.parametrize("kind", ["gru", "gru_reset_before", "lstm"])
@pytest.mark.default_cases("gru-tape")
def test_loops_without_xla_equal_keras_cell(kind, graph):
    cell, rnn = random_cell(kind, 4)
    x, states, weights = problem(cell)
    expected = value_and_grads(keras_run(rnn), cell, x, states, weights, graph)
    actual = value_and_grads(hoisted_run(cell, xla=False), cell, x, states, weights, graph)
    assert_all_close(actual, expected, 1e-12, kind)


def test_float32_hoisted_runner_equals_keras_cell():
    cell = keras.layers.GRUCell(6)
    rnn = keras.layers.RNN(cell, return_sequences=True, return_state=True)
    x = tf.random.stateless_normal([2, 30, 3], [0, 1])
    rnn(x)
    states = [tf.random.stateless_normal([2, 6], [0, 2])]
    weights = tf.random.stateless_normal([2, 30, 6], [0, 3])
    expected = value_and_grads(keras_run(rnn), cell, x, states, weights, False)
    actual = value_and_grads(hoisted_run(cell), cell, x, states, weights, False)
    assert_all_close(actual, expected, 1e-5, "float32")


@pytest.mark.parametrize(
    "kind,xla",
    [
        ("gru", True),
        ("lstm", False),
        ("gru_relu", True),
        ("lstm", True),
        ("gru_reset_before", True),
    ],
)
@pytest.mark.default_cases("gru-True")
def test_second_derivatives_equal_keras(kind, xla):
    """A gradient penalty: the XLA-compiled loops (whose first derivative is written out), the
    same loops without XLA, and a cell stepped under autodiff all give Keras's own second
    derivative."""
    cell, rnn = random_cell(kind, 4)
    x, states, weights = problem(cell)

    def penalty_gradient(run):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                outputs, _ = run(x, states)
                loss = tf.reduce_sum(outputs * weights)
            grads = inner.gradient(loss, cell.trainable_variables)
            penalty = tf.add_n([tf.reduce_sum(g * g) for g in grads])
        return outer.gradient(penalty, cell.trainable_variables)

    assert_all_close(
        penalty_gradient(hoisted_run(cell, xla)), penalty_gradient(keras_run(rnn)), 1e-12, kind
    )


def test_only_stock_cells_are_hoisted():
    class MyGRU(keras.layers.GRUCell):
        pass

    assert isinstance(runners.runner_for(keras.layers.GRUCell(3)), stock.GRURunner)
    assert isinstance(runners.runner_for(keras.layers.LSTMCell(3)), stock.LSTMRunner)
    assert isinstance(runners.runner_for(keras.layers.SimpleRNNCell(3)), stock.SimpleRNNRunner)
    # A subclass may override call(): it runs as itself.
    assert isinstance(runners.runner_for(MyGRU(3)), runners._CellRunner)


def test_the_hand_written_backward_is_used():
    """The backward of a stock GRU's time loop is the written one: no gradient While op is
    generated by autodiff for it (which would keep a stack of every step's intermediates)."""
    cell, _ = random_cell("gru", 4)
    x, states, weights = problem(cell)

    @tf.function
    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs, _ = hoisted_run(cell)(x, states)
            loss = tf.reduce_sum(outputs * weights)
        return tape.gradient(loss, x)

    graph = grads.get_concrete_function(x).graph.as_graph_def()
    nodes = list(graph.node) + [node for f in graph.library.function for node in f.node_def]
    ops = [node.op for node in nodes]
    names = " ".join(node.name for node in nodes)
    assert ops.count("While") + ops.count("StatelessWhile") == 2  # forward loop, written backward
    assert "gradients/while" not in names.lower()
    compiled = [f for f in graph.library.function if f.attr["_XlaMustCompile"].b]
    assert len(compiled) == 2  # each loop compiled with XLA


# -- each step's backward against a tape over its forward ----------------------------------------


def _step_problem(units, width, seed=3):
    rng = np.random.RandomState(seed)
    return [
        tf.constant(rng.randn(*shape) * 0.7)
        for shape in [
            (3, width * units),
            (3, units),
            (units, width * units),
            (width * units,),
            (3, units),
        ]
    ]


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.default_cases("True")
def test_gru_step_backward_is_the_transpose_of_the_step(reset_after):
    x, h, kernel, bias, dh = _step_problem(4, 3)
    with tf.GradientTape() as tape:
        tape.watch([x, h, kernel, bias])
        h_new, z, r, hh, aux = gru.step(
            x, h, kernel, bias if reset_after else None, reset_after, tf.tanh, tf.sigmoid
        )
    expected = tape.gradient(
        h_new, [x, h, kernel, bias], output_gradients=dh, unconnected_gradients="zero"
    )
    dh_prev, d_step = gru.step_backward(
        dh, h, z, r, hh, aux, gru.kernels_of(kernel, reset_after), reset_after
    )
    d_x, d_inner = gru.step_parts(d_step, reset_after)
    d_kernel = tf.matmul(h, d_inner, transpose_a=True)  # the gates' (or all) columns
    if not reset_after:  # the candidate's columns multiply the reset state r * h
        d_kernel = tf.concat([d_kernel, tf.matmul(aux, d_x[:, 8:], transpose_a=True)], axis=1)
    d_bias = tf.reduce_sum(d_inner, 0) if reset_after else tf.zeros_like(bias)
    assert_all_close([d_x, dh_prev, d_kernel, d_bias], expected, 1e-13)


def test_lstm_step_backward_is_the_transpose_of_the_step():
    x, h, kernel, _, dh = _step_problem(4, 4)
    c, dc = h * 0.5 + 0.1, dh * -0.3
    with tf.GradientTape() as tape:
        tape.watch([x, h, c, kernel])
        h_new, c_new, i, f, o, g, tanh_c = lstm.step(x, h, c, kernel, tf.tanh, tf.sigmoid)
        total = tf.reduce_sum(h_new * dh) + tf.reduce_sum(c_new * dc)
    expected = tape.gradient(total, [x, h, c, kernel])
    dh_prev, dc_prev, d_x = lstm.step_backward(dh, dc, c, i, f, o, g, tanh_c, kernel)
    d_x = tf.concat(d_x, axis=1)
    d_kernel = tf.matmul(h, d_x, transpose_a=True)
    assert_all_close([d_x, dh_prev, dc_prev, d_kernel], expected, 1e-13)


def test_unroll_keeps_any_state_nest():
    def core(x, state):
        return x * state["scale"], {"scale": state["scale"] + 1, "sum": (state["sum"][0] + x,)}

    x = tf.constant(np.arange(1.0, 7.0).reshape(1, 3, 2))
    state = {"scale": tf.ones([1, 2], tf.float64), "sum": (tf.zeros([1, 2], tf.float64),)}
    outputs, final = timeloop.unroll(core, x, state)
    np.testing.assert_allclose(outputs[0], [[1, 2], [6, 8], [15, 18]])
    np.testing.assert_allclose(final["scale"], [[4, 4]])
    np.testing.assert_allclose(final["sum"][0], [[9, 12]])

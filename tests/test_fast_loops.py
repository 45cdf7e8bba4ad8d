"""The compiled time loops off the stock path: per-step flags inside the GRU/LSTM loops, and the
loops of any Keras cell (other activations, SimpleRNNCell, a user's cell), each against a
reference that does not run the library (one tape over Keras's RNN, or one Keras cell call per
step and layer), and each shown to take the compiled loops rather than the step-by-step one."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close, make_sequence, needs_keras3
from references import full_bptt, stepwise_forward

import tbptt
from tbptt._src.recurrent.loops import timeloop

B, T, F, K = 3, 23, 4, 6  # a ragged last chunk
F64 = 1e-12


def weighted_l1(y_true, y_pred, sample_weight=None):
    weight = 1.0 if sample_weight is None else tf.cast(sample_weight, y_pred.dtype)[..., None]
    return tf.reduce_sum(weight * tf.sqrt(tf.square(y_true - y_pred) + 1e-3))


class MinimalRNNCell(keras.layers.Layer):
    """A user's cell, as in Keras's RNN guide: h' = tanh(x W + h U)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.recurrent_kernel = self.add_weight(
            shape=(self.units, self.units), name="recurrent_kernel"
        )

    def call(self, inputs, states):
        h = tf.tanh(tf.matmul(inputs, self.kernel) + tf.matmul(states[0], self.recurrent_kernel))
        return h, [h]


class CountingCell(MinimalRNNCell):
    """A cell with state of its own (a step counter): it cannot be run again stateless."""

    def build(self, input_shape):
        super().build(input_shape)
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False, name="calls")


class GridCell(keras.layers.Layer):
    """A cell whose output per step is ``[B, 2, 3]``: the next layer's inputs are rank 4."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units

    def build(self, input_shape):
        features = int(np.prod(input_shape[1:]))
        self.kernel = self.add_weight(shape=(features, self.units), name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(self.units, self.units), name="rec")
        self.out = self.add_weight(shape=(self.units, 6), name="out")

    def call(self, inputs, states):
        flat = tf.reshape(inputs, [tf.shape(inputs)[0], -1])
        h = tf.tanh(tf.matmul(flat, self.kernel) + tf.matmul(states[0], self.recurrent_kernel))
        return tf.reshape(tf.matmul(h, self.out), [-1, 2, 3]), [h]


class NoisyCell(MinimalRNNCell):
    """A cell that draws noise in training: a step run again would be another step."""

    def __init__(self, units, in_branch=False, **kwargs):
        super().__init__(units, **kwargs)
        self.in_branch = in_branch

    def call(self, inputs, states, training=False):
        h, _ = super().call(inputs, states)
        if training:

            def noisy():
                return h * tf.random.uniform(tf.shape(h), 0.5, 1.5, dtype=h.dtype)

            # inside a tf.cond the draw is in a branch function, not in the step's own graph
            h = (
                tf.cond(tf.reduce_all(tf.math.is_finite(h)), noisy, lambda: h)
                if (self.in_branch)
                else noisy()
            )
        return h, [h]


CELLS = {
    "gru": lambda: keras.layers.GRUCell(5, dtype="float64"),
    "gru_reset_before": lambda: keras.layers.GRUCell(5, reset_after=False, dtype="float64"),
    "lstm": lambda: keras.layers.LSTMCell(5, dtype="float64"),
    "relu_gru": lambda: keras.layers.GRUCell(5, activation="relu", dtype="float64"),
    "relu_lstm": lambda: keras.layers.LSTMCell(5, activation="relu", dtype="float64"),
    "simple_rnn": lambda: keras.layers.SimpleRNNCell(5, dtype="float64"),
    "user_cell": lambda: MinimalRNNCell(5, dtype="float64"),
    "grid_cell": lambda: GridCell(5, dtype="float64"),
}


def chain_of(cell: str, **options):
    keras.utils.set_random_seed(3)
    chain = tbptt.RecurrentChain(
        [CELLS[cell](), CELLS[cell]()],
        head=keras.layers.Dense(2, dtype="float64"),
        chunk_size=K,
        dtype="float64",
        **options,
    )
    chain.build([None, None, F])
    return chain


def data():
    return make_sequence(B, T, F, "float64"), make_sequence(B, T, 2, "float64", 0.5)


def flags_of(kind: str) -> dict:
    rng = np.random.default_rng(7)
    reset, mask = rng.random([B, T]) < 0.15, rng.random([B, T]) < 0.8
    return {
        "none": {},
        "reset": {"reset": reset},
        "mask": {"mask": mask},
        "both": {"reset": reset, "mask": mask},
    }[kind]


@pytest.fixture
def step_loops(monkeypatch):
    """Counts the step-by-step loops run while tracing (0: every layer took a compiled loop)."""
    counts = {"step_by_step": 0}
    step_by_step = timeloop.unroll_time_major

    def counted(*args, **kwargs):
        counts["step_by_step"] += 1
        return step_by_step(*args, **kwargs)

    monkeypatch.setattr(timeloop, "unroll_time_major", counted)
    return counts


def flagged_reference(chain, x, y, state, flags):
    """One tape over one Keras cell call per layer and step (a reset zeroes a row's state, a
    masked step keeps it and adds no loss)."""
    with tf.GradientTape() as tape:
        tape.watch(state)
        outputs, _ = stepwise_forward(chain, x, state, **flags)
        weight = flags.get("mask")
        loss = weighted_l1(y, outputs, None if weight is None else weight.astype("float64"))
    grads, state_grad = tape.gradient(loss, [chain.trainable_variables, state])
    return loss, grads, state_grad


@needs_keras3
@pytest.mark.parametrize("flags", ["both", "reset", "mask", "none"])
@pytest.mark.parametrize("cell", [c for c in CELLS if c != "grid_cell"])  # [B, 2, 3] outputs
@pytest.mark.parametrize("mode", ["exact", "truncated"])
@pytest.mark.default_cases("exact-gru-both")
def test_compiled_loops_with_and_without_flags_equal_the_cells_step_by_step(
    mode, cell, flags, step_loops
):
    options = {"mode": "truncated", "backprop_chunks": T} if mode == "truncated" else {}
    chain = chain_of(cell, **options)  # truncated far enough back to be exact
    x, y = data()
    state = tf.nest.map_structure(lambda s: s + 0.1, chain.initial_state(B))
    given = flags_of(flags)
    result = chain.value_and_gradients(x, y, weighted_l1, state, **given)
    assert step_loops["step_by_step"] == 0
    if given:
        loss, grads, state_grad = flagged_reference(chain, x, y, state, given)
    else:  # one tape over keras.layers.RNN
        loss, grads, _, state_grad = full_bptt(chain, x, y, weighted_l1, state)
    assert_all_close(
        [result.loss] + result.grads + tf.nest.flatten(result.initial_state_grad),
        [loss] + grads + tf.nest.flatten(state_grad),
        F64,
        f"{cell} {flags}",
    )


@needs_keras3
@pytest.mark.parametrize("cell", ["relu_gru", "simple_rnn", "user_cell", "grid_cell"])
@pytest.mark.default_cases("relu_gru")
def test_the_forward_of_any_cell_runs_compiled_and_equals_keras_rnn(cell, step_loops):
    chain = chain_of(cell)
    x, _ = data()
    outputs, state = chain(x)
    assert step_loops["step_by_step"] == 0
    rnn = keras.layers.RNN(
        keras.layers.StackedRNNCells(chain.cells, dtype="float64"),
        return_sequences=True,
        return_state=True,
        dtype="float64",
    )
    expected, *states = rnn(x)
    assert_all_close([outputs] + tf.nest.flatten(state), [chain.head(expected)] + states, F64, cell)


@needs_keras3
def test_a_cell_with_state_of_its_own_runs_step_by_step_and_stays_exact(step_loops):
    keras.utils.set_random_seed(3)
    chain = tbptt.RecurrentChain(
        [CountingCell(5, dtype="float64")],
        head=keras.layers.Dense(2, dtype="float64"),
        chunk_size=K,
        dtype="float64",
    )
    x, y = data()
    chain.build([None, None, F])
    result = chain.value_and_gradients(x, y, weighted_l1)
    assert step_loops["step_by_step"] > 0
    loss, grads, _, _ = full_bptt(chain, x, y, weighted_l1)
    assert_all_close([result.loss] + result.grads, [loss] + grads, F64)


@needs_keras3
@pytest.mark.parametrize("cell", ["simple_rnn", "gru"])
@pytest.mark.default_cases("simple_rnn")
def test_a_gradient_penalty_differentiates_the_compiled_loops_of_any_cell(cell):
    """A second derivative (a tape over the gradient) gets the autodiff of the same loops."""
    chain = chain_of(cell)
    x, _ = data()

    def penalty(run):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                outputs, _ = run(x)
                loss = tf.reduce_sum(outputs**2)
            grads = inner.gradient(loss, chain.trainable_variables)
            total = tf.add_n([tf.reduce_sum(g**2) for g in grads])
        return outer.gradient(total, chain.trainable_variables)

    rnn = keras.layers.RNN(
        keras.layers.StackedRNNCells(chain.cells, dtype="float64"),
        return_sequences=True,
        dtype="float64",
    )
    expected = penalty(lambda x: (chain.head(rnn(x)), None))
    assert_all_close(penalty(chain), expected, 1e-10)


@needs_keras3
@pytest.mark.parametrize("in_branch", [False, True])
@pytest.mark.default_cases("False")
def test_a_cell_that_draws_noise_runs_step_by_step_and_differentiates_what_it_drew(
    in_branch, step_loops
):
    keras.utils.set_random_seed(3)
    chain = tbptt.RecurrentChain(
        [NoisyCell(5, in_branch, dtype="float64")], chunk_size=K, dtype="float64"
    )
    x, _ = data()
    with tf.GradientTape() as tape:
        outputs, _ = chain(x, training=True)
        loss = tf.reduce_sum(outputs)
    grads = tape.gradient(loss, chain.trainable_variables)
    assert step_loops["step_by_step"] > 0
    # The noise the forward drew, read back from its outputs: each step is h_t = tanh(a_t) r_t.
    cell, x = chain.cells[0], tf.constant(x)
    with tf.GradientTape() as reference:
        h, total = tf.zeros([B, 5], tf.float64), 0.0
        for t in range(T):
            clean = tf.tanh(x[:, t] @ cell.kernel + h @ cell.recurrent_kernel)
            h = clean * tf.stop_gradient(outputs[:, t] / clean)
            total += tf.reduce_sum(h)
    assert_all_close(grads, reference.gradient(total, chain.trainable_variables), 1e-10)


@needs_keras3
def test_under_one_plain_tape_the_call_stays_compiled():
    """Only tapes that may take a second derivative (persistent, nested) run the call op by op;
    one plain tape runs the compiled function, traced once."""
    chain = chain_of("gru")
    x, _ = data()
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(chain(x)[0])
        tape.gradient(loss, chain.trainable_variables)
    assert chain.trace_count == 1
    with tf.GradientTape(persistent=True) as tape:
        loss = tf.reduce_sum(chain(x)[0])
    assert chain.trace_count == 1
    assert_all_close(
        tape.gradient(loss, chain.trainable_variables),
        full_bptt(chain, x, x[..., :2], lambda y, p: tf.reduce_sum(p))[1],
        F64,
    )

"""Randomness replayed, not redrawn: what a chunk draws in the forward sweep it draws again in
its recompute, and Keras's dropout in GRU/LSTM/SimpleRNN cells keeps Keras's semantics (one
mask per sequence per call), against Keras's own RNN layer given the same masks."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close, make_sequence, needs_keras3

import tbptt

pytestmark = needs_keras3

B, T, F, U, K = 3, 11, 4, 5, 3


def _sum_of_outputs(y_true, y_pred):
    del y_true
    return tf.reduce_sum(y_pred)


class SeededNoise(keras.layers.Layer):
    """Adds keras.random noise drawn through a seed generator the layer holds."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(11)

    def call(self, x, training=False):
        noise = keras.random.normal(tf.shape(x), seed=self.seed_generator, dtype=x.dtype)
        return x + noise if training else x


class UnseededNoise(keras.layers.Layer):
    """Draws with a stateful tf.random op: nothing the chain holds can replay it."""

    def call(self, x, training=False):
        return x + tf.random.normal(tf.shape(x), dtype=x.dtype) if training else x


class NoisyStepCell(keras.layers.Layer):
    """A cell drawing keras.random noise at every step."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units, self.state_size = units, units
        self.seed_generator = keras.random.SeedGenerator(5)

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units))

    def call(self, x, states, training=False):
        h = tf.tanh(x @ self.kernel + states[0])
        if training:
            h = h + keras.random.normal(tf.shape(h), seed=self.seed_generator, dtype=h.dtype)
        return h, [h]


NOISE = {
    "Dropout": lambda: keras.layers.Dropout(0.4, dtype="float64"),
    "GaussianNoise": lambda: keras.layers.GaussianNoise(0.7, dtype="float64"),
    "keras.random": lambda: SeededNoise(dtype="float64"),
}


def _linear_chain(noise, **options):
    """Linear in the inputs layer's kernel W: with a summed loss, L(W) = <dL/dW, W> exactly,
    when (and only when) the chunks' recomputes draw what the forward sweep drew."""
    keras.utils.set_random_seed(4)
    inputs_layer = keras.Sequential([noise, keras.layers.Dense(U, use_bias=False, dtype="float64")])
    return tbptt.RecurrentChain(
        [keras.layers.SimpleRNNCell(U, activation=None, use_bias=False, dtype="float64")],
        inputs_layer=inputs_layer,
        head=keras.layers.Dense(1, use_bias=False, dtype="float64"),
        chunk_size=K,
        dtype="float64",
        reduction="sum",
        **options,
    )


def _run(context, fn):
    if context == "function":
        return tf.function(fn)()
    if context == "jit":
        return tf.function(fn, jit_compile=True)()
    return fn()


@pytest.mark.parametrize("context", ["eager", "function", "jit"])
@pytest.mark.parametrize("noise", list(NOISE))
@pytest.mark.default_cases("Dropout-eager")
def test_noise_in_the_inputs_layer_is_replayed_in_the_recompute(noise, context):
    chain = _linear_chain(NOISE[noise]())
    x = make_sequence(B, T, F, "float64")
    result = _run(
        context, lambda: chain.value_and_gradients(x, np.zeros([B, T, 1]), _sum_of_outputs)
    )
    kernel = chain.inputs_layer.layers[1].kernel
    index = [id(v) for v in chain.trainable_variables].index(id(kernel))
    euler = tf.reduce_sum(result.grads[index] * kernel)
    np.testing.assert_allclose(float(euler), float(result.loss), rtol=1e-10)
    # ... and the noise is noise: another call draws other numbers.
    again = _run(
        context, lambda: chain.value_and_gradients(x, np.zeros([B, T, 1]), _sum_of_outputs)
    )
    assert abs(float(again.loss) - float(result.loss)) > 1e-6


def test_each_chunk_draws_its_own_noise():
    """Chunks of equal inputs from equal states draw differently (the mask is not reused)."""
    keras.utils.set_random_seed(4)
    chain = tbptt.RecurrentChain(
        [keras.layers.SimpleRNNCell(U, dtype="float64")],
        inputs_layer=keras.layers.Dropout(0.5, dtype="float64"),
        chunk_size=K,
        dtype="float64",
    )
    x = np.ones([1, 2 * K, F])
    stream = tbptt.ChunkSource(lambda a, b: x[:, a:b], x.shape, "float64")
    outputs, _ = chain(stream, training=True)  # a source runs chunk by chunk
    first = chain.inputs_layer(np.ones([1, K, F]), training=False)
    assert not np.array_equal(outputs[:, :K], outputs[:, K:]) and first.shape == (1, K, F)


@pytest.mark.parametrize("part", ["inputs_layer", "head"])
@pytest.mark.default_cases("inputs_layer")
def test_draws_the_chain_cannot_replay_are_refused_where_chunks_are_recomputed(part):
    def make(**options):
        layers = {part: UnseededNoise(dtype="float64")}
        if part == "head":
            layers["head"] = keras.Sequential(
                [keras.layers.Dense(1, dtype="float64"), UnseededNoise(dtype="float64")]
            )
        return tbptt.RecurrentChain(
            [keras.layers.GRUCell(U, dtype="float64")],
            chunk_size=K,
            dtype="float64",
            **layers,
            **options,
        )

    x, y = make_sequence(B, T, F, "float64"), np.zeros([B, T, 1 if part == "head" else U])
    with pytest.raises(
        ValueError, match=f"the {part} draws random numbers that the chain cannot replay"
    ):
        make().value_and_gradients(x, y, _sum_of_outputs)
    truncated = make(mode="truncated")  # each chunk runs once: nothing to replay
    assert np.isfinite(truncated.value_and_gradients(x, y, _sum_of_outputs).loss)
    outputs, _ = make()(x, training=True)  # a plain forward pass takes them too
    assert outputs.shape[:2] == (B, T)


def test_a_cell_drawing_at_every_step_is_refused_where_chunks_are_recomputed():
    x, y = make_sequence(B, T, F, "float64"), np.zeros([B, T, U])

    def make(**options):
        return tbptt.RecurrentChain(
            [NoisyStepCell(U, dtype="float64")], chunk_size=K, dtype="float64", **options
        )

    with pytest.raises(ValueError, match=r"cells\[0\] \(NoisyStepCell\) draws random numbers"):
        make().value_and_gradients(x, y, _sum_of_outputs)
    with pytest.raises(ValueError, match="draws random numbers"):
        make(mode="truncated", backprop_chunks=2).stream_step(x[:, :9], y[:, :9], _sum_of_outputs)
    assert np.isfinite(make(mode="truncated").value_and_gradients(x, y, _sum_of_outputs).loss)


# -- Keras's dropout and recurrent_dropout in cells ------------------------------------------------

DROPOUT_CELLS = {
    "gru": lambda **kw: keras.layers.GRUCell(U, **kw),
    "gru_reset_before": lambda **kw: keras.layers.GRUCell(U, reset_after=False, **kw),
    "lstm": lambda **kw: keras.layers.LSTMCell(U, **kw),
    "simple_rnn": lambda **kw: keras.layers.SimpleRNNCell(U, **kw),
    "relu_gru": lambda **kw: keras.layers.GRUCell(U, activation="relu", **kw),
}
RATES = {
    "both": {"dropout": 0.3, "recurrent_dropout": 0.4},
    "inputs": {"dropout": 0.3},
    "recurrent": {"recurrent_dropout": 0.4},
    "implementation_1": {"dropout": 0.3, "implementation": 1},
}


def _keras_rnn_gradients(chain, x, y, loss_fn):
    """One tape over Keras's own RNN layers (one per cell) and the head, training=True: each
    RNN draws its cell's masks from the cell's seed generator before its loop."""
    variables = chain.trainable_variables
    with tf.GradientTape() as tape:
        h = tf.constant(x)
        for cell in chain.cells:
            h = keras.layers.RNN(cell, return_sequences=True, dtype="float64")(h, training=True)
        outputs = chain.head(h) if chain.head is not None else h
        loss = loss_fn(y, outputs)
    return loss, tape.gradient(loss, variables)


@pytest.mark.parametrize("rates", list(RATES))
@pytest.mark.parametrize("kind", list(DROPOUT_CELLS))
@pytest.mark.default_cases("gru-both")
def test_keras_cell_dropout_equals_keras_rnn_with_the_same_masks(kind, rates):
    if kind == "simple_rnn" and rates == "implementation_1":
        pytest.skip("SimpleRNNCell has one implementation")
    keras.utils.set_random_seed(6)
    cells = [
        DROPOUT_CELLS[kind](seed=21, dtype="float64", **RATES[rates]),
        DROPOUT_CELLS[kind](seed=22, dtype="float64", **RATES[rates]),
    ]
    chain = tbptt.RecurrentChain(
        cells, head=keras.layers.Dense(2, dtype="float64"), chunk_size=K, dtype="float64"
    )
    x, y = make_sequence(B, T, F, "float64"), make_sequence(B, T, 2, "float64", offset=0.5)

    def loss_fn(y_true, y_pred):
        return tf.reduce_sum(tf.square(y_true - y_pred))

    chain.build([None, None, F])
    seeds = [c.seed_generator.state.numpy() for c in cells]
    result = chain.value_and_gradients(x, y, loss_fn)
    for cell, seed in zip(cells, seeds):  # Keras draws the masks from the same seed states
        cell.seed_generator.state.assign(seed)
    loss, grads = _keras_rnn_gradients(chain, x, y, loss_fn)
    assert_all_close([result.loss] + result.grads, [loss] + grads, 1e-10, kind)
    no_dropout_loss = chain(x, training=False)  # and the masks did something
    assert not np.allclose(float(loss), float(loss_fn(y, no_dropout_loss[0])))


def test_a_dropout_gru_fits_like_keras_with_the_same_seed():
    """ChunkedModel.fit and Keras's own model.fit, the same GRU(dropout, recurrent_dropout)
    seeded alike: the same masks each step, so the same weights after three steps."""
    x = make_sequence(6, 12, F, "float64")
    y = make_sequence(6, 12, 2, "float64", offset=0.5)
    keras.utils.set_random_seed(9)
    reference = keras.Sequential(
        [
            keras.Input((None, F), dtype="float64"),
            keras.layers.GRU(
                U,
                dropout=0.2,
                recurrent_dropout=0.3,
                seed=31,
                return_sequences=True,
                dtype="float64",
            ),
            keras.layers.Dense(2, dtype="float64"),
        ]
    )
    chain = tbptt.RecurrentChain(
        [keras.layers.GRUCell(U, dropout=0.2, recurrent_dropout=0.3, seed=31, dtype="float64")],
        head=keras.layers.Dense(2, dtype="float64"),
        chunk_size=5,
        dtype="float64",
    )
    model = tbptt.keras.ChunkedModel(chain)
    model.build([None, None, F])
    for ours, theirs in zip(chain.trainable_variables, reference.trainable_variables):
        ours.assign(theirs)
    for m in (model, reference):
        m.compile(
            optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.MeanSquaredError(dtype="float64")
        )
    model.fit(x, y, batch_size=2, shuffle=False, verbose=0)
    reference.fit(x, y, batch_size=2, shuffle=False, verbose=0)
    assert_all_close(chain.trainable_variables, reference.trainable_variables, 1e-10)

"""`tbptt.keras.chunked(model)`: a user's Keras model trained with chunked gradients, against
the same model trained by Keras's own `fit` (compositions of every kind are drawn in
`test_differential.py`, `via="chunked"`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_sequence, needs_keras3, run_python

import tbptt

pytestmark = needs_keras3

B, T, F = 4, 9, 3
L = keras.layers
MSE = keras.losses.MeanSquaredError


# Real model shapes: (name, layers after the Input, ids as inputs).
SHAPES = {
    "gru_gru_dense": (
        lambda: [L.GRU(6, return_sequences=True), L.GRU(5, return_sequences=True), L.Dense(2)],
        False,
    ),
    "lstm_time_distributed": (
        lambda: [L.LSTM(5, return_sequences=True), L.TimeDistributed(L.Dense(2))],
        False,
    ),
    "simple_rnn_norm_dense": (
        lambda: [L.SimpleRNN(5, return_sequences=True), L.LayerNormalization(), L.Dense(2)],
        False,
    ),
    "dense_lstm_dropout_dense": (
        lambda: [
            L.Dense(4, activation="relu"),
            L.LSTM(5, return_sequences=True),
            L.Dropout(0.0),
            L.Dense(2),
        ],
        False,
    ),
    "rnn_of_a_cell": (
        lambda: [L.RNN(L.GRUCell(5, reset_after=False), return_sequences=True), L.Dense(2)],
        False,
    ),
    "rnn_of_stacked_cells": (
        lambda: [
            L.RNN(L.StackedRNNCells([L.LSTMCell(4), L.GRUCell(3)]), return_sequences=True),
            L.Dense(2),
        ],
        False,
    ),
    "embedding_gru_dense": (
        lambda: [L.Embedding(11, 4), L.GRU(5, return_sequences=True), L.Dense(2)],
        True,
    ),
    "embedding_mask_zero_lstm": (
        lambda: [L.Embedding(11, 4, mask_zero=True), L.LSTM(5, return_sequences=True), L.Dense(2)],
        True,
    ),
    "masking_gru_dense": (
        lambda: [L.Masking(0.0), L.GRU(5, return_sequences=True), L.Dense(2)],
        False,
    ),
    "gru_without_head": (lambda: [L.GRU(2, return_sequences=True)], False),
    "nested_sequential_head": (
        lambda: [
            L.GRU(5, return_sequences=True),
            keras.Sequential([L.Dense(4, activation="tanh"), L.Dense(2)]),
        ],
        False,
    ),
    "functional": (None, False),
}


def _model(shape: str, seed: int = 3):
    """The Keras model of `shape`, with the same weights for the same seed."""
    keras.utils.set_random_seed(seed)
    layers, ids = SHAPES[shape]
    inputs = keras.Input((None,), dtype="int32") if ids else keras.Input((None, F))
    if layers is None:  # functional: Input -> Dense -> GRU -> LSTM -> Dense
        h = L.Dense(4)(inputs)
        h = L.GRU(5, return_sequences=True)(h)
        h = L.LSTM(4, return_sequences=True)(h)
        return keras.Model(inputs, L.Dense(2)(h))
    return keras.Sequential([inputs] + layers())


def _data(shape: str):
    rng = np.random.default_rng(0)
    ids = SHAPES[shape][1]
    if ids:
        x = rng.integers(1, 11, size=[2 * B, T])
        x[:, -2:] = 0  # trailing padding where mask_zero is set
    else:
        x = make_sequence(2 * B, T, F)
        if shape.startswith("masking"):
            x[:, -2:] = 0.0
    return x, make_sequence(2 * B, T, 2, offset=0.5)


def _fit(model, x, y, optimizer: str):
    model.compile(optimizer=keras.optimizers.get(optimizer), loss="mse")
    model.fit(x, y, batch_size=B, shuffle=False, verbose=0)
    return [v.numpy() for v in model.trainable_variables]


def _close(got: list, want: list, tolerance: float):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.default_cases("sgd-embedding_mask_zero_lstm")
def test_a_converted_model_trains_step_for_step_as_keras_fits_it(shape, optimizer):
    x, y = _data(shape)
    expected = _fit(_model(shape), x, y, optimizer)
    original = _model(shape)
    whole = tbptt.keras.chunked(original, chunk_size=T)  # one chunk covers the sequence
    _close(_fit(whole, x, y, optimizer), expected, 2e-5)
    # The original model's own variables were trained.
    _close([v.numpy() for v in original.trainable_variables], expected, 2e-5)
    chunks = tbptt.keras.chunked(_model(shape), chunk_size=2)
    _close(_fit(chunks, x, y, optimizer), expected, 2e-5)


def test_the_converted_model_predicts_as_the_original():
    original = _model("embedding_mask_zero_lstm")
    x, _ = _data("embedding_mask_zero_lstm")
    converted = tbptt.keras.chunked(original, chunk_size=4)
    got = converted.predict(x, verbose=0)
    want = original.predict(x, verbose=0)
    np.testing.assert_allclose(got[:, :-2], want[:, :-2], rtol=1e-5, atol=1e-6)  # unmasked


def test_stateful_follows_the_recurrent_layers_and_carries_across_batches():
    keras.utils.set_random_seed(1)
    original = keras.Sequential(
        [
            keras.Input(batch_shape=(B, None, F)),
            L.GRU(5, return_sequences=True, stateful=True),
            L.Dense(2),
        ]
    )
    converted = tbptt.keras.chunked(original, chunk_size=3)
    assert converted.stateful
    assert not tbptt.keras.chunked(original, chunk_size=3, stateful=False).stateful
    x = make_sequence(B, 2 * T, F)
    first, second = original.predict(x[:, :T], verbose=0), original.predict(x[:, T:], verbose=0)
    original.layers[0].reset_states()
    got = converted.predict(np.concatenate([x[:, :T], x[:, T:]]), batch_size=B, verbose=0)
    np.testing.assert_allclose(got, np.concatenate([first, second]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a subprocess
def test_a_converted_model_saves_loads_in_a_new_process_and_exports(tmp_path):
    original = _model("embedding_mask_zero_lstm")
    x, y = _data("embedding_mask_zero_lstm")
    converted = tbptt.keras.chunked(original, chunk_size=4)
    converted.compile(optimizer="adam", loss="mse")
    converted.fit(x, y, batch_size=B, verbose=0)
    converted.save(tmp_path / "m.keras")
    converted.export(tmp_path / "served", verbose=False)
    np.save(tmp_path / "x.npy", x)
    run_python(
        "import sys, numpy as np, keras, tbptt, tensorflow as tf\n"
        "x = np.load(sys.argv[3])\n"
        "model = keras.models.load_model(sys.argv[1])\n"
        "served = tf.saved_model.load(sys.argv[2])\n"
        "np.save(sys.argv[4], model.predict(x, verbose=0))\n"
        "np.save(sys.argv[5], served.serve(x).numpy())\n",
        tmp_path / "m.keras",
        tmp_path / "served",
        tmp_path / "x.npy",
        tmp_path / "loaded.npy",
        tmp_path / "served.npy",
    )
    want = converted.predict(x, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "loaded.npy"), want, rtol=1e-6, atol=1e-7)
    # Served without the mask (the state runs through the padding): the unmasked steps agree.
    np.testing.assert_allclose(
        np.load(tmp_path / "served.npy")[:, :-2], want[:, :-2], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "layers, match",
    [
        (lambda: [L.Bidirectional(L.GRU(4, return_sequences=True))], "Bidirectional.*end"),
        (
            lambda: [L.Conv1D(4, 3, padding="same"), L.GRU(4, return_sequences=True)],
            "Conv1D.*mixes time steps",
        ),
        (
            lambda: [L.GRU(4, return_sequences=True), L.MultiHeadAttention(2, 2)],
            "MultiHeadAttention",
        ),
        (lambda: [L.GRU(4)], "return_sequences=False.*last_step_weights"),
        (lambda: [L.GRU(4, return_sequences=True, go_backwards=True)], "go_backwards"),
        (
            lambda: [
                L.GRU(4, return_sequences=True),
                L.Dropout(0.1),
                L.GRU(4, return_sequences=True),
            ],
            "between recurrent layers",
        ),
        (lambda: [L.Dense(3)], "no recurrent layer"),
        (
            lambda: [
                L.GRU(4, return_sequences=True, stateful=True),
                L.GRU(4, return_sequences=True),
            ],
            "disagree on stateful",
        ),
        (
            lambda: [L.GRU(4, return_sequences=True), L.GlobalAveragePooling1D()],
            "GlobalAveragePooling1D",
        ),
        (
            lambda: [
                L.GRU(4, return_sequences=True, activity_regularizer=keras.regularizers.L2(1.0))
            ],
            "activity_regularizer",
        ),
        (
            lambda: [L.SpatialDropout1D(0.2), L.GRU(4, return_sequences=True)],
            "one dropout mask for every step",
        ),
        (
            lambda: [L.Dropout(0.2, noise_shape=(None, 1, F)), L.GRU(4, return_sequences=True)],
            "one dropout mask for every step",
        ),
    ],
    ids=[
        "bidirectional",
        "conv1d",
        "attention",
        "many_to_one",
        "backwards",
        "between",
        "no_rnn",
        "stateful",
        "pooling",
        "activity",
        "spatial_dropout",
        "noise_shape",
    ],
)
@pytest.mark.default_cases("bidirectional", "conv1d", "many_to_one", "between", "activity")
def test_what_cannot_be_chunked_is_refused_by_name(layers, match):
    built = layers()
    shape = (B, None, F) if any(getattr(x, "stateful", False) for x in built) else None
    first = keras.Input(batch_shape=shape) if shape else keras.Input((None, F))
    if any(isinstance(x, L.MultiHeadAttention) for x in built):
        h = built[0](first)
        model = keras.Model(first, built[1](h, h))
    else:
        model = keras.Sequential([first] + built)
    with pytest.raises(ValueError, match=match):
        tbptt.keras.chunked(model, chunk_size=3)


def test_a_subclassed_model_or_a_branching_one_is_refused_with_the_way_out():
    class Mine(keras.Model):
        def __init__(self):
            super().__init__()
            self.gru = L.GRU(4, return_sequences=True)

        def call(self, x):
            return self.gru(x)

    with pytest.raises(ValueError, match="subclassed.*RecurrentChain"):
        tbptt.keras.chunked(Mine(), chunk_size=3)
    inputs = keras.Input((None, F))
    h = L.GRU(4, return_sequences=True)(inputs)
    branching = keras.Model(inputs, L.Add()([L.Dense(4)(h), h]))
    with pytest.raises(ValueError, match="chain of layers"):
        tbptt.keras.chunked(branching, chunk_size=3)


def test_chunked_is_in_the_public_api():
    assert "chunked" in tbptt.keras.__all__


def test_time_distributed_of_any_layer_runs_per_step_and_saves(tmp_path):
    """TimeDistributed(Conv2D) over frames [B, T, H, W, C]: each step's frame, as Keras."""
    keras.utils.set_random_seed(5)
    original = keras.Sequential(
        [
            keras.Input((None, 4, 4, 1)),
            L.TimeDistributed(L.Conv2D(2, 3)),
            L.TimeDistributed(L.Flatten()),
            L.GRU(3, return_sequences=True),
            L.TimeDistributed(L.Dense(2)),
        ]
    )
    x = make_sequence(2, 5, 16).reshape(2, 5, 4, 4, 1)
    converted = tbptt.keras.chunked(original, chunk_size=2)
    want = original.predict(x, verbose=0)
    np.testing.assert_allclose(converted.predict(x, verbose=0), want, rtol=1e-5, atol=1e-6)
    converted.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want, rtol=1e-5, atol=1e-6)


def test_an_embedding_model_with_adam_steps_as_keras_step_by_step_in_float64():
    """Keras's Adam on an Embedding's IndexedSlices (one row per lookup, each squared):
    the converted model's weights equal the original's after each of several steps."""

    def model():
        keras.utils.set_random_seed(11)
        return keras.Sequential(
            [
                keras.Input((None,), dtype="int32"),
                L.Embedding(7, 3, dtype="float64"),
                L.GRU(4, return_sequences=True, dtype="float64"),
                L.Dense(2, dtype="float64"),
            ]
        )

    rng = np.random.default_rng(3)
    x = rng.integers(0, 7, size=[4, 9])  # repeated ids: several rows for one table row
    y = rng.normal(size=[4, 9, 2])
    keras_model, converted = model(), tbptt.keras.chunked(model(), chunk_size=4)
    for m in (keras_model, converted):  # Keras computes a loss in float32 unless told
        m.compile(optimizer=keras.optimizers.Adam(0.05), loss=MSE(dtype="float64"))
    for step in range(5):
        keras_model.train_on_batch(x, y)
        converted.train_on_batch(x, y)
        for got, want in zip(converted.trainable_variables, keras_model.trainable_variables):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11, err_msg=f"step {step}")


def test_a_front_layer_that_drops_the_mask_drops_it_as_in_keras():
    """Keras drops a mask at a layer that does not support masking (a Lambda): the converted
    model computes the same loss as Keras's evaluate."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((None,), dtype="int32"),
            L.Embedding(11, 3, mask_zero=True),
            L.Lambda(lambda t: t * 2.0),
            L.GRU(4, return_sequences=True),
            L.Dense(2),
        ]
    )
    x, y = _data("embedding_mask_zero_lstm")
    model.compile(loss="mse")
    converted = tbptt.keras.chunked(model, chunk_size=4)
    converted.compile(loss="mse")
    want = model.evaluate(x, y, verbose=0)
    np.testing.assert_allclose(converted.evaluate(x, y, verbose=0), want, rtol=1e-5)


@pytest.mark.slow
def test_lora_embeddings_keep_dense_gradients_and_step_as_keras():
    keras.utils.set_random_seed(6)

    def model():
        keras.utils.set_random_seed(6)
        embedding = L.Embedding(11, 4)
        m = keras.Sequential(
            [
                keras.Input((None,), dtype="int32"),
                embedding,
                L.GRU(4, return_sequences=True),
                L.Dense(2),
            ]
        )
        embedding.enable_lora(2)
        return m

    x, y = _data("embedding_gru_dense")
    expected = _fit(model(), x, y, "adam")
    _close(_fit(tbptt.keras.chunked(model(), chunk_size=3), x, y, "adam"), expected, 2e-5)


@pytest.mark.slow
def test_dense_embedding_grads_on_request():
    model = tbptt.keras.chunked(_model("embedding_gru_dense"), chunk_size=3)
    chain = model.chain.with_config(embedding_grads="dense")
    x, y = _data("embedding_gru_dense")
    result = chain.value_and_gradients(x, y, MSE())
    assert not isinstance(result.grads[0], tf.IndexedSlices)
    sparse = model.chain.value_and_gradients(x, y, MSE()).grads[0]
    np.testing.assert_allclose(result.grads[0], tf.convert_to_tensor(sparse), atol=1e-7)

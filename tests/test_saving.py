"""Whole-model Keras saving: `.keras` files, weights files, ModelCheckpoint and fresh models."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_sequence, run_python

import tbptt

pytestmark = pytest.mark.skipif(
    int(keras.__version__.split(".")[0]) < 3, reason="ChunkedModel needs Keras 3"
)

B, T, F = 4, 12, 3


def _data(seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return rng.normal(size=[B, T, F]).astype(dtype), rng.normal(size=[B, T, 2]).astype(dtype)


def _model(stateful=False, dtype=None, mode="exact", backprop_chunks=1):
    chain = tbptt.RecurrentChain(
        [keras.layers.GRUCell(5, reset_after=False), keras.layers.LSTMCell(4)],
        head=keras.layers.Dense(2),
        chunk_size=4,
        mode=mode,
        backprop_chunks=backprop_chunks,
        dtype=dtype,
    )
    model = tbptt.keras.ChunkedModel(chain, stateful=stateful)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.MeanSquaredError(dtype=dtype),
        metrics=["mae"],
    )
    return model


def _trained(**kwargs):
    keras.utils.set_random_seed(1)
    model = _model(**kwargs)
    x, y = _data(dtype=kwargs.get("dtype") or "float32")
    model.fit(x, y, batch_size=2, shuffle=False, verbose=0)  # the optimizer has moments now
    return model, x, y


def _assert_same_next_step(model, other, x, y):
    """Predictions now, and weights and loss after one more step, equal bit for bit."""
    np.testing.assert_array_equal(model.predict(x, verbose=0), other.predict(x, verbose=0))
    first = model.fit(x, y, batch_size=2, shuffle=False, verbose=0).history["loss"]
    second = other.fit(x, y, batch_size=2, shuffle=False, verbose=0).history["loss"]
    assert first == second
    assert len(model.weights) == len(other.weights)
    for a, b in zip(model.weights, other.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


@pytest.mark.parametrize(
    "kwargs", [{}, {"stateful": True, "mode": "truncated", "backprop_chunks": 2}]
)
@pytest.mark.default_cases("kwargs0")
def test_keras_file_round_trip_predicts_and_trains_on_identically(tmp_path, kwargs):
    model, x, y = _trained(**kwargs)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: tbptt registers its classes
    assert type(loaded) is tbptt.keras.ChunkedModel and loaded.stateful == model.stateful
    assert loaded.chain.config == model.chain.config
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    _assert_same_next_step(model, loaded, x, y)


@pytest.mark.slow
def test_float64_model_stays_float64_through_a_keras_file(tmp_path):
    model, x, y = _trained(dtype="float64")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.chain.dtype == tf.float64
    assert {v.dtype for v in loaded.weights if "iteration" not in v.path} == {"float64"}
    _assert_same_next_step(model, loaded, x, y)


@pytest.mark.slow
def test_load_weights_into_a_fresh_model(tmp_path):
    model, x, y = _trained()
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    fresh = _model()  # not built: the feature size comes from the file
    assert not fresh.built
    fresh.load_weights(path)  # the optimizer's state too: the next step is the same
    _assert_same_next_step(model, fresh, x, y)
    fresh_from_keras_file = _model()
    model.save(tmp_path / "m.keras")
    fresh_from_keras_file.load_weights(tmp_path / "m.keras")
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), fresh_from_keras_file.predict(x, verbose=0)
    )


@pytest.mark.parametrize("name", ["best.keras", "best.weights.h5"])
@pytest.mark.default_cases("best.keras")
def test_model_checkpoint(tmp_path, name):
    model, x, y = _trained()
    path = str(tmp_path / name)
    checkpoint = keras.callbacks.ModelCheckpoint(path, save_weights_only=name.endswith(".h5"))
    model.fit(x, y, batch_size=2, shuffle=False, verbose=0, callbacks=[checkpoint])
    if name.endswith(".keras"):
        loaded = keras.models.load_model(path)
    else:
        loaded = _model()
        loaded.load_weights(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


def test_chain_configs_round_trip():
    head = keras.layers.Dense(3, activation="tanh")
    chain = tbptt.StatefulGRUChain(
        (6, 4),
        head=head,
        chunk_size="auto",
        mode="truncated",
        backprop_chunks=3,
        reduction="mean",
        dtype="float64",
        memory_budget=1e6,
        name="my_chain",
    )
    config = keras.saving.serialize_keras_object(chain)
    again = keras.saving.deserialize_keras_object(config)
    assert type(again) is tbptt.StatefulGRUChain and again.name == "my_chain"
    assert again.config == chain.config and again.units == (6, 4)
    assert again.head.get_config() == head.get_config() and again.head is not head


def test_a_head_that_is_not_a_keras_layer_cannot_be_saved_whole(tmp_path):
    chain = tbptt.StatefulGRUChain(4, head=lambda h: h * 2.0, chunk_size=3)
    with pytest.raises(TypeError, match="head is a Keras layer.*save_weights"):
        chain.get_config()


def test_load_weights_without_a_readable_feature_size_asks_for_build(tmp_path):
    model = _model()
    model.build([None, None, F])
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    other = tbptt.keras.ChunkedModel(
        tbptt.RecurrentChain(  # a cell the file does not hold
            [keras.layers.SimpleRNNCell(5)], chunk_size=4
        )
    )
    with pytest.raises(ValueError, match=r"model.build\(\[None, None, F\]\)"):
        other.load_weights(path)


def test_a_stage_chain_rebuilt_from_its_config_and_checkpoint_gives_the_same_gradients(tmp_path):
    keras.utils.set_random_seed(2)
    chain = tbptt.StageChain(
        [keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)],
        recompute=True,
        name="stages",
    )
    x, y = np.ones([3, 4], "float32"), np.zeros([3, 2], "float32")
    expected = chain.value_and_gradients(x, y, keras.losses.MeanSquaredError())
    path = tf.train.Checkpoint(chain=chain).write(str(tmp_path / "ckpt"))

    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(chain))
    assert type(again) is tbptt.StageChain and again.get_config() == chain.get_config()
    again(x)  # builds the stages' variables, so that the checkpoint restores into them
    tf.train.Checkpoint(chain=again).read(path).assert_consumed()
    result = again.value_and_gradients(x, y, keras.losses.MeanSquaredError())
    np.testing.assert_array_equal(result.loss, expected.loss)
    for a, b in zip(result.grads, expected.grads):
        np.testing.assert_array_equal(a, b)


def test_a_stage_that_is_not_a_keras_layer_has_no_config():
    chain = tbptt.StageChain([keras.layers.Dense(2), lambda a: a * 2.0])
    with pytest.raises(TypeError, match=r"stages\[1\] is .*tf.train.Checkpoint"):
        chain.get_config()


@pytest.mark.parametrize(
    "make",
    [
        lambda: tbptt.StatefulGRUChain(4, chunk_size=3),
        lambda: tbptt.RecurrentChain([keras.layers.LSTMCell(4)], chunk_size=3),
    ],
)
@pytest.mark.default_cases("<lambda>0")
def test_a_mixed_precision_chain_reloads_with_float32_weights(make):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        chain = make()
        again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(chain))
        x = np.ones([2, 5, 3], "float32")
        for c in (chain, again):
            outputs, _ = c(x)
            assert outputs.dtype == tf.float16
            assert {tf.as_dtype(v.dtype) for v in c.trainable_variables} == {tf.float32}
    finally:
        keras.mixed_precision.set_global_policy("float32")


# -- one variable order: the chain's, for the model and its optimizer ------------------------------


def _square_model():
    """Every variable [4, 4]: a slot restored onto another variable would load without a word."""
    chain = tbptt.RecurrentChain(
        [keras.layers.SimpleRNNCell(4, use_bias=False)],
        chunk_size=3,
        inputs_layer=keras.layers.Dense(4, use_bias=False),
        head=keras.layers.Dense(4, use_bias=False),
    )
    model = tbptt.keras.ChunkedModel(chain)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model


def test_the_model_and_its_optimizer_follow_the_chains_variable_order():
    model = _square_model()
    x = make_sequence(2, 7, 4)
    model.fit(x, x, verbose=0)
    chain_paths = [v.path for v in model.chain.trainable_variables]
    assert [v.path for v in model.trainable_variables] == chain_paths
    assert chain_paths[0].startswith("dense")  # the inputs layer first, as the chain runs it
    slots = [
        v.path.split("/", 1)[1] for v in model.optimizer.variables if v.path.endswith("_momentum")
    ]
    assert slots == [f"{p.replace('/', '_')}_momentum" for p in chain_paths]


@pytest.mark.slow  # a new interpreter importing TensorFlow: ~10 s
def test_adam_moments_return_to_their_variables_in_a_new_process(tmp_path):
    """Saved, loaded in another process and trained one more epoch, the model equals the one
    that went on training here (an inputs layer once put the moments on other variables)."""
    keras.utils.set_random_seed(3)
    model = _square_model()
    x = make_sequence(2, 7, 4)
    model.fit(x, x, epochs=2, verbose=0)
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", x)
    model.fit(x, x, verbose=0)
    code = (
        "import sys, numpy as np, keras, tbptt\n"
        "model = keras.models.load_model(sys.argv[1])\n"
        "x = np.load(sys.argv[2])\n"
        "model.fit(x, x, verbose=0)\n"
        "np.save(sys.argv[3], np.concatenate([v.numpy().ravel() "
        "for v in model.trainable_variables]))\n"
    )
    run_python(code, tmp_path / "m.keras", tmp_path / "x.npy", tmp_path / "w.npy")
    expected = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), expected, rtol=1e-6, atol=1e-7)


# -- models saved by earlier versions --------------------------------------------------------------

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize(
    "name,inputs,expected",
    [
        ("v0.1.0_gru_lstm.keras", "x", "gru_lstm"),
        ("v0.1.0_embedding_stateful.keras", "ids", "embedding"),
    ],
)
@pytest.mark.default_cases("v0.1.0_gru_lstm.keras-x-gru_lstm")
def test_models_saved_by_version_0_1_0_load_predict_and_train(name, inputs, expected):
    """Files written by tbptt 0.1.0 (tests/data/make_v0.1.0.py) load with their optimizer."""
    saved = np.load(DATA / "v0.1.0_expected.npz")
    model = keras.models.load_model(DATA / name)
    outputs = model.chain(saved[inputs])[0]
    np.testing.assert_allclose(outputs, saved[expected], rtol=1e-5, atol=1e-6)
    assert model.optimizer.iterations.numpy() > 0
    targets = saved["y"] if inputs == "x" else saved["labels"]
    model.fit(saved[inputs], targets, batch_size=2, shuffle=False, verbose=0)


@pytest.mark.parametrize(
    "inputs_layer,inputs",
    [
        (lambda: keras.layers.Dense(3), lambda: make_sequence(2, 6, 5)),
        (lambda: keras.layers.Embedding(7, 3), lambda: np.arange(12).reshape(2, 6) % 7),
    ],
)
@pytest.mark.default_cases("<lambda>-<lambda>0")
def test_weights_load_into_a_fresh_model_with_an_inputs_layer(tmp_path, inputs_layer, inputs):
    def make():
        return tbptt.keras.ChunkedModel(
            tbptt.RecurrentChain(
                [keras.layers.GRUCell(4)],
                chunk_size=3,
                inputs_layer=inputs_layer(),
                head=keras.layers.Dense(2),
            )
        )

    model, x = make(), inputs()
    model.predict(x, verbose=0)
    model.save_weights(tmp_path / "w.weights.h5")
    fresh = make()  # unbuilt: the inputs' shape comes from the file
    fresh.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), model.predict(x, verbose=0))

"""tbptt.keras.ChunkedModel: fit == SGD on the chain's gradients, streaming, flags, precision."""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from references import forward, full_bptt, truncated_reference

import tbptt

pytestmark = pytest.mark.skipif(
    int(keras.__version__.split(".")[0]) < 3, reason="ChunkedModel needs Keras 3"
)

B, T, F, O, K = 4, 12, 3, 2, 4


def _data(batch=B, steps=T, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=[batch, steps, F]).astype("float32")
    y = rng.normal(size=[batch, steps, O]).astype("float32")
    return x, y


def _chain(**kwargs):
    keras.utils.set_random_seed(1)
    kwargs.setdefault("chunk_size", K)
    chain = tbptt.StatefulGRUChain((5,), head=keras.layers.Dense(O), **kwargs)
    chain.build([None, None, F])
    return chain


def _twin(chain, **kwargs):
    """A chain of the same architecture holding the same weights."""
    twin = _chain(**kwargs)
    for v, w in zip(twin.trainable_variables, chain.trainable_variables):
        v.assign(w)
    return twin


def _weights(chain):
    return [v.numpy() for v in chain.trainable_variables]


def _assert_close(got, want, tol=1e-5):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


def _mse_sum(y_true, y_pred, sample_weight=None):
    values = tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)
    if sample_weight is not None:
        values *= sample_weight
    return tf.reduce_sum(values)


def _mse_reference(chain, x, y, mode, reduction):
    """The loss and gradient of the whole batch from references that do not run the library:
    one tape over Keras's RNN (exact), per-chunk tapes cut by stop_gradient (truncated)."""
    scale = 1.0 if reduction == "sum" else 1.0 / (x.shape[0] * x.shape[1])

    def mse(y_true, y_pred):
        return scale * tf.reduce_sum(tf.reduce_mean(tf.square(y_true - y_pred), axis=-1))

    state = chain.initial_state(x.shape[0])
    if mode == "exact":
        loss, grads, _, _ = full_bptt(chain, x, y, mse, state)
    else:
        loss, grads, _ = truncated_reference(chain, x, y, mse, 1, state)
    return loss, grads


@pytest.mark.parametrize("mode", ["exact", "truncated"])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
@pytest.mark.default_cases("sum_over_batch_size-exact")
def test_one_fit_step_is_sgd_on_the_reference_gradient(mode, reduction):
    x, y = _data()
    chain = _chain(mode=mode)
    ref = _twin(chain, mode=mode)
    model = tbptt.keras.ChunkedModel(chain)
    loss = keras.losses.MeanSquaredError(reduction=reduction)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    ref_loss, ref_grads = _mse_reference(ref, x, y, mode, reduction)
    history = model.fit(x, y, batch_size=B, shuffle=False, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], float(ref_loss), rtol=1e-6)
    _assert_close(
        _weights(chain),
        [w.numpy() - 0.1 * g.numpy() for w, g in zip(ref.trainable_variables, ref_grads)],
    )


def test_mean_loss_is_the_whole_sequence_mean_with_ragged_last_chunk():
    x, y = _data(steps=11)  # chunks 4, 4, 3
    model = tbptt.keras.ChunkedModel(_chain())
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    outputs, _ = model.chain(x)
    want = float(tf.reduce_mean(tf.square(outputs - y)))
    got = model.fit(x, y, batch_size=B, verbose=0).history["loss"][0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0), want, rtol=1e-6)


def test_fit_with_metrics_validation_sample_weight_callbacks_and_tensorboard(tmp_path):
    x, y = _data(batch=8)
    weight = np.ones([8, T], "float32")
    weight[:, :3] = 0.0
    model = tbptt.keras.ChunkedModel(_chain())
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    batches = []
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: batches.append(dict(logs))
    )
    history = model.fit(
        x,
        y,
        sample_weight=weight,
        batch_size=4,
        epochs=2,
        verbose=0,
        validation_data=_data(batch=4, seed=1),
        callbacks=[callback, keras.callbacks.TensorBoard(str(tmp_path))],
    )
    assert set(history.history) == {"loss", "mae", "val_loss", "val_mae"}
    assert len(batches) == 4 and all(np.isfinite(b["loss"]) for b in batches)
    assert any(name.startswith("events") for _, _, files in os.walk(tmp_path) for name in files)
    predictions = model.predict(x, batch_size=4, verbose=0)
    np.testing.assert_allclose(predictions, model.chain(x)[0], rtol=1e-5, atol=1e-6)
    # Sample weights reach the loss: zero weight on the first steps leaves them out.
    probe = tbptt.keras.ChunkedModel(_twin(model.chain))
    probe.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    outputs = probe.chain(x)[0]
    want = float(tf.reduce_sum(tf.reduce_mean(tf.square(outputs - y), -1) * weight)) / (8 * T)
    got = probe.fit(x, y, sample_weight=weight, batch_size=8, verbose=0).history["loss"][0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_weights_save_and_load(tmp_path):
    x, y = _data()
    model = tbptt.keras.ChunkedModel(_chain())
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=B, verbose=0)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    keras.utils.set_random_seed(7)
    other = tbptt.keras.ChunkedModel(
        tbptt.StatefulGRUChain((5,), head=keras.layers.Dense(O), chunk_size=K)
    )
    other.build([None, None, F])
    other.load_weights(path)
    np.testing.assert_allclose(other.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def _stream_batches(count=3, seed=0):
    return [_data(seed=seed + n) for n in range(count)]


def test_stateful_exact_carries_the_final_state_into_the_next_batch():
    batches = _stream_batches()
    chain = _chain()
    ref = _twin(chain, reduction="mean")
    model = tbptt.keras.ChunkedModel(chain, stateful=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    dataset = tf.data.Dataset.from_tensor_slices(tuple(np.stack(p) for p in zip(*batches)))
    model.fit(dataset, epochs=1, verbose=0)
    state = ref.initial_state(B)
    for x, y in batches:  # one tape over Keras's RNN per batch, from the carried state

        def mse(y_true, y_pred):
            return tf.reduce_mean(tf.square(y_true - y_pred))

        _, grads, final_state, _ = full_bptt(ref, x, y, mse, state)
        for v, g in zip(ref.trainable_variables, grads):
            v.assign_sub(0.1 * g)
        state = final_state
    _assert_close(_weights(chain), _weights(ref))
    _assert_close(tf.nest.flatten(model.carried_state), tf.nest.flatten(state))
    assert model.stream_position == (0, 3)


def _truncated_stream_reference(chain, batches, lr, m):
    """TBPTT(K, mK) over the stream, written out: each chunk's loss back-propagates through it
    and the m-1 chunks before it (into the previous batch), from a stop_gradient state."""
    kept_state, context_x = None, None
    for x, y in batches:
        steps = x.shape[1]
        full_x = x if context_x is None else np.concatenate([context_x, x], axis=1)
        skip = full_x.shape[1] - steps
        starts, state = [], kept_state or chain.initial_state(x.shape[0])
        for k in range(0, full_x.shape[1], K):  # states entering each chunk, current weights
            starts.append(state)
            _, state = forward(chain, full_x[:, k : k + K], state)
        grads = [tf.zeros_like(v) for v in chain.trainable_variables]
        for index in range(skip // K, len(starts)):
            first = max(index - (m - 1), 0)
            with tf.GradientTape() as tape:
                state = tf.nest.map_structure(tf.stop_gradient, starts[first])
                for j in range(first, index + 1):
                    outputs, state = forward(chain, full_x[:, j * K : (j + 1) * K], state)
                target = y[:, index * K - skip : (index + 1) * K - skip]
                loss = tf.reduce_mean(tf.square(outputs - target)) * target.shape[1] / steps
            grads = [g + d for g, d in zip(grads, tape.gradient(loss, chain.trainable_variables))]
        for v, g in zip(chain.trainable_variables, grads):
            v.assign_sub(lr * g)
        kept_state = starts[max(len(starts) - (m - 1), 0)]
        context_x = full_x[:, max(len(starts) - (m - 1), 0) * K :]
    return chain


# Keras's compile contexts: jit_compile=True is what "auto" resolves to on a GPU; the skipped
# seed sets of the kept context are branches inside the compiled train step.
@pytest.mark.parametrize(
    "compiled",
    [
        {},
        pytest.param({"jit_compile": True}, marks=pytest.mark.slow),
        pytest.param({"run_eagerly": True}, marks=pytest.mark.slow),
    ],
    ids=["default", "jit", "run_eagerly"],
)
@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.default_cases("2-default")
def test_stateful_truncated_gradient_reaches_into_the_previous_batch(m, compiled):
    batches = _stream_batches(count=4)
    chain = _chain(mode="truncated", backprop_chunks=m)
    ref = _truncated_stream_reference(_twin(chain), batches, lr=0.2, m=m)
    model = tbptt.keras.ChunkedModel(chain, stateful=True)
    model.compile(optimizer=keras.optimizers.SGD(0.2), loss="mse", **compiled)
    dataset = tf.data.Dataset.from_tensor_slices(tuple(np.stack(p) for p in zip(*batches)))
    model.fit(dataset, epochs=1, verbose=0)
    _assert_close(_weights(chain), _weights(ref))
    # The cut matters: without the carried context the weights come out different.
    plain = _twin(_chain(mode="truncated", backprop_chunks=m))
    for v, w in zip(plain.trainable_variables, _weights(_chain())):
        v.assign(w)
    cold = tbptt.keras.ChunkedModel(plain, stateful=False)
    cold.compile(optimizer=keras.optimizers.SGD(0.2), loss="mse")
    cold.fit(dataset, epochs=1, verbose=0)
    assert max(np.abs(a - b).max() for a, b in zip(_weights(plain), _weights(chain))) > 1e-4


def test_stateful_window_must_be_whole_chunks_when_the_context_is_carried():
    model = tbptt.keras.ChunkedModel(_chain(mode="truncated", backprop_chunks=2), stateful=True)
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data(steps=10)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        model.fit(x, y, batch_size=B, verbose=0)
    model.fit(*_data(), batch_size=B, verbose=0)  # still usable


def test_reset_state_epoch_reset_and_batch_size_change():
    x, y = _data(batch=6)
    model = tbptt.keras.ChunkedModel(_chain(), stateful=True)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    assert model.carried_state is None
    with pytest.warns(UserWarning, match="carried state is reset"):
        model.fit(x, y, batch_size=4, verbose=0)  # batches of 4 then 2
    assert model.carried_state[0].shape == (2, 5)
    # lr = 0: the carried state after an epoch is the chain's state over the last batch alone
    # (the epoch start and the size change both reset it).
    _assert_close(tf.nest.flatten(model.carried_state), tf.nest.flatten(model.chain(x[4:])[1]))
    model.reset_state()
    assert model.carried_state is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x[:4], y[:4], batch_size=4, epochs=2, verbose=0)
    _assert_close(tf.nest.flatten(model.carried_state), tf.nest.flatten(model.chain(x[:4])[1]))


def test_reset_and_mask_in_fit_data_equal_separate_sequences():
    x, y = _data(steps=8)
    reset = np.zeros([B, 8], bool)
    reset[1, 5] = True
    mask = np.ones([B, 8], bool)
    mask[2, 6:] = False
    chain = _chain(mode="exact")
    ref = _twin(chain, reduction="sum")
    model = tbptt.keras.ChunkedModel(chain)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit({"inputs": x, "reset": reset, "mask": mask}, y, batch_size=B, verbose=0)
    pieces = [(0, 0, 8), (1, 0, 5), (1, 5, 8), (2, 0, 6), (3, 0, 8)]
    with tf.GradientTape() as tape:
        total = 0.0
        for row, start, stop in pieces:
            outputs, _ = ref(x[row : row + 1, start:stop])
            total += _mse_sum(y[row : row + 1, start:stop], outputs)
        loss = total / float(mask.sum())
    grads = tape.gradient(loss, ref.trainable_variables)
    _assert_close(
        _weights(chain),
        [w.numpy() - 0.1 * g.numpy() for w, g in zip(ref.trainable_variables, grads)],
    )


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.default_cases("mixed_float16")
def test_mixed_precision_keeps_float32_state_and_gradients_close_to_float32(policy):
    x, y = _data(batch=8, steps=16)
    full = _chain()
    want = full_bptt(full, x, y, lambda a, b: tf.reduce_mean(tf.square(a - b)))[1]
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        chain = _chain()
        for v, w in zip(chain.trainable_variables, full.trainable_variables):
            v.assign(w)
        assert chain.dtype == tf.as_dtype(policy.split("_")[1])
        assert chain.state_dtype == tf.float32
        got = chain.value_and_gradients(
            x, y, keras.losses.MeanSquaredError(), final_state_grad=None
        )
        assert all(g.dtype == tf.float32 for g in got.grads)
        assert all(s.dtype == tf.float32 for s in tf.nest.flatten(got.final_state))
        assert all(s.dtype == tf.float32 for s in tf.nest.flatten(got.initial_state_grad))
        tol = 2e-2 if policy == "mixed_float16" else 8e-2
        for g, w in zip(got.grads, want):
            assert np.linalg.norm(g - w) <= tol * np.linalg.norm(w) + 1e-4
        model = tbptt.keras.ChunkedModel(chain, stateful=True)
        optimizer = keras.optimizers.SGD(0.05)
        if policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, loss="mse")
        history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        assert history.history["loss"][1] < history.history["loss"][0]
        assert model.carried_state[0].dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_bad_arguments_are_refused_with_clear_errors():
    with pytest.raises(TypeError, match="chain must be a tbptt.RecurrentChain"):
        tbptt.keras.ChunkedModel(keras.layers.GRU(3))
    with pytest.raises(ValueError, match="fixed int chunk_size"):
        tbptt.keras.ChunkedModel(
            tbptt.StatefulGRUChain(3, chunk_size="auto", mode="truncated", backprop_chunks=2),
            stateful=True,
        )
    model = tbptt.keras.ChunkedModel(_chain())
    with pytest.raises(ValueError, match="reduction"):
        model.compile(optimizer="sgd", loss=keras.losses.MeanSquaredError(reduction=None))
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data()
    with pytest.raises(ValueError, match="'inputs'"):
        model.fit({"features": x}, y, batch_size=B, verbose=0)
    with pytest.raises(ValueError, match="reset must have shape"):
        model.fit({"inputs": x, "reset": np.zeros([B, T, 1], bool)}, y, batch_size=B, verbose=0)
    model.fit(x, y, batch_size=B, verbose=0)  # still usable


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 5])
@pytest.mark.default_cases("1-sum_over_batch_size")
def test_float64_fit_stays_float64(chunks, reduction):
    """One float64 fit step equals SGD on value_and_gradients to float64 rounding, whatever the
    chunks' shares of the mean (a float32 cast anywhere shows up as ~1e-8)."""
    x, y = (a.astype("float64") for a in _data(steps=chunks * K))
    chain = _chain(dtype="float64")
    ref = _twin(chain, dtype="float64")
    model = tbptt.keras.ChunkedModel(chain)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.MeanSquaredError(reduction=reduction)
    )  # float32 as given
    ref_loss, ref_grads = _mse_reference(ref, x, y, "exact", reduction)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(B)
    history = model.fit(data, verbose=0)
    assert ref_loss.dtype == tf.float64
    np.testing.assert_allclose(history.history["loss"][0], float(ref_loss), rtol=1e-12)
    lr = float(model.optimizer.learning_rate.numpy())  # Keras keeps it in float32: 0.1 + 1e-9
    _assert_close(
        _weights(chain),
        [w.numpy() - lr * g.numpy() for w, g in zip(ref.trainable_variables, ref_grads)],
        tol=1e-12,
    )


def test_metrics_with_a_mask_count_the_real_steps_as_keras_does():
    """Keras hands a masked model's loss and metrics the mask with the predictions: both are
    means over the real steps. Compared with a plain Keras model (Masking, GRU, Dense)."""
    x, y = _data()
    mask = np.ones([B, T], bool)
    mask[:, 8:] = False
    mask[1, 5:] = False
    x = np.where(mask[..., None], x, 0.0).astype("float32")
    chain = _chain()
    model = tbptt.keras.ChunkedModel(chain)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", metrics=["mae"])
    plain = keras.Sequential(
        [
            keras.Input((None, F)),
            keras.layers.Masking(0.0),
            keras.layers.GRU(5, return_sequences=True),
            keras.layers.Dense(O),
        ]
    )
    for target, source in zip(plain.trainable_variables, chain.trainable_variables):
        target.assign(source)
    plain.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", metrics=["mae"])
    ours = model.fit({"inputs": x, "mask": mask}, y, batch_size=B, verbose=0).history
    theirs = plain.fit(x, y, batch_size=B, verbose=0).history
    for name in ("loss", "mae"):
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, err_msg=name)
    ours = model.evaluate({"inputs": x, "mask": mask}, y, verbose=0, return_dict=True)
    theirs = plain.evaluate(x, y, verbose=0, return_dict=True)
    for name in ("loss", "mae"):
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, err_msg=name)


MIXED_SCRIPT = """
import sys
import keras, numpy as np, tbptt
model = keras.models.load_model(sys.argv[1])
assert model.chain.head.dtype_policy.name == "float32", model.chain.head.dtype_policy.name
print(np.abs(model.predict(np.load(sys.argv[2]), verbose=0) - np.load(sys.argv[3])).max())
"""


@pytest.mark.slow
def test_a_float32_head_under_mixed_precision_stays_float32_and_loads_elsewhere(tmp_path):
    """Keras's advice, an output layer in float32 under mixed_float16: the chain keeps it so,
    and the saved model loads in a process that uses float32 (a subprocess)."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        chain = tbptt.StatefulGRUChain(4, head=keras.layers.Dense(2, dtype="float32"), chunk_size=K)
        model = tbptt.keras.ChunkedModel(chain)
        model.compile(optimizer="sgd", loss="mse")
        x, y = _data()
        model.fit(x, y, batch_size=B, verbose=0)
        assert chain.head.dtype_policy.name == "float32"
        assert chain(x)[0].dtype == tf.float32 and chain.cells[0].compute_dtype == "float16"
        model.save(tmp_path / "m.keras")
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "p.npy", model.predict(x, verbose=0))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    script = tmp_path / "load.py"
    script.write_text(MIXED_SCRIPT)
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "m.keras"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "p.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-2  # float16 cells there, float32 here


# -- after training: stateful evaluate and predict, the Keras names ----------------------------


def _windows(x, y, window):
    """Consecutive windows of the same B streams, batch j continuing batch j - 1."""
    starts = range(0, x.shape[1], window)
    return tf.data.Dataset.from_tensor_slices(
        (
            np.stack([x[:, s : s + window] for s in starts]),
            np.stack([y[:, s : s + window] for s in starts]),
        )
    )


def test_stateful_evaluate_and_predict_carry_the_state_across_the_windows():
    """evaluate = the loss of one call over the whole stream with the state carried, equal to
    Keras's own stateful GRU; predict = that call's outputs; the training carry is left
    alone; a non-stateful model starts each window from zeros."""
    x, y = _data(steps=3 * T)
    chain = _chain()
    model = tbptt.keras.ChunkedModel(chain, stateful=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", metrics=["mae"])
    model.fit(x[:, :T], y[:, :T], batch_size=B, shuffle=False, verbose=0)
    carried = model.carried_state
    data = _windows(x, y, T)
    whole, _ = forward(chain, x)  # Keras's RNN over the whole stream
    got = model.evaluate(data, verbose=0, return_dict=True)
    np.testing.assert_allclose(got["loss"], float(tf.reduce_mean(tf.square(whole - y))), rtol=1e-5)
    np.testing.assert_allclose(got["mae"], float(tf.reduce_mean(tf.abs(whole - y))), rtol=1e-5)
    plain = keras.Sequential(
        [
            keras.Input((T, F), batch_size=B),
            keras.layers.GRU(5, return_sequences=True, stateful=True),
            keras.layers.Dense(O),
        ]
    )
    for v, w in zip(plain.trainable_variables, chain.trainable_variables):
        v.assign(w)
    plain.compile(loss="mse")
    np.testing.assert_allclose(got["loss"], plain.evaluate(data, verbose=0), rtol=1e-5)
    predicted = model.predict(data.map(lambda a, b: a), verbose=0)
    joined = np.concatenate([predicted[k * B : (k + 1) * B] for k in range(3)], axis=1)
    _assert_close([joined], [whole.numpy()])
    again = model.evaluate(data, verbose=0, return_dict=True)  # each call from zeros
    np.testing.assert_allclose(again["loss"], got["loss"], rtol=1e-6)
    _assert_close(tf.nest.flatten(model.carried_state), tf.nest.flatten(carried), tol=0.0)
    cold = tbptt.keras.ChunkedModel(chain)
    cold.compile(loss="mse")
    cold_loss = cold.evaluate(data, verbose=0)
    assert abs(cold_loss - got["loss"]) > 1e-4  # the carried state is what is measured


def test_a_stateful_fit_validates_on_the_held_out_stream_with_its_state_carried():
    x, y = _data(steps=2 * T, seed=3)
    held_x, held_y = _data(steps=2 * T, seed=4)
    chain = _chain()
    model = tbptt.keras.ChunkedModel(chain, stateful=True)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    history = model.fit(
        _windows(x, y, T), validation_data=_windows(held_x, held_y, T), epochs=1, verbose=0
    )
    whole, _ = forward(chain, held_x)
    np.testing.assert_allclose(
        history.history["val_loss"][0], float(tf.reduce_mean(tf.square(whole - held_y))), rtol=1e-5
    )


def test_predict_from_a_given_state_and_the_keras_names():
    x, _ = _data(steps=2 * T)
    chain = _chain()
    model = tbptt.keras.ChunkedModel(chain, stateful=True)
    _, state = forward(chain, x[:, :T])
    got = model.predict(x[:, T:], batch_size=B, initial_state=state, verbose=0)
    _assert_close([got], [forward(chain, x[:, T:], state)[0].numpy()])
    model.reset_states()  # Keras's name
    assert model.carried_state is None
    with pytest.raises(TypeError, match="outputs, state = model.chain"):
        model.predict(x, return_state=True, verbose=0)
    # Without stateful, initial_state starts one call over all the rows (one long series).
    again = tbptt.keras.ChunkedModel(chain).predict(x[:, T:], initial_state=state, verbose=0)
    _assert_close([again], [forward(chain, x[:, T:], state)[0].numpy()])
    # A call does not continue the one before (Keras's stateful layers would).
    first = model.predict(x[:, :T], batch_size=B, verbose=0)
    np.testing.assert_array_equal(model.predict(x[:, :T], batch_size=B, verbose=0), first)


class _ScaledMSE(keras.losses.Loss):
    """A loss with a setting its config does not hold (remade from `get_config`, it would
    lose it)."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, y_true, y_pred):
        return self.scale * tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)


def _keras_gru_model(chain, dtype):
    """The chain as a plain Keras model holding the same weights."""
    model = keras.Sequential(
        [
            keras.Input((None, F), dtype=dtype),
            keras.layers.GRU(5, return_sequences=True, dtype=dtype),
            keras.layers.Dense(O, dtype=dtype),
        ]
    )
    for v, w in zip(model.trainable_variables, chain.trainable_variables):
        v.assign(w)
    return model


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda dtype: keras.losses.Huber(delta=0.1, dtype=dtype),
        lambda dtype: _ScaledMSE(3.0, dtype=dtype),
        lambda dtype: keras.losses.LogCosh(reduction="sum", dtype=dtype),
    ],
)
@pytest.mark.default_cases("<lambda>0")
def test_a_float64_model_trains_with_its_loss_as_given(make_loss):
    """The compiled loss object itself, every setting kept, computed in float64: the same fit
    as Keras's own model given that loss in float64."""
    x, y = (a.astype("float64") for a in _data())
    chain = _chain(dtype="float64")
    reference = _keras_gru_model(chain, "float64")
    model = tbptt.keras.ChunkedModel(chain)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss(None))  # float32
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss=make_loss("float64"))
    ours = model.fit(x, y, batch_size=B, verbose=0).history["loss"]
    theirs = reference.fit(x, y, batch_size=B, verbose=0).history["loss"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-7)  # Keras logs its own in float32
    _assert_close(_weights(chain), [v.numpy() for v in reference.trainable_variables], 1e-10)


def test_a_float32_chain_under_a_mixed_policy_computes_in_float32():
    """dtype="float32" given under mixed_float16: cells and head made under the mixed policy
    follow the chain (they computed float16 before, and the first matmul failed)."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        chain = tbptt.RecurrentChain(
            [keras.layers.GRUCell(4)], head=keras.layers.Dense(2), chunk_size=3, dtype="float32"
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x, y = _data()
    outputs, _ = chain(x)
    assert outputs.dtype == tf.float32
    result = chain.value_and_gradients(x, y, keras.losses.MeanSquaredError())
    expected = full_bptt(chain, x, y, lambda a, b: tf.reduce_mean(tf.square(a - b)))
    _assert_close([result.loss] + result.grads, [expected[0]] + list(expected[1]))


def test_a_dynamic_loss_scale_is_read_at_every_step_as_keras_reads_it():
    """LossScaleOptimizer whose scale doubles every step: each step's chunk losses and logged
    loss use that step's scale (an unbuilt optimizer once froze its initial scale into the
    trace, and the loss was logged with the scale after the update)."""
    x, y = _data()
    chain = _chain()
    reference = _keras_gru_model(chain, "float32")
    model = tbptt.keras.ChunkedModel(chain)
    for m in (model, reference):
        m.compile(
            optimizer=keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(0.1), initial_scale=2.0**10, dynamic_growth_steps=1
            ),
            loss="mse",
        )
    ours = model.fit(x, y, batch_size=2, shuffle=False, verbose=0).history["loss"]
    theirs = reference.fit(x, y, batch_size=2, shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert float(model.optimizer.scale_loss(1.0)) == 2.0**12
    _assert_close(_weights(chain), [v.numpy() for v in reference.trainable_variables], 1e-5)


def test_mixed_float16_sums_weight_gradients_in_float32_and_trains_like_keras():
    """Under mixed_float16 the weights are kept in float32 and their gradients summed so, as a
    Keras layer's are: summed in float16 over B*K rows they overflowed at the default loss
    scale (32768), every step was skipped, and the model never trained."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        rng = np.random.default_rng(6)
        x = rng.normal(size=(4, 10, 3)).astype("float32")
        y = rng.normal(size=(4, 10, 2)).astype("float32")
        keras.utils.set_random_seed(8)
        cell, head = (
            keras.layers.SimpleRNNCell(5, activation="relu"),
            keras.layers.Dense(2, dtype="float32"),
        )
        model = tbptt.keras.ChunkedModel(tbptt.RecurrentChain([cell], chunk_size=3, head=head))
        model.build([None, None, 3])
        twin_cell = keras.layers.SimpleRNNCell(5, activation="relu")
        reference = keras.Sequential(
            [
                keras.Input((10, 3)),
                keras.layers.RNN(twin_cell, return_sequences=True),
                keras.layers.Dense(2, dtype="float32"),
            ]
        )
        for v, w in zip(reference.trainable_variables, model.trainable_variables):
            v.assign(w)
        for m in (model, reference):
            m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        ours = model.fit(x, y, epochs=3, verbose=0).history["loss"]
        theirs = reference.fit(x, y, epochs=3, verbose=0).history["loss"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    np.testing.assert_allclose(ours, theirs, rtol=2e-3)
    assert ours[-1] < 0.5 * ours[0]

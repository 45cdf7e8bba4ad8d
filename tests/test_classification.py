"""One label per sequence over chunks (many-to-one) against a one-tape Keras model."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close

import tbptt

B, T, F, C, K = 4, 12, 3, 3, 5


last_step_weights = tbptt.data.last_step_weights


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.default_cases("False")
def test_a_label_per_sequence_equals_keras_on_the_last_step(ragged):
    rng = np.random.default_rng(0)
    x = rng.normal(size=[B, T, F]).astype("float32")
    labels = rng.integers(0, C, size=[B])
    lengths = [T, 7, 10, 3] if ragged else [T] * B
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    x = x * mask[..., None]
    keras.utils.set_random_seed(5)
    chain = tbptt.StatefulGRUChain(6, head=keras.layers.Dense(C), chunk_size=K)
    # The label at every step; only the last real step weighs.
    targets = np.repeat(labels[:, None], T, axis=1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    result = chain.value_and_gradients(
        x, targets, loss_fn, mask=mask, sample_weight=last_step_weights(lengths, T)
    )

    # The reference: Keras's GRU over each sequence to its last real step, one tape.
    gru, dense = keras.layers.GRU(6), keras.layers.Dense(C)
    gru(x[:, :1]), dense(tf.zeros([1, 6]))
    for v, w in zip(gru.trainable_variables + dense.trainable_variables, chain.trainable_variables):
        v.assign(w)
    with tf.GradientTape() as tape:
        logits = dense(gru(x, mask=mask))  # the state stops at each sequence's end
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    grads = tape.gradient(loss, gru.trainable_variables + dense.trainable_variables)
    np.testing.assert_allclose(float(result.loss) / B, float(loss), rtol=1e-5)
    assert_all_close([g / B for g in result.grads], grads, 2e-5)


@pytest.mark.skipif(int(keras.__version__.split(".")[0]) < 3, reason="ChunkedModel: Keras 3")
def test_many_to_one_fit_trains_as_a_keras_classifier_step_by_step():
    """The fit recipe: the label at every step, the last real step's weight 1, a loss that
    averages over its weights. Each training step's loss and the weights after it equal a
    Keras GRU classifier's on the same batches (its batch mean over sequences)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=[2 * B, T, F]).astype("float32")
    labels = rng.integers(0, C, size=[2 * B])
    lengths = rng.integers(3, T + 1, size=[2 * B])
    mask = np.arange(T)[None, :] < lengths[:, None]
    x = x * mask[..., None]
    keras.utils.set_random_seed(6)
    chain = tbptt.StatefulGRUChain(6, head=keras.layers.Dense(C), chunk_size=K)
    model = tbptt.keras.ChunkedModel(chain)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
    )
    model.build([None, None, F])
    plain = keras.Sequential(
        [keras.Input((T, F)), keras.layers.Masking(0.0), keras.layers.GRU(6), keras.layers.Dense(C)]
    )
    for v, w in zip(plain.trainable_variables, chain.trainable_variables):
        v.assign(w)
    plain.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    targets = np.repeat(labels[:, None], T, axis=1)
    weights = tbptt.data.last_step_weights(lengths, T)
    for step in range(4):
        rows = slice((step % 2) * B, (step % 2 + 1) * B)
        ours = model.train_on_batch(
            {"inputs": x[rows], "mask": mask[rows]}, targets[rows], sample_weight=weights[rows]
        )
        theirs = plain.train_on_batch(x[rows], labels[rows])
        np.testing.assert_allclose(np.ravel(ours)[0], np.ravel(theirs)[0], rtol=2e-5)
    assert_all_close(chain.trainable_variables, plain.trainable_variables, 2e-5)

"""One label per sequence over chunks (many-to-one) against a one-tape Keras model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tbptt
from conftest import assert_all_close

B, T, F, C, K = 4, 12, 3, 3, 5


def last_step_weights(lengths, steps):
    """[B, T]: 1 at each sequence's last real step, 0 elsewhere (padding included)."""
    weights = np.zeros([len(lengths), steps], "float32")
    weights[np.arange(len(lengths)), np.asarray(lengths) - 1] = 1.0
    return weights


@pytest.mark.parametrize("ragged", [False, True])
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
    result = chain.value_and_gradients(x, targets, loss_fn, mask=mask,
                                       sample_weight=last_step_weights(lengths, T))

    # The reference: Keras's GRU over each sequence to its last real step, one tape.
    gru, dense = keras.layers.GRU(6), keras.layers.Dense(C)
    gru(x[:, :1]), dense(tf.zeros([1, 6]))
    for v, w in zip(gru.trainable_variables + dense.trainable_variables,
                    chain.trainable_variables):
        v.assign(w)
    with tf.GradientTape() as tape:
        logits = dense(gru(x, mask=mask))  # the state stops at each sequence's end
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    grads = tape.gradient(loss, gru.trainable_variables + dense.trainable_variables)
    np.testing.assert_allclose(float(result.loss) / B, float(loss), rtol=1e-5)
    assert_all_close([g / B for g in result.grads], grads, 2e-5)

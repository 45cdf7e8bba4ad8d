"""reduction="auto": every Keras loss gives the loss of the whole sequence in one piece (mean
over kept labels, over sample weights, over unmasked steps), or is refused when its chunk
losses cannot add up to it."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close

import tbptt

B, T, F, C = 3, 23, 4, 5
RNG = np.random.RandomState(0)
X = RNG.randn(B, T, F)
LABELS = RNG.randint(C, size=(B, T))
LABELS[0, :9] = 2  # a chunk with no kept label at all when class 2 is ignored
LABELS[1, 15:] = 2
MASK = RNG.rand(B, T) > 0.2
WEIGHTS = RNG.rand(B, T)
SOFT = RNG.rand(B, T, C)


def chain(chunk_size=5):
    keras.utils.set_random_seed(4)
    return tbptt.RecurrentChain(
        [keras.layers.GRUCell(4, dtype="float64")],
        head=keras.layers.Dense(C, dtype="float64"),
        chunk_size=chunk_size,
        dtype="float64",
    )


def whole_sequence(chain, loss, targets, sample_weight=None, mask=None):
    """One tape over Keras's RNN layer (the mask keeps the state, as Keras does) and the loss
    of the whole sequence in one call, the mask attached to the predictions as Keras does."""
    rnn = keras.layers.RNN(chain.cells[0], return_sequences=True, dtype="float64")
    with tf.GradientTape() as tape:
        outputs = chain.head(rnn(X, mask=None if mask is None else tf.constant(mask)))
        if mask is not None:
            outputs._keras_mask = tf.constant(mask)
        value = loss(targets, outputs, sample_weight)
    return value, tape.gradient(value, chain.trainable_variables)


def ce(**kwargs):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64", **kwargs)


CASES = {
    "ignore_class": (lambda: ce(ignore_class=2), LABELS, {}),
    "ignore_class, mask": (lambda: ce(ignore_class=2), LABELS, {"mask": MASK}),
    "ignore_class, weights": (lambda: ce(ignore_class=2), LABELS, {"sample_weight": WEIGHTS}),
    "ignore_class, sum": (lambda: ce(ignore_class=2, reduction="sum"), LABELS, {}),
    "mean_with_sample_weight": (
        lambda: ce(reduction="mean_with_sample_weight"),
        LABELS,
        {"sample_weight": WEIGHTS},
    ),
    "mean_with_sample_weight, mask": (
        lambda: ce(reduction="mean_with_sample_weight"),
        LABELS,
        {"sample_weight": WEIGHTS, "mask": MASK},
    ),
    "mean_with_sample_weight, none": (lambda: ce(reduction="mean_with_sample_weight"), LABELS, {}),
    "crossentropy": (ce, LABELS, {}),
    "mse, mask": (lambda: keras.losses.MeanSquaredError(dtype="float64"), SOFT, {"mask": MASK}),
    "cosine over features": (
        lambda: keras.losses.CosineSimilarity(axis=-1, dtype="float64"),
        SOFT,
        {},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.default_cases("ignore_class")
def test_auto_gives_the_keras_loss_of_the_whole_sequence(case):
    make_loss, targets, flags = CASES[case]
    model = chain()
    result = model.value_and_gradients(X, targets, make_loss(), **flags)
    loss, grads = whole_sequence(model, make_loss(), targets, **flags)
    assert_all_close([result.loss] + result.grads, [loss] + grads, 1e-12, case)


def test_the_kept_labels_count_over_the_whole_sequence_not_per_chunk():
    """The equality above is not vacuous: chunks weighed by their steps give another loss
    (chunk by chunk: with a budget the whole call would be one chunk)."""
    model = chain()
    by_steps = model.with_config(reduction="mean", memory_budget=None).value_and_gradients(
        X, LABELS, ce(ignore_class=2)
    )
    loss, _ = whole_sequence(model, ce(ignore_class=2), LABELS)
    assert abs(float(by_steps.loss) - float(loss)) > 1e-3


class SumOverTime(keras.losses.Loss):
    def call(self, y_true, y_pred):
        return tf.reduce_sum(tf.square(y_true - y_pred), axis=[1, 2])  # [B]


class MaskedOwnValues(keras.losses.Loss):
    def call(self, y_true, y_pred):
        values = tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)
        values._keras_mask = values > 0.1
        return values


@pytest.mark.parametrize(
    "loss,match",
    [
        (lambda: keras.losses.Dice(dtype="float64"), "Dice.*not a mean or sum of per-step terms"),
        (lambda: keras.losses.Tversky(dtype="float64"), "Tversky.*per-step"),
        (lambda: keras.losses.CosineSimilarity(axis=1, dtype="float64"), "per-step"),
        (lambda: SumOverTime(dtype="float64"), r"SumOverTime.*values have shape \[None\]"),
        (lambda: SumOverTime(dtype="float64", reduction="sum"), "per-step"),
        (lambda: MaskedOwnValues(dtype="float64"), "masks its own values"),
    ],
)
@pytest.mark.default_cases("<lambda>-Dice.*not a mean or sum of per-step terms")
def test_losses_that_do_not_add_up_over_chunks_are_refused(loss, match):
    model = chain()
    with pytest.raises(ValueError, match=match):
        model.value_and_gradients(X, SOFT, loss())
    # The same loss with the chain's reduction given is the user's call: no refusal.
    model.with_config(reduction="sum").value_and_gradients(X, SOFT, loss())


def test_a_whole_sequence_count_needs_the_targets_in_memory():
    source = tbptt.ChunkSource(lambda a, b: LABELS[:, a:b], LABELS.shape, "int64")
    with pytest.raises(ValueError, match="kept labels.*in memory"):
        chain().value_and_gradients(X, source, ce(ignore_class=2))

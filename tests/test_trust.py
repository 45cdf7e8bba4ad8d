"""No silently wrong result: each everyday case either equals an independent reference or is
refused in Python with a message that names the argument and the fix."""

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close, l1_loss, make_sequence, needs_keras3
from references import full_bptt

import tbptt
from tbptt._src.core import compiling

B, T, F = 2, 10, 3


def data(steps=T, outputs=2, dtype="float64"):
    return make_sequence(B, steps, F, dtype), make_sequence(B, steps, outputs, dtype, offset=0.5)


def gru(head=None, **kwargs):
    kwargs.setdefault("chunk_size", 4)
    head = keras.layers.Dense(2, dtype="float64") if head is None else head
    return tbptt.RecurrentChain(
        [keras.layers.GRUCell(4, dtype="float64")], head=head, dtype="float64", **kwargs
    )


# -- variables the chain cannot see, heads that look across steps ---------------------------------


def test_a_callable_head_over_a_layer_is_refused_and_the_layer_itself_works():
    dense = keras.layers.Dense(2, dtype="float64")
    x, y = data()
    with pytest.raises(TypeError, match=r"head reads trainable variables .*the layer itself"):
        gru(head=lambda h: dense(h)).value_and_gradients(x, y, l1_loss)
    chain = gru(head=dense)
    result = chain.value_and_gradients(x, y, l1_loss)
    assert_all_close(result.grads, full_bptt(chain, x, y, l1_loss)[1], 1e-10)


def test_a_stage_function_over_a_layer_is_refused():
    dense = keras.layers.Dense(1)
    chain = tbptt.StageChain([keras.layers.Dense(3), lambda h: dense(h)])
    with pytest.raises(TypeError, match=r"stages\[1\] reads trainable variables"):
        chain.value_and_gradients(
            np.ones([2, 4], "float32"), np.ones([2, 1], "float32"), keras.losses.MeanSquaredError()
        )


@pytest.mark.parametrize(
    "head,match",
    [
        (lambda: keras.layers.Conv1D(2, 3, padding="causal", dtype="float64"), "looks across"),
        (
            lambda: keras.Sequential(
                [
                    keras.layers.Dense(2, dtype="float64"),
                    keras.layers.BatchNormalization(dtype="float64"),
                ]
            ),
            "BatchNormalization",
        ),
        (lambda: keras.layers.GRU(2, return_sequences=True, dtype="float64"), "looks across"),
        (lambda: lambda h: h[:, :-1], "steps of its input"),
        (lambda: lambda h: {"y": h}, "one tensor"),
    ],
)
@pytest.mark.default_cases("<lambda>-looks across0")
def test_heads_that_do_not_act_step_by_step_are_refused(head, match):
    x, y = data()
    with pytest.raises(ValueError, match=match):
        gru(head=head()).value_and_gradients(x, y, l1_loss)


class _MixesStepsInTraining(keras.layers.Layer):
    """Adds the mean over the chunk's steps, in training only: inference looks step-wise."""

    def call(self, h, training=False):
        return h + tf.reduce_mean(h, axis=1, keepdims=True) if training else h


@pytest.mark.parametrize("part", ["head", "inputs_layer"])
@pytest.mark.default_cases("head")
def test_a_part_that_mixes_steps_only_in_training_is_refused(part):
    """The chunked gradient runs the head and the inputs layer with training=True: they are
    checked so, their dropout drawing alike in the two runs compared."""
    mixing = keras.Sequential(
        [
            keras.layers.Dropout(0.3, dtype="float64"),
            keras.layers.Dense(2, dtype="float64"),
            _MixesStepsInTraining(dtype="float64"),
        ]
    )
    x, y = data()
    with pytest.raises(ValueError, match="looks across time steps when training"):
        gru(**{part: mixing}).value_and_gradients(x, y, l1_loss)
    fine = keras.Sequential(
        [keras.layers.Dropout(0.3, dtype="float64"), keras.layers.Dense(2, dtype="float64")]
    )
    assert np.isfinite(gru(**{part: fine}).value_and_gradients(x, y, l1_loss).loss)


# -- threads ---------------------------------------------------------------------------------------


def test_threads_with_their_own_sources_get_their_own_results():
    chain = gru(chunk_size=3)
    streams = [data() for _ in range(4)]
    expected = [chain.value_and_gradients(x, y, l1_loss) for x, y in streams]
    results = [None] * len(streams)

    def run(index):
        x, y = streams[index]
        source = tbptt.ChunkSource(lambda a, b, x=x: x[:, a:b], x.shape, "float64")
        results[index] = chain.value_and_gradients(source, y, l1_loss)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        assert_all_close([got.loss] + got.grads, [want.loss] + want.grads, 1e-12)


def test_threads_making_the_first_call_build_the_variables_once():
    chain = gru()
    x, y = data()
    threads = [
        threading.Thread(target=chain.value_and_gradients, args=(x, y, l1_loss)) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(chain.trainable_variables) == 5  # kernel, recurrent, bias; dense kernel, bias


# -- the compile cache -----------------------------------------------------------------------------


@pytest.mark.slow
def test_equal_keras_losses_share_one_trace_and_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(compiling, "MAX_FUNCTIONS", 3)
    chain = gru()
    x, y = data()
    first = chain.value_and_gradients(x, y, keras.losses.MeanSquaredError(dtype="float64"))
    for _ in range(20):
        chain.value_and_gradients(x, y, keras.losses.MeanSquaredError(dtype="float64"))
    assert chain.trace_count == 1
    for delta in range(5):  # five losses with other settings: five traces
        chain.value_and_gradients(x, y, keras.losses.Huber(delta=1.0 + delta, dtype="float64"))
    assert len(chain._functions._functions) == 3  # bounded: the oldest traces are dropped
    assert chain.trace_count == 6
    result = chain.value_and_gradients(x, y, keras.losses.MeanSquaredError(dtype="float64"))
    assert chain.trace_count == 7  # its trace was dropped: traced again, and still right
    assert_all_close([result.loss] + result.grads, [first.loss] + first.grads, 0.0)


def test_keras_losses_with_another_config_trace_apart():
    chain = gru()
    x, y = data()
    a = chain.value_and_gradients(x, y, keras.losses.Huber(delta=1.0, dtype="float64"))
    b = chain.value_and_gradients(x, y, keras.losses.Huber(delta=0.1, dtype="float64"))
    assert chain.trace_count == 2 and abs(float(a.loss) - float(b.loss)) > 1e-3


# -- smaller ones ----------------------------------------------------------------------------------


def test_stacked_lstm_states_must_have_their_structure():
    chain = tbptt.RecurrentChain([keras.layers.LSTMCell(3), keras.layers.LSTMCell(3)], chunk_size=4)
    x = make_sequence(B, T, F)
    (h1, c1), (h2, c2) = chain.initial_state(B)
    chain(x, ((h1, c1), (h2, c2)))
    chain(x, [[h1, c1], [h2, c2]])  # lists for tuples are fine
    with pytest.raises(ValueError, match="structure of chain.initial_state"):
        chain(x, [h1, h2, c1, c2])
    single = tbptt.RecurrentChain([keras.layers.LSTMCell(3)], chunk_size=4)
    single(x, single.initial_state(B)[0])  # one layer: its own (h, c) is unambiguous


def test_complex_targets_and_integer_losses_are_refused():
    chain = gru()
    x, y = data()
    with pytest.raises(TypeError, match="targets must hold real numbers"):
        chain.value_and_gradients(x, y.astype("complex128"), l1_loss)
    with pytest.raises(TypeError, match="float scalar"):
        chain.value_and_gradients(x, y, lambda a, b: tf.cast(tf.reduce_sum(a - b), tf.int32))
    with pytest.raises(TypeError, match="scalar tensor per chunk, got NoneType"):
        chain.value_and_gradients(x, y, lambda a, b: None)
    result = chain.value_and_gradients(x, y, l1_loss)  # nothing broken
    assert_all_close(result.grads, full_bptt(chain, x, y, l1_loss)[1], 1e-10)


def test_chunk_source_shape_must_be_whole_numbers():
    with pytest.raises(TypeError, match="whole numbers"):
        tbptt.ChunkSource(lambda a, b: None, shape=(2.5, 10, 3))


def test_tf1_boundary_states_must_feed_the_chunks_in_order():
    with tf.Graph().as_default():
        w = tf.Variable(0.5)
        s0 = tf.ones([2, 3])
        s1 = s0 * w
        s2 = s1 * w
        unrelated = tf.zeros([2, 3])
        losses = [tf.reduce_sum(s1), tf.reduce_sum(s2)]
        tbptt.compat.v1.backprop_chunks(losses, [s0, s1, s2], [w])
        with pytest.raises(ValueError, match=r"depends on boundary_states\[0\]"):
            tbptt.compat.v1.backprop_chunks(losses, [unrelated, s1, s2], [w])
        with pytest.raises(ValueError, match=r"depends on boundary_states\[0\]"):
            tbptt.compat.v1.backprop_chunks(losses, [s2, s1, s0], [w])
        with pytest.raises(ValueError, match="chunk_losses\\[0\\] must be a scalar"):
            tbptt.compat.v1.backprop_chunks([s1, losses[1]], [s0, s1, s2], [w])
        with pytest.raises(ValueError, match="final_state_grad: entry 0 must have the shape"):
            tbptt.compat.v1.backprop_chunks(
                losses, [s0, s1, s2], [w], final_state_grad=tf.ones([3, 3])
            )


# -- fit -------------------------------------------------------------------------------------------


@needs_keras3
def test_fit_adds_weight_regularization_once_per_step_as_keras_does():
    x, y = (a.astype("float32") for a in data(steps=8))
    regularizer = keras.regularizers.L2(0.05)
    keras.utils.set_random_seed(3)
    chain = tbptt.RecurrentChain(
        [keras.layers.GRUCell(4, kernel_regularizer=regularizer)],
        head=keras.layers.Dense(2, kernel_regularizer=regularizer),
        chunk_size=3,
    )
    model = tbptt.keras.ChunkedModel(chain)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    chain.build(x.shape)
    plain = keras.Sequential(
        [
            keras.Input((None, F)),
            keras.layers.GRU(4, return_sequences=True, kernel_regularizer=regularizer),
            keras.layers.Dense(2, kernel_regularizer=regularizer),
        ]
    )
    for target, source in zip(plain.trainable_variables, chain.trainable_variables):
        target.assign(source)
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    ours = model.fit(x, y, batch_size=B, shuffle=False, verbose=0).history["loss"][0]
    theirs = plain.fit(x, y, batch_size=B, shuffle=False, verbose=0).history["loss"][0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert_all_close(chain.trainable_variables, plain.trainable_variables, 1e-5)


@needs_keras3
def test_fit_refuses_activity_regularizers():
    chain = tbptt.RecurrentChain(
        [keras.layers.GRUCell(4)],
        chunk_size=3,
        head=keras.layers.Dense(2, activity_regularizer="l2"),
    )
    with pytest.raises(ValueError, match="activity regularizer"):
        tbptt.keras.ChunkedModel(chain)


@pytest.mark.slow
@needs_keras3
def test_a_stream_checkpoint_is_refused_by_another_chunking(tmp_path):
    x, y = (a.astype("float32") for a in data(steps=8))

    def model(chunk_size):
        keras.utils.set_random_seed(2)
        chain = tbptt.StatefulGRUChain(
            4,
            head=keras.layers.Dense(2),
            chunk_size=chunk_size,
            mode="truncated",
            backprop_chunks=2,
        )
        m = tbptt.keras.ChunkedModel(chain, stateful=True)
        m.compile(optimizer="sgd", loss="mse")
        return m

    saved = model(4)
    saved.fit(x, y, batch_size=B, shuffle=False, verbose=0)
    path = tf.train.Checkpoint(model=saved).write(str(tmp_path / "ckpt"))
    same = model(4)
    same.fit(x, y, batch_size=B, shuffle=False, verbose=0)  # built
    tf.train.Checkpoint(model=same).read(path).assert_existing_objects_matched()
    assert_all_close(same.carried_state, saved.carried_state, 0.0)
    other = model(2)
    other.fit(x, y, batch_size=B, shuffle=False, verbose=0)
    with pytest.raises(ValueError, match="same chunking"):
        tf.train.Checkpoint(model=other).read(path).assert_existing_objects_matched()


def test_stage_randomness_outside_keras_is_refused_with_recompute():
    generator = tf.random.Generator.from_seed(1)
    x, y = np.ones([2, 4], "float32"), np.zeros([2, 1], "float32")
    mse = keras.losses.MeanSquaredError()
    with pytest.raises(ValueError, match="another result when run again"):
        tbptt.StageChain(
            [
                keras.layers.Dense(3),
                lambda h: h + generator.normal(tf.shape(h)),
                keras.layers.Dense(1),
            ],
            recompute=True,
        ).value_and_gradients(x, y, mse)
    # Keras's own randomness is restored before the re-run: allowed, and exact.
    chain = tbptt.StageChain(
        [keras.layers.Dense(3), keras.layers.Dropout(0.5), keras.layers.Dense(1)], recompute=True
    )
    assert np.isfinite(float(chain.value_and_gradients(x, y, mse).loss))


class ShortStateCell(keras.layers.Layer):
    state_size = 5  # but returns 4

    def call(self, inputs, states):
        h = inputs[:, :1] * 0.0 + states[0][:, :4]
        return h, [h]


@pytest.mark.parametrize(
    "cells,error,match",
    [
        (lambda: [keras.layers.GRU(3)], TypeError, "pass its cell"),
        (lambda: [ShortStateCell()], ValueError, "state_size 5 says"),
    ],
)
@pytest.mark.default_cases("<lambda>-TypeError-pass its cell")
def test_cells_that_cannot_work_are_named(cells, error, match):
    with pytest.raises(error, match=match):
        tbptt.RecurrentChain(cells(), chunk_size=3)(make_sequence(B, T, F))


def test_a_refused_first_call_leaves_the_chain_unbuilt():
    chain = gru()
    x, y = data()
    with pytest.raises(ValueError, match="initial_state"):
        chain.value_and_gradients(x[..., :2], y, l1_loss, initial_state=[tf.zeros([B, 9])])
    assert not chain.built
    result = chain.value_and_gradients(x, y, l1_loss)  # built for F = 3 now
    assert_all_close(result.grads, full_bptt(chain, x, y, l1_loss)[1], 1e-10)


def test_missing_targets_ragged_and_integer_sources_are_handled():
    chain = gru()
    x, y = data()
    with pytest.raises(ValueError, match="targets must be given"):
        chain.value_and_gradients(x, None, l1_loss)
    with pytest.raises(TypeError, match="RaggedTensor: pad it"):
        chain.value_and_gradients(tf.RaggedTensor.from_tensor(x), y, l1_loss)
    ints = np.arange(B * T * F).reshape(B, T, F) % 5
    source = tbptt.ChunkSource(lambda a, b: ints[:, a:b], ints.shape, "int64")
    from_source = chain.value_and_gradients(source, y, l1_loss)
    in_memory = chain.value_and_gradients(ints, y, l1_loss)
    assert_all_close(from_source.grads, in_memory.grads, 1e-12)


@needs_keras3
def test_fit_without_targets_or_with_class_weight_is_refused():
    model = tbptt.keras.ChunkedModel(tbptt.StatefulGRUChain(4, chunk_size=3))
    model.compile(optimizer="sgd", loss="mse")
    x = make_sequence(B, 6, F)
    with pytest.raises(ValueError, match="needs targets"):
        model.fit(x, verbose=0)
    with pytest.raises(ValueError, match="class_weight"):
        model.fit(x, np.zeros([B, 6, 4], "float32"), class_weight={0: 1.0}, verbose=0)
    model.fit(x, np.zeros([B, 6, 4], "float32"), verbose=0)  # still works


class WeightedL1(keras.losses.Loss):
    """A Keras loss with a Python attribute that a training loop anneals."""

    def __init__(self, weight):
        super().__init__(name="weighted_l1", reduction="sum", dtype="float64")
        self.weight = weight

    def call(self, y_true, y_pred):
        return self.weight * tf.sqrt(tf.square(y_true - y_pred) + 1e-3)


def test_a_keras_loss_whose_attribute_changes_is_seen_by_the_compiled_step():
    chain = gru()
    x, y = data()
    loss = WeightedL1(1.0)
    first = chain.value_and_gradients(x, y, loss)
    loss.weight = 3.0
    second = chain.value_and_gradients(x, y, loss)
    np.testing.assert_allclose(float(second.loss), 3.0 * float(first.loss), rtol=1e-12)
    assert_all_close(second.grads, [3.0 * g for g in first.grads], 1e-12)


class ArrayWeightedL1(keras.losses.Loss):
    """Weights the outputs by an array attribute (changed in place by the user)."""

    def __init__(self, weights):
        super().__init__(reduction="sum", dtype="float64")
        self.weights = weights

    def call(self, y_true, y_pred):
        return tf.sqrt(tf.square(y_true - y_pred) + 1e-3) * self.weights


class EqualByName:
    """Equal to any other of its name (a user's __eq__/__hash__), whatever its scale."""

    def __init__(self, scale):
        self.scale = scale

    def __eq__(self, other):
        return isinstance(other, EqualByName)

    def __hash__(self):
        return 0

    def __call__(self, y_true, y_pred):
        return self.scale * l1_loss(y_true, y_pred)


def _twice(change):
    """A loss changed in Python between two calls: the second call must see the change."""
    chain = gru()
    x, y = data()
    loss_fn, expected_ratio = change(first=True)
    first = chain.value_and_gradients(x, y, loss_fn)
    loss_fn, _ = change(first=False)
    second = chain.value_and_gradients(x, y, loss_fn)
    np.testing.assert_allclose(float(second.loss), expected_ratio * float(first.loss), rtol=1e-12)


def test_an_array_changed_in_place_in_a_loss_is_seen():
    weights = np.ones([2], "float64")
    loss = ArrayWeightedL1(weights)

    def change(first):
        if not first:
            weights[:] = 3.0  # in place: the same array object
        return loss, 3.0

    _twice(change)


def test_a_tensor_attribute_replaced_and_a_closed_over_list_mutated_are_seen():
    loss = ArrayWeightedL1(tf.ones([2], tf.float64))

    def replace(first):
        if not first:
            loss.weights = 3.0 * tf.ones([2], tf.float64)
        return loss, 3.0

    _twice(replace)
    scales = [1.0]
    closing = lambda y_true, y_pred: scales[0] * l1_loss(y_true, y_pred)  # noqa: E731

    def mutate(first):
        if not first:
            scales[0] = 3.0
        return closing, 3.0

    _twice(mutate)


def test_losses_equal_by_their_own_eq_but_computing_differently_trace_apart():
    _twice(lambda first: (EqualByName(1.0 if first else 100.0), 100.0))


class ScaledHead(keras.layers.Layer):
    """A head whose Python attribute a user changes between calls (a temperature, say)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(2, dtype="float64")
        self.scale = 1.0

    def call(self, h):
        return self.scale * self.dense(h)


@pytest.mark.parametrize("entry", ["value_and_gradients", "chain(x)", "online step"])
@pytest.mark.default_cases("value_and_gradients")
def test_a_head_attribute_changed_between_calls_is_seen(entry):
    head = ScaledHead(dtype="float64")
    chain = gru(head=head)
    x, y = data()
    steps = 1 if entry == "online step" else T

    def run():
        if entry == "value_and_gradients":
            return chain.value_and_gradients(x, y, lambda a, b: tf.reduce_sum(b)).loss
        return tf.reduce_sum(chain(x[:, :steps])[0])

    first = float(run())
    head.scale = 3.0
    np.testing.assert_allclose(float(run()), 3.0 * first, rtol=1e-12)


class UnhashableLoss:
    __hash__ = None

    def __call__(self, y_true, y_pred):
        return l1_loss(y_true, y_pred)


def test_unhashable_loss_functions_work():
    chain = gru()
    x, y = data()
    result = chain.value_and_gradients(x, y, UnhashableLoss())
    assert_all_close(result.grads, full_bptt(chain, x, y, l1_loss)[1], 1e-10)


def test_an_unknown_feature_size_inside_a_tf_function_is_named():
    chain = gru()

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float64)])
    def forward(x):
        return chain(x)[0]

    with pytest.raises(ValueError, match="known feature size"):
        forward(make_sequence(B, T, F, "float64"))
    chain.build([None, None, F])
    np.testing.assert_allclose(
        forward(make_sequence(B, T, F, "float64")),
        chain(make_sequence(B, T, F, "float64"))[0],
        rtol=1e-12,
    )


# -- ways past the refusal checks, closed ----------------------------------------------------


def test_a_head_reaching_further_than_a_short_probe_is_refused_at_the_chain_s_cuts():
    """A dilated causal convolution reaches 6 steps back: a probe of 6 steps cut in halves
    never saw it; the head is checked on two chunks of the chain's own length."""
    head = keras.layers.Conv1D(2, 2, dilation_rate=6, padding="causal", dtype="float64")
    x, y = data()
    with pytest.raises(ValueError, match="looks across time steps"):
        gru(head=head, chunk_size=4).value_and_gradients(x, y, l1_loss)


class TrainingOnlyHidden(keras.layers.Layer):
    """Reads a variable it does not list, and only in training, as the gradient runs it."""

    def __init__(self, hidden, **kwargs):
        super().__init__(**kwargs)
        self.hidden = [hidden]  # a list: Keras does not track it

    def call(self, h, training=False):
        return h * self.hidden[0] if training else h


def test_a_part_reading_unlisted_variables_only_in_training_is_refused():
    hidden = tf.Variable(2.0, dtype=tf.float64)
    x, y = data()
    with pytest.raises(TypeError, match="reads trainable variables that it does not list"):
        gru(head=TrainingOnlyHidden(hidden, dtype="float64")).value_and_gradients(x, y, l1_loss)


def test_the_ownership_check_leaves_moving_statistics_and_seeds_as_they_were():
    """The check runs the parts with training=True; what that changes is put back."""
    noise = keras.layers.GaussianNoise(0.1, seed=3, dtype="float64")
    head = keras.Sequential([keras.layers.Dense(2, dtype="float64"), noise])
    chain = gru(head=head)
    chain.build([None, None, F])
    before = [v.numpy().copy() for v in head.non_trainable_variables]
    fresh = keras.Sequential(
        [
            keras.layers.Dense(2, dtype="float64"),
            keras.layers.GaussianNoise(0.1, seed=3, dtype="float64"),
        ]
    )
    fresh.build([None, None, 4])
    assert [v.numpy().tolist() for v in fresh.non_trainable_variables] == [
        b.tolist() for b in before
    ]


def test_layers_frozen_before_the_first_call_are_held_back():
    """`layer.trainable = False` (fine-tuning): the layer's variables are its own, not
    trained, and the others' gradients are the full-BPTT ones."""
    cell = keras.layers.GRUCell(4, dtype="float64")
    frozen = keras.layers.Dense(3, dtype="float64")
    head = keras.Sequential([frozen, keras.layers.Dense(2, dtype="float64")])
    cell.build((None, F))
    cell.trainable = False
    frozen.trainable = False
    chain = tbptt.RecurrentChain([cell], head=head, chunk_size=4, dtype="float64")
    x, y = data()
    result = chain.value_and_gradients(x, y, l1_loss)
    assert len(chain.trainable_variables) == 2  # the last Dense's kernel and bias
    with tf.GradientTape() as tape:
        outputs = head(keras.layers.RNN(cell, return_sequences=True, dtype="float64")(x))
        loss = l1_loss(y, outputs)
    assert_all_close(result.grads, tape.gradient(loss, chain.trainable_variables), 1e-10)


def test_a_head_that_computes_otherwise_when_traced_is_refused_by_name():
    """Keras's TimeDistributed maps over the batch when the steps are unknown (as the chain
    traces its chunks): it would return [B, B, ...], refused with the way out."""
    x, y = data()
    head = keras.layers.TimeDistributed(keras.layers.Dense(2, dtype="float64"))
    with pytest.raises(ValueError, match="TimeDistributed.*pass the layer it wraps"):
        gru(head=head).value_and_gradients(x, y, l1_loss)

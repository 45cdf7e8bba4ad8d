"""RecurrentChain / StatefulGRUChain against independent references."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from cells import CELL_KINDS, make_cells
from conftest import (
    assert_all_close,
    copy_weights,
    float64_loss,
    l1_loss,
    make_sequence,
    sum_squares,
)
from references import full_bptt, truncated_reference

import tbptt

F64 = 1e-10  # float64: only summation order differs from the reference.
# float32: the chunked and the one-tape backward add the same terms in a different order;
# over ~100 steps of GRU products that costs a few ulps per step, ~1e-6 relative at worst.
F32 = 2e-5

# (backend, compiled) pairs: the graph backend always runs compiled.
EXECUTIONS = [("eager", True), ("eager", False), ("graph", True)]


def chain_for(kind, features, dtype="float64", head=True, **kwargs):
    cells = make_cells(kind, features, dtype)
    head_layer = keras.layers.Dense(2, dtype=dtype) if head else None
    return tbptt.RecurrentChain(cells, head=head_layer, dtype=dtype, **kwargs)


def data(batch=3, steps=13, features=4, outputs=2, dtype="float64"):
    x = make_sequence(batch, steps, features, dtype)
    y = make_sequence(batch, steps, outputs, dtype, offset=0.5)
    return x, y


# -- the forward pass is the right function -----


@pytest.mark.parametrize("kind", ["gru", "lstm", "stacked"])
@pytest.mark.default_cases("gru")
def test_forward_matches_keras_rnn(kind):
    x, _ = data(dtype="float32")
    chain = chain_for(kind, 4, dtype="float32", head=False, chunk_size=5)
    outputs, state = chain(x)
    rnn = keras.layers.RNN(chain.cells, return_sequences=True, return_state=True)
    expected, *expected_state = rnn(x)
    assert_all_close(outputs, expected, 1e-6, "outputs")
    assert_all_close(state, expected_state, 1e-6, "final state")


def test_gru_step_matches_numpy():
    x, _ = data(batch=2, steps=6, features=3)
    chain = tbptt.StatefulGRUChain(4, chunk_size=4, dtype="float64")
    outputs, (h_last,) = chain(x)
    kernel, recurrent, bias = [v.numpy() for v in chain.trainable_variables]
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    h, u = np.zeros([2, 4]), 4
    for t in range(6):
        xw, hu = x[:, t] @ kernel + bias[0], h @ recurrent + bias[1]
        z = sigmoid(xw[:, :u] + hu[:, :u])
        r = sigmoid(xw[:, u : 2 * u] + hu[:, u : 2 * u])
        candidate = np.tanh(xw[:, 2 * u :] + r * hu[:, 2 * u :])
        h = z * h + (1 - z) * candidate
        np.testing.assert_allclose(outputs[:, t], h, rtol=1e-12)
    np.testing.assert_allclose(h_last, h, rtol=1e-12)


# -- exact mode == full BPTT -----


@pytest.mark.parametrize("kind,execution", list(itertools.product(CELL_KINDS, EXECUTIONS)))
@pytest.mark.default_cases("gru-execution0")
def test_exact_matches_full_bptt_float64(kind, execution):
    backend, compiled = execution
    x, y = data()
    chain = chain_for(kind, 4, chunk_size=4, backend=backend, compiled=compiled)
    state = tf.nest.map_structure(lambda s: s + 0.3, chain.initial_state(3))
    result = chain.value_and_gradients(x, y, l1_loss, initial_state=state)
    loss, grads, final_state, state_grad = full_bptt(chain, x, y, l1_loss, state)
    assert len(result.grads) == len(chain.trainable_variables) > 0
    assert_all_close(result.loss, loss, F64, "loss")
    assert_all_close(result.grads, grads, F64, "grads")
    assert_all_close(result.final_state, final_state, F64, "final_state")
    assert_all_close(result.initial_state_grad, state_grad, F64, "initial_state_grad")
    assert tf.nest.map_structure(
        lambda s: s.shape, result.initial_state_grad
    ) == tf.nest.map_structure(lambda s: s.shape, state)


@pytest.mark.parametrize("steps,chunk_size", [(13, 1), (13, 5), (7, 20), (12, 4), (1, 3)])
@pytest.mark.default_cases("13-1")
def test_exact_any_chunking(steps, chunk_size):
    x, y = data(steps=steps)
    chain = chain_for("stacked", 4, chunk_size=chunk_size)
    result = chain.value_and_gradients(x, y, sum_squares)
    loss, grads, _, state_grad = full_bptt(chain, x, y, sum_squares)
    assert_all_close([result.loss] + result.grads, [loss] + grads, F64)
    assert_all_close(result.initial_state_grad, state_grad, F64)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.default_cases("gru")
def test_exact_matches_finite_differences(kind):
    """Independent of every tape: central differences of the float64 loss."""
    x, y = data(batch=2, steps=5, features=2)
    chain = chain_for(kind, 2, chunk_size=2)
    state = tf.nest.map_structure(lambda s: s + 0.2, chain.initial_state(2))
    result = chain.value_and_gradients(x, y, l1_loss, initial_state=state)

    def loss_at(initial=state):
        outputs, _ = chain(x, initial)
        return float(l1_loss(y, outputs))

    eps = 1e-6
    for variable, grad in zip(chain.trainable_variables, result.grads):
        value = variable.numpy()
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            for sign in (1, -1):
                shifted = value.copy()
                shifted[index] += sign * eps
                variable.assign(shifted)
                numeric[index] += sign * loss_at() / (2 * eps)
        variable.assign(value)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)
    leaves = tf.nest.flatten(state)
    for leaf_index, grad in enumerate(tf.nest.flatten(result.initial_state_grad)):
        numeric = np.zeros(leaves[leaf_index].shape)
        for index in np.ndindex(numeric.shape):
            for sign in (1, -1):
                shifted = [leaf.numpy() for leaf in leaves]
                shifted[leaf_index][index] += sign * eps
                numeric[index] += (
                    sign * loss_at(tf.nest.pack_sequence_as(state, shifted)) / (2 * eps)
                )
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


# -- truncated mode == per-chunk tapes with stop_gradient at the cut ------------------------------


@pytest.mark.parametrize(
    "m,backend,kind",
    [
        (2, "eager", "stacked"),
        (1, "eager", "gru"),
        (1, "graph", "lstm"),
        (2, "graph", "gru"),
        (3, "eager", "lstm"),
        (3, "graph", "custom"),
    ],
)
@pytest.mark.default_cases("2-eager-stacked")
def test_truncated_matches_stop_gradient_reference(m, backend, kind):
    x, y = data(steps=14)
    chain = chain_for(kind, 4, chunk_size=4, mode="truncated", backprop_chunks=m, backend=backend)
    state = tf.nest.map_structure(lambda s: s + 0.3, chain.initial_state(3))
    final_grad = None
    if m > 1:
        final_grad = tf.nest.map_structure(lambda s: tf.ones_like(s) * 0.7, state)
    result = chain.value_and_gradients(x, y, l1_loss, state, final_state_grad=final_grad)
    _, grads, state_grad = truncated_reference(chain, x, y, l1_loss, m, state, final_grad)
    loss, _, final_state, _ = full_bptt(chain, x, y, l1_loss, state)
    assert_all_close(result.loss, loss, F64, "loss")
    assert_all_close(result.grads, grads, F64, "grads")
    assert_all_close(result.final_state, final_state, F64, "final_state")
    assert_all_close(result.initial_state_grad, state_grad, F64, "initial_state_grad")


def test_truncated_differs_from_exact():
    """The reference above could pass vacuously if truncation changed nothing."""
    x, y = data(steps=14)
    exact = chain_for("gru", 4, chunk_size=4)
    truncated = chain_for("gru", 4, chunk_size=4, mode="truncated", backprop_chunks=2)
    copy_weights(exact, truncated, x.shape)
    a = exact.value_and_gradients(x, y, l1_loss).grads
    b = truncated.value_and_gradients(x, y, l1_loss).grads
    assert max(float(tf.reduce_max(tf.abs(p - q))) for p, q in zip(a, b)) > 1e-3


def test_truncated_with_many_chunks_back_equals_exact():
    x, y = data(steps=14)
    exact = chain_for("lstm", 4, chunk_size=4)
    truncated = chain_for("lstm", 4, chunk_size=4, mode="truncated", backprop_chunks=5)
    copy_weights(exact, truncated, x.shape)
    a = exact.value_and_gradients(x, y, l1_loss)
    b = truncated.value_and_gradients(x, y, l1_loss)
    assert_all_close(b.grads, a.grads, F64)
    assert_all_close(b.initial_state_grad, a.initial_state_grad, F64)


# -- carrying across mini-batches -----


@pytest.mark.parametrize("backend", ["eager", "graph"])
@pytest.mark.parametrize("cut", [8, 6])  # on a chunk boundary, and inside a chunk
@pytest.mark.default_cases("8-eager")
def test_two_calls_chained_by_hand_equal_one_call(backend, cut):
    """Seed 001: state forward into the next mini-batch, dL/dstate back from it."""
    x, y = data(steps=14)
    chain = chain_for("stacked", 4, chunk_size=4, backend=backend)
    whole = chain.value_and_gradients(x, y, l1_loss)
    first = chain.value_and_gradients(x[:, :cut], y[:, :cut], l1_loss)
    second = chain.value_and_gradients(
        x[:, cut:], y[:, cut:], l1_loss, initial_state=first.final_state
    )
    first = chain.value_and_gradients(
        x[:, :cut], y[:, :cut], l1_loss, final_state_grad=second.initial_state_grad
    )
    assert_all_close(first.loss + second.loss, whole.loss, F64, "loss")
    assert_all_close([a + b for a, b in zip(first.grads, second.grads)], whole.grads, F64)
    assert_all_close(first.initial_state_grad, whole.initial_state_grad, F64)
    assert_all_close(second.final_state, whole.final_state, F64)


def test_final_state_grad_matches_tape():
    x, y = data()
    chain = chain_for("lstm", 4, chunk_size=5)
    final_grad = tf.nest.map_structure(
        lambda s: tf.fill(s.shape, tf.constant(0.5, s.dtype)), chain.initial_state(3)
    )
    result = chain.value_and_gradients(x, y, l1_loss, final_state_grad=final_grad)
    _, grads, _, state_grad = full_bptt(chain, x, y, l1_loss, final_state_grad=final_grad)
    assert_all_close(result.grads, grads, F64)
    assert_all_close(result.initial_state_grad, state_grad, F64)


# -- reductions and sample weights -----


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(
    "loss",
    [float64_loss(keras.losses.MeanSquaredError), float64_loss(keras.losses.MeanAbsoluteError)],
)
@pytest.mark.default_cases("loss0-False")
def test_mean_reduction_equals_keras_loss_over_whole_sequence(loss, weighted):
    x, y = data(steps=13)  # chunks of 5, 5 and a ragged 3
    weights = np.linspace(0.5, 2.0, 3 * 13).reshape(3, 13) if weighted else None
    chain = chain_for("gru", 4, chunk_size=5, reduction="mean")
    result = chain.value_and_gradients(x, y, loss, sample_weight=weights)
    expected_loss, grads, _, state_grad = full_bptt(chain, x, y, loss, sample_weight=weights)
    assert_all_close(result.loss, expected_loss, F64, "loss")
    assert_all_close(result.grads, grads, F64, "grads")
    assert_all_close(result.initial_state_grad, state_grad, F64)


@pytest.mark.parametrize(
    "loss,summed",
    [
        (float64_loss(keras.losses.MeanSquaredError), False),
        (float64_loss(keras.losses.MeanSquaredError, reduction="sum"), True),
        (l1_loss, True),
    ],
)
@pytest.mark.default_cases("loss0-False")
def test_the_default_reduction_follows_the_loss_whatever_the_chunk_size(loss, summed):
    """reduction="auto": a Keras mean loss gives the whole-sequence mean, a summed loss the sum;
    neither the loss nor the gradient depends on the chunk size."""
    x, y = data(steps=13)
    chain = chain_for("gru", 4, chunk_size=5)
    assert chain.reduction == "auto"
    expected_loss, expected_grads, _, _ = full_bptt(chain, x, y, loss)  # one tape, whole sequence
    for size in (5, 2, 13):
        result = chain.with_config(chunk_size=size).value_and_gradients(x, y, loss)
        assert_all_close(
            [result.loss] + result.grads,
            [expected_loss] + expected_grads,
            F64,
            f"chunk_size={size}",
        )
        explicit = chain.with_config(chunk_size=size, reduction="sum" if summed else "mean")
        assert_all_close(result.grads, explicit.value_and_gradients(x, y, loss).grads, 1e-15)


def test_sum_reduction_with_sample_weight():
    x, y = data(steps=11)
    weights = np.linspace(0.0, 1.0, 33).reshape(3, 11)

    def weighted_l1(y_true, y_pred, sample_weight):
        return tf.reduce_sum(tf.reduce_sum(tf.abs(y_true - y_pred), -1) * sample_weight)

    chain = chain_for("lstm", 4, chunk_size=3)
    result = chain.value_and_gradients(x, y, weighted_l1, sample_weight=weights)
    loss, grads, _, _ = full_bptt(chain, x, y, weighted_l1, sample_weight=weights)
    assert_all_close([result.loss] + result.grads, [loss] + grads, F64)


# -- float32 at seed 001's shapes ------------------------------------------------------------------


@pytest.mark.slow
def test_seed_001_shapes_float32():
    """B=34, F=200, GRU 64+32, Dense 3, L1 loss: exact chunked == one tape, in float32."""
    x = make_sequence(34, 300, 200)
    y = make_sequence(34, 300, 3, offset=1.0)
    chain = tbptt.StatefulGRUChain((64, 32), head=keras.layers.Dense(3), chunk_size=100)
    result = chain.value_and_gradients(x, y, l1_loss)
    loss, grads, _, state_grad = full_bptt(chain, x, y, l1_loss)
    assert [tuple(g.shape) for g in result.grads[:2]] == [(200, 192), (64, 192)]
    assert_all_close(result.loss, loss, 1e-6, "loss")
    assert_all_close(result.grads, grads, F32, "grads")
    assert_all_close(result.initial_state_grad, state_grad, F32, "initial_state_grad")


# -- compiled execution -----


def test_one_trace_serves_every_length_and_batch():
    chain = chain_for("gru", 4, chunk_size=4)
    for batch, steps in [(3, 13), (3, 20), (2, 7), (5, 4), (1, 30)]:
        x, y = data(batch=batch, steps=steps)
        chain.value_and_gradients(x, y, l1_loss)
    assert chain.trace_count == 1


@pytest.mark.slow
def test_a_new_loss_fn_every_call_warns_about_retracing():
    """An equal function made anew is one trace; one closing over a new value each call
    traces each call, and says so at once."""
    x, y = data(steps=5)
    chain = chain_for("gru", 4, chunk_size=4)
    for _ in range(3):
        chain.value_and_gradients(x, y, lambda a, b: sum_squares(a, b))
    assert chain.trace_count == 1
    with pytest.warns(UserWarning, match="pass the same loss_fn every call"):
        for scale in (1.0, 2.0):
            chain.value_and_gradients(x, y, lambda a, b, s=scale: s * sum_squares(a, b))


def test_inside_a_users_tf_function_equals_eager_call():
    x, y = data(steps=13)
    chain = chain_for("stacked", 4, chunk_size=4)
    reference = chain.value_and_gradients(x, y, l1_loss)

    @tf.function
    def step(x, y):
        return chain.value_and_gradients(x, y, l1_loss)

    compiled = step(tf.constant(x), tf.constant(y))
    assert_all_close([compiled.loss] + compiled.grads, [reference.loss] + reference.grads, F64)
    assert_all_close(compiled.initial_state_grad, reference.initial_state_grad, F64)


def test_inside_a_tf_function_with_unknown_batch_and_time():
    x, y = data(steps=11)
    chain = chain_for("lstm", 4, chunk_size=4)
    reference = chain.value_and_gradients(x, y, l1_loss)
    spec = tf.TensorSpec([None, None, None], tf.float64)

    @tf.function(input_signature=[spec, spec])
    def step(x, y):
        return chain.value_and_gradients(tf.ensure_shape(x, [None, None, 4]), y, l1_loss)

    compiled = step(tf.constant(x), tf.constant(y))
    assert_all_close([compiled.loss] + compiled.grads, [reference.loss] + reference.grads, F64)


def test_training_step_with_optimizer_reduces_loss():
    x, y = data(steps=20, dtype="float32")
    chain = tbptt.StatefulGRUChain(8, head=keras.layers.Dense(2), chunk_size=6)
    opt = keras.optimizers.Adam(0.05)
    losses = []
    for _ in range(15):
        result = chain.value_and_gradients(x, y, keras.losses.MeanSquaredError())
        opt.apply_gradients(zip(result.grads, chain.trainable_variables))
        losses.append(float(result.loss))
    assert losses[-1] < 0.5 * losses[0]


# -- dtypes and configuration -----


def test_stateful_gru_chain_float64():
    chain = tbptt.StatefulGRUChain((3, 2), chunk_size=4, dtype="float64")
    x, y = data(steps=9, outputs=2)
    result = chain.value_and_gradients(x, y, sum_squares)
    assert all(v.dtype == "float64" for v in chain.trainable_variables)
    assert result.loss.dtype == tf.float64 and all(g.dtype == tf.float64 for g in result.grads)
    assert [s.dtype for s in result.final_state] == [tf.float64, tf.float64]


def test_dtype_is_applied_to_unbuilt_cells_and_head():
    chain = tbptt.RecurrentChain(
        [keras.layers.GRUCell(3)], head=keras.layers.Dense(1), chunk_size=2, dtype="float64"
    )
    outputs, _ = chain(make_sequence(2, 5, 3))
    assert outputs.dtype == tf.float64
    assert all(v.dtype == "float64" for v in chain.trainable_variables)


def test_initial_state_structure():
    chain = tbptt.RecurrentChain([keras.layers.GRUCell(3), keras.layers.LSTMCell(2)], chunk_size=2)
    state = chain.initial_state(4)
    assert isinstance(state, tuple) and len(state) == 2
    assert state[0].shape == (4, 3)
    assert [s.shape for s in state[1]] == [(4, 2), (4, 2)]
    _, final_state = chain(make_sequence(4, 3, 5), [state[0], list(state[1])])  # lists accepted
    assert tf.nest.map_structure(lambda s: s.shape, final_state) == tf.nest.map_structure(
        lambda s: s.shape, state
    )


class _OwnGRUCell(keras.layers.GRUCell):
    """A subclass may change `call`: the chain runs it as itself, and cannot replay its
    dropout."""


@pytest.mark.parametrize("option", ["dropout", "recurrent_dropout"])
@pytest.mark.default_cases("dropout")
def test_dropout_the_chain_cannot_replay_is_refused(option):
    """Keras's own GRU/LSTM/SimpleRNN cells' dropout is replayed (tests/test_randomness.py);
    inside StackedRNNCells or in a subclass it would be drawn anew in each recompute."""
    with pytest.raises(ValueError, match="dropout.*StackedRNNCells, not a subclass"):
        tbptt.RecurrentChain([_OwnGRUCell(3, **{option: 0.2})], chunk_size=2)
    with pytest.raises(ValueError, match="dropout.*StackedRNNCells, not a subclass"):
        tbptt.RecurrentChain(
            [keras.layers.StackedRNNCells([keras.layers.GRUCell(3, **{option: 0.2})])], chunk_size=2
        )


def test_head_dropout_is_consistent_within_a_step():
    """The head's dropout mask is drawn once per chunk and replayed in its recompute, so the
    gradient belongs to the loss returned. Keras 2's Dropout draws with stateful TensorFlow
    ops, which cannot be replayed: refused by name there."""
    x, y = data(steps=9, dtype="float32")
    chain = tbptt.StatefulGRUChain(
        4, chunk_size=3, head=keras.Sequential([keras.layers.Dropout(0.5), keras.layers.Dense(2)])
    )
    if int(keras.__version__.split(".")[0]) < 3:
        with pytest.raises(ValueError, match="cannot replay"):
            chain.value_and_gradients(x, y, sum_squares)
        return
    result = chain.value_and_gradients(x, y, sum_squares)
    assert np.isfinite(result.loss.numpy())
    assert all(np.all(np.isfinite(g)) for g in result.grads)


# -- token inputs: an inputs layer run chunk by chunk --------------------------------------------


def _token_chain(chunk_size=4, **kwargs):
    keras.utils.set_random_seed(11)
    return tbptt.RecurrentChain(
        [keras.layers.GRUCell(5, dtype="float64")],
        inputs_layer=keras.layers.Embedding(7, 3, dtype="float64"),
        head=keras.layers.Dense(7, dtype="float64"),
        chunk_size=chunk_size,
        dtype="float64",
        **kwargs,
    )


@pytest.mark.parametrize("mode", ["exact", "truncated"])
@pytest.mark.default_cases("exact")
def test_an_embedding_inputs_layer_trains_end_to_end_like_one_keras_tape(mode):
    """Token ids [B, T] through Embedding, GRU, Dense: the chunked loss and gradients (the
    embedding's included) equal one tape over Keras's own layers, float64."""
    ids = (np.arange(2 * 11).reshape(2, 11) * 3) % 7
    targets = np.roll(ids, -1, axis=1)
    chain = _token_chain(mode=mode)

    def loss(labels, logits):  # a summed cross-entropy in float64 (Keras 2 losses lack dtype=)
        return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))

    result = chain.value_and_gradients(ids, targets, loss)
    rnn = keras.layers.RNN(chain.cells[0], return_sequences=True, dtype="float64")
    size = chain.chunk_size if mode == "truncated" else ids.shape[1]
    with tf.GradientTape() as tape:
        total, state = 0.0, None
        for start in range(0, ids.shape[1], size):  # truncated m=1: each chunk from a cut state
            rnn_out = rnn(chain.inputs_layer(ids[:, start : start + size]), initial_state=state)
            total += loss(targets[:, start : start + size], chain.head(rnn_out))
            state = [tf.stop_gradient(_last_state(chain, ids[:, : start + size]))]
    grads = [tf.convert_to_tensor(g) for g in tape.gradient(total, chain.trainable_variables)]
    assert chain.trainable_variables[0] is chain.inputs_layer.embeddings
    assert_all_close([result.loss] + result.grads, [total] + grads, 1e-10, mode)


def _last_state(chain, ids):
    rnn = keras.layers.RNN(chain.cells[0], return_state=True, dtype="float64")
    return rnn(chain.inputs_layer(ids))[1]


def test_token_ids_without_an_inputs_layer_point_to_one():
    chain = tbptt.StatefulGRUChain(4, chunk_size=3)
    with pytest.raises(ValueError, match="inputs_layer=keras.layers.Embedding"):
        chain(np.zeros([2, 6], "int32"))


def test_an_inputs_layer_that_looks_across_steps_is_refused():
    chain = tbptt.RecurrentChain(
        [keras.layers.GRUCell(4)],
        chunk_size=3,
        inputs_layer=(
            keras.Sequential(
                [keras.layers.Embedding(5, 2), keras.layers.Conv1D(2, 3, padding="causal")]
            )
        ),
    )
    with pytest.raises(ValueError, match="inputs_layer looks across time steps"):
        chain(np.zeros([2, 6], "int32"))


def test_stacked_cells_with_a_multi_part_state_take_their_states_nested():
    """StackedRNNCells([LSTMCell, GRUCell]) has state_size [[4, 4], 3]: its call takes
    [[h, c], h2], while the chain carries the three tensors flat."""
    stacked = keras.layers.StackedRNNCells(
        [keras.layers.LSTMCell(4, dtype="float64"), keras.layers.GRUCell(3, dtype="float64")]
    )
    chain = tbptt.RecurrentChain([stacked], chunk_size=4, dtype="float64")
    x, y = data(outputs=3)
    result = chain.value_and_gradients(x, y, l1_loss)
    with tf.GradientTape() as tape:
        outputs = keras.layers.RNN(stacked, return_sequences=True, dtype="float64")(x)
        loss = l1_loss(y, outputs)
    expected = tape.gradient(loss, chain.trainable_variables)
    assert_all_close([result.loss] + result.grads, [loss] + expected, 1e-10)
    assert [tuple(s.shape) for s in result.final_state[0]] == [(3, 4), (3, 4), (3, 3)]


def _embedding_chain(mode: str, **options):
    keras.utils.set_random_seed(4)
    embedding = keras.layers.Embedding(11, 3, dtype="float64")
    chain = tbptt.RecurrentChain(
        [keras.layers.GRUCell(4)],
        head=keras.layers.Dense(2),
        inputs_layer=embedding,
        chunk_size=4,
        dtype="float64",
        mode=mode,
        **options,
    )
    return chain, embedding


@pytest.mark.parametrize(
    "mode, options",
    [("exact", {}), ("exact", {"levels": 2}), ("exact", {"backend": "graph"})],
    ids=["exact", "levels2", "graph"],
)
@pytest.mark.default_cases("exact")
def test_an_embedding_s_gradient_is_one_tape_s_indexed_slices_row_by_row(mode, options):
    """Keras's gradient of an Embedding: one row per lookup (Adam squares each row), here
    against one tape over Keras's RNN, row by row (chunk-major rows mapped to [B, T] order)."""
    # The least memory: chunks of 4, their rows chunk-major (a budget would run one chunk).
    chain, embedding = _embedding_chain(mode, memory_budget=None, **options)
    rng = np.random.default_rng(0)
    batch, steps, size = 3, 10, 4
    ids = rng.integers(0, 11, size=[batch, steps])
    targets = rng.normal(size=[batch, steps, 2])
    loss_fn = float64_loss(keras.losses.MeanSquaredError)
    call = lambda: chain.value_and_gradients(ids, targets, loss_fn)  # noqa: E731
    result = tf.function(call)() if options.get("backend") == "graph" else call()
    with tf.GradientTape() as tape:
        rnn = keras.layers.RNN(chain.cells[0], return_sequences=True, dtype="float64")
        outputs = rnn(embedding(ids))
        loss = loss_fn(targets, chain.head(outputs))
    reference = tape.gradient(loss, embedding.embeddings)
    got = result.grads[0]
    assert isinstance(got, tf.IndexedSlices) and isinstance(reference, tf.IndexedSlices)
    # Chunk-major rows (chunk c: rows b * K_c + t) -> the tape's [B, T] order.
    order = [
        b * steps + start + t
        for start in range(0, steps, size)
        for b in range(batch)
        for t in range(min(size, steps - start))
    ]
    np.testing.assert_array_equal(np.asarray(got.indices), ids.reshape(-1)[order])
    np.testing.assert_allclose(
        np.asarray(got.values), np.asarray(reference.values)[order], rtol=1e-10, atol=1e-12
    )


@pytest.mark.slow
def test_truncated_sums_an_embedding_s_seed_sets_row_by_row():
    """Truncated with m=2: each lookup's row comes once, its ages' cotangents added; densely
    equal to TBPTT written out with one tape and stop_gradient at the cuts."""
    chain, embedding = _embedding_chain("truncated", backprop_chunks=2)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 11, size=[3, 10])
    targets = rng.normal(size=[3, 10, 2])
    loss_fn = float64_loss(keras.losses.MeanSquaredError, reduction="sum")
    got = chain.value_and_gradients(ids, targets, loss_fn).grads[0]
    assert isinstance(got, tf.IndexedSlices) and got.values.shape[0] == 30
    rnn = keras.layers.RNN(
        chain.cells[0], return_sequences=True, return_state=True, dtype="float64"
    )
    boundaries = [tf.zeros([3, 4], "float64")]
    for j in range(3):
        boundaries.append(
            rnn(embedding(ids[:, 4 * j : 4 * j + 4]), initial_state=boundaries[-1])[1]
        )
    with tf.GradientTape() as tape:
        total = 0.0
        for j in range(3):  # L_j through chunks j-1 and j, cut before
            first = max(j - 1, 0)
            state = tf.stop_gradient(boundaries[first])
            outputs, _ = rnn(embedding(ids[:, 4 * first : 4 * j + 4]), initial_state=state)
            window = slice(4 * j, 4 * j + 4)
            steps = ids[:, window].shape[1]
            total += loss_fn(targets[:, window], chain.head(outputs[:, -steps:]))
    reference = tape.gradient(total, embedding.embeddings)
    np.testing.assert_allclose(
        tf.convert_to_tensor(got), tf.convert_to_tensor(reference), rtol=1e-10, atol=1e-12
    )


def test_under_xla_an_embedding_s_gradient_is_dense_with_a_warning():
    chain, _ = _embedding_chain("exact")
    ids = np.random.default_rng(2).integers(0, 11, size=[3, 10])
    targets = np.zeros([3, 10, 2])
    loss_fn = float64_loss(keras.losses.MeanSquaredError)
    run = tf.function(lambda: chain.value_and_gradients(ids, targets, loss_fn), jit_compile=True)
    with pytest.warns(UserWarning, match="summed densely.*jit_compile=False"):
        grads = run().grads
    assert not isinstance(grads[0], tf.IndexedSlices)

"""The memory budget: the exact backward keeps the trailing chunks that fit as one run (only the
chunks before them run twice), and the gradient is the one-tape gradient whatever it keeps."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close, float64_loss, l1_loss, make_sequence
from references import full_bptt

import tbptt
from tbptt._src.core import chunking

F64 = 1e-10
BATCH, STEPS, CHUNK = 3, 23, 4  # 6 chunks, the last one short


def gru_chain(cell=None, **kwargs):
    cells = [
        cell or keras.layers.GRUCell(5, dtype="float64"),
        keras.layers.GRUCell(3, dtype="float64"),
    ]
    return tbptt.RecurrentChain(
        cells, head=keras.layers.Dense(2, dtype="float64"), chunk_size=CHUNK, **kwargs
    )


def budget_for(chain, kept: int) -> float:
    """The budget that keeps `kept` trailing chunks of this module's calls, from the chain's
    own plans keeping one chunk and keeping all."""
    one = chain.with_config(memory_budget=None).chunk_plan(STEPS, BATCH, features=4)
    every = chain.with_config(memory_budget=1e15).chunk_plan(STEPS, BATCH, features=4)
    per_step = (every.estimated_bytes - one.estimated_bytes) / (STEPS - CHUNK)
    states = one.estimated_bytes - CHUNK * per_step
    return states + kept * CHUNK * per_step + 1


def data():
    return (
        make_sequence(BATCH, STEPS, 4, "float64"),
        make_sequence(BATCH, STEPS, 2, "float64", offset=0.5),
    )


@pytest.mark.parametrize("kept", [1, 2, 4, 6])
@pytest.mark.default_cases("4")
def test_chunk_plan_reports_the_trailing_chunks_the_budget_keeps(kept):
    chain = gru_chain()
    chain = chain.with_config(memory_budget=budget_for(chain, kept))
    plan = chain.chunk_plan(STEPS, BATCH, features=4)
    assert (plan.chunks, plan.kept_chunks) == (6, kept)
    assert plan.estimated_bytes <= chain.memory_budget


def test_the_default_keeps_everything_that_fits_and_nothing_else():
    chain = gru_chain()
    assert chain.memory_budget == "auto"
    assert chain.chunk_plan(STEPS, BATCH, features=4).kept_chunks == 6
    # 200k steps of 8 rows: more than the default budget, so the least memory
    long = chain.chunk_plan(200_000, 8, features=4)
    assert long.kept_chunks == 1
    assert long.estimated_bytes < chunking.DEFAULT_MEMORY_BUDGET / 10
    assert gru_chain(memory_budget=None).chunk_plan(STEPS, BATCH, features=4).kept_chunks == 1
    auto = tbptt.RecurrentChain([keras.layers.GRUCell(5)], chunk_size="auto")
    assert auto.chunk_plan(1000, 8, features=4).chunk_size == 1000  # one chunk: it fits
    assert auto.chunk_plan(10**6, 8, features=4).chunk_size == 1000  # about sqrt(T)


def test_truncation_and_two_levels_keep_nothing():
    for options in ({"mode": "truncated", "backprop_chunks": 2}, {"levels": 2}):
        chain = gru_chain(**options)
        assert chain.chunk_plan(STEPS, BATCH, features=4).kept_chunks == 1


@pytest.mark.parametrize("kept", [2, 4, 6])
@pytest.mark.parametrize("backend", ["eager", "graph"])
@pytest.mark.parametrize("context", ["call", "tf.function", "jit"])
@pytest.mark.default_cases("call-eager-4", "tf.function-graph-6", "jit-eager-6")
def test_kept_runs_give_the_one_tape_gradient(kept, backend, context):
    """Runs of 2 (the first one short of nothing: 6 = 2+2+2), 4 (a first run of 2) and all 6
    against one tape over Keras's RNN, with a state in and a cotangent of the final state."""
    x, y = data()
    chain = gru_chain(backend=backend)
    chain = chain.with_config(memory_budget=budget_for(chain, kept))
    state = tf.nest.map_structure(lambda s: s + 0.2, chain.initial_state(BATCH))
    final_grad = tf.nest.map_structure(lambda s: tf.ones_like(s) * 0.3, state)

    def call():
        result = chain.value_and_gradients(x, y, l1_loss, state, final_state_grad=final_grad)
        return result.loss, result.grads, result.final_state, result.initial_state_grad

    if context != "call":
        call = tf.function(call, jit_compile=context == "jit")
    got = call()
    expected = full_bptt(chain, x, y, l1_loss, state, final_grad)
    for name, a, b in zip(["loss", "grads", "final_state", "state_grad"], got, expected):
        assert_all_close(a, b, F64, name)


@pytest.mark.parametrize(
    "cell",
    ["lstm", "simple_rnn", "relu_gru"],
)
@pytest.mark.default_cases("lstm")
def test_kept_runs_of_every_cell_kind_with_flags_and_weights(cell):
    """Each loop kind (a written-out LSTM, a cell pulled back step by step) under runs of 4,
    with resets, a mask and sample weights, against the same chain keeping nothing."""
    make = {
        "lstm": lambda: keras.layers.LSTMCell(5, dtype="float64"),
        "simple_rnn": lambda: keras.layers.SimpleRNNCell(5, dtype="float64"),
        "relu_gru": lambda: keras.layers.GRUCell(5, activation="relu", dtype="float64"),
    }[cell]
    x, y = data()
    rng = np.random.default_rng(3)
    reset = rng.random([BATCH, STEPS]) < 0.15
    mask = rng.random([BATCH, STEPS]) < 0.8
    weights = rng.random([BATCH, STEPS])
    loss_fn = float64_loss(keras.losses.MeanSquaredError)
    chain = gru_chain(make(), memory_budget=None)
    reference = chain.value_and_gradients(
        x, y, loss_fn, reset=reset, mask=mask, sample_weight=weights
    )
    kept = chain.with_config(memory_budget=budget_for(chain, 4))
    assert kept.chunk_plan(STEPS, BATCH, features=4).kept_chunks == 4
    got = kept.value_and_gradients(x, y, loss_fn, reset=reset, mask=mask, sample_weight=weights)
    assert_all_close(got.loss, reference.loss, F64, "loss")
    assert_all_close(got.grads, reference.grads, F64, "grads")


def test_kept_runs_replay_a_head_s_dropout_as_each_chunk_draws_it():
    """The draws of a chunk do not depend on what is kept: the same seeds give the same
    gradient keeping nothing, runs of 2, or everything."""
    x, y = data()
    results = []
    for budget in (None, 2, 6):
        keras.utils.set_random_seed(5)
        head = keras.Sequential(
            [keras.layers.Dropout(0.3, seed=7), keras.layers.Dense(2, dtype="float64")]
        )
        chain = tbptt.RecurrentChain(
            [keras.layers.GRUCell(5, dtype="float64"), keras.layers.GRUCell(3, dtype="float64")],
            head=head,
            chunk_size=CHUNK,
            dtype="float64",
            memory_budget=None,
        )
        if budget is not None:
            chain = chain.with_config(memory_budget=budget_for(chain, budget))
        results.append(chain.value_and_gradients(x, y, l1_loss))
    for other in results[1:]:
        assert_all_close(other.loss, results[0].loss, F64, "loss")
        assert_all_close(other.grads, results[0].grads, F64, "grads")


def test_a_stateful_stream_keeps_runs_and_trains_as_keeping_nothing():
    x, y = data()
    loss_fn = float64_loss(keras.losses.MeanSquaredError)
    finals = []
    for budget in (None, "auto"):
        keras.utils.set_random_seed(2)
        chain = gru_chain(memory_budget=budget)
        carry, losses = None, []
        for window in range(2):
            part = slice(window * 12, window * 12 + 11)
            result, carry = chain.stream_step(x[:, part], y[:, part], loss_fn, carry)
            losses.append(result.loss)
        finals.append((losses, result.grads))
    assert_all_close(finals[1][0], finals[0][0], F64, "losses")
    assert_all_close(finals[1][1], finals[0][1], F64, "grads")


def test_an_embedding_keeps_its_rows_and_nothing_is_kept():
    """An Embedding's rows (IndexedSlices) would be summed densely through a run's loop: a
    chain with one recomputes, and says so in its plan."""
    chain = tbptt.RecurrentChain(
        [keras.layers.GRUCell(4)], inputs_layer=keras.layers.Embedding(20, 3), chunk_size=4
    )
    assert chain.chunk_plan(STEPS, BATCH, features=3).kept_chunks == 1
    ids = np.random.default_rng(0).integers(0, 20, [BATCH, STEPS])
    result = chain.value_and_gradients(ids, np.zeros([BATCH, STEPS, 4]), l1_loss)
    assert isinstance(result.grads[0], tf.IndexedSlices)
    dense = chain.with_config(embedding_grads="dense")
    assert dense.chunk_plan(STEPS, BATCH, features=3).kept_chunks == 6

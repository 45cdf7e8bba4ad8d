"""The memory budget: the exact backward runs as many chunks as fit as one (a chunk that many
times longer; only the runs before the last run twice), and the gradient is the one-tape
gradient whatever it keeps."""

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
    """The budget that keeps `kept` chunks of this module's calls as one, from the chain's
    own plans keeping one chunk and keeping all (built: its head's outputs count)."""
    if not chain.built:
        chain.build([None, None, 4])
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


@pytest.mark.parametrize("fitting, kept", [(1, 1), (2, 2), (4, 3), (6, 6)])
@pytest.mark.default_cases("4-3")
def test_chunk_plan_reports_the_chunks_the_budget_keeps_as_one(fitting, kept):
    """Four of six chunks fit: runs of 3, as even as can be (runs of 4 would leave one of 2)."""
    chain = gru_chain()
    chain = chain.with_config(memory_budget=budget_for(chain, fitting))
    plan = chain.chunk_plan(STEPS, BATCH, features=4)
    assert (plan.chunks, plan.kept_chunks) == (6, kept)
    assert plan.estimated_bytes <= chain.memory_budget


@pytest.mark.default_budget
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
    fits = auto.chunk_plan(1000, 8, features=4)
    assert (fits.chunk_size, fits.kept_chunks) == (32, fits.chunks)  # about sqrt(T), one run
    long = auto.chunk_plan(10**6, 8, features=4)
    assert (long.chunk_size, long.kept_chunks) == (1000, 1)


@pytest.mark.default_budget
def test_truncation_and_two_levels_keep_nothing():
    for options in ({"mode": "truncated", "backprop_chunks": 2}, {"levels": 2}):
        chain = gru_chain(**options)
        assert chain.chunk_plan(STEPS, BATCH, features=4).kept_chunks == 1


@pytest.mark.parametrize("kept", [2, 4, 6])
@pytest.mark.parametrize("backend", ["eager", "graph"])
@pytest.mark.parametrize("context", ["call", "tf.function", "jit", "persistent_tape"])
@pytest.mark.default_cases("jit-eager-6")
def test_kept_runs_give_the_one_tape_gradient(kept, backend, context):
    """Runs of 2 (6 = 2+2+2), of 3 (four fit: 3+3, as even as can be) and all 6
    against one tape over Keras's RNN, with a state in and a cotangent of the final state."""
    x, y = data()
    chain = gru_chain(backend=backend)
    chain = chain.with_config(memory_budget=budget_for(chain, kept))
    state = tf.nest.map_structure(lambda s: s + 0.2, chain.initial_state(BATCH))
    final_grad = tf.nest.map_structure(lambda s: tf.ones_like(s) * 0.3, state)

    def call():
        result = chain.value_and_gradients(x, y, l1_loss, state, final_state_grad=final_grad)
        return result.loss, result.grads, result.final_state, result.initial_state_grad

    if context in ("tf.function", "jit"):
        call = tf.function(call, jit_compile=context == "jit")
    if context == "persistent_tape":
        with tf.GradientTape(persistent=True):  # a user's tape around the call
            got = call()
    else:
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
    """Each loop kind (a written-out LSTM, a cell pulled back step by step) under runs of 3,
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
    kept = chain.with_config(memory_budget=budget_for(chain, 3))
    assert kept.chunk_plan(STEPS, BATCH, features=4).kept_chunks == 3
    got = kept.value_and_gradients(x, y, loss_fn, reset=reset, mask=mask, sample_weight=weights)
    assert_all_close(got.loss, reference.loss, F64, "loss")
    assert_all_close(got.grads, reference.grads, F64, "grads")


@pytest.mark.slow
def test_a_kept_run_draws_as_one_chunk_of_its_length():
    """A run of kept chunks is one chunk that many times longer: its head's dropout draws what
    a chain of that chunk size draws, and its gradient is that chain's (runs of 2 and of all
    6 chunks, against chunks of 8 and 24 steps keeping nothing)."""
    x, y = data()

    def chain(chunk_size, budget):
        keras.utils.set_random_seed(5)
        head = keras.Sequential(
            [keras.layers.Dropout(0.3, seed=7), keras.layers.Dense(2, dtype="float64")]
        )
        made = tbptt.RecurrentChain(
            [keras.layers.GRUCell(5, dtype="float64"), keras.layers.GRUCell(3, dtype="float64")],
            head=head,
            chunk_size=chunk_size,
            dtype="float64",
            memory_budget=budget,
        )
        made.build(x.shape)  # the weights drawn now, from the seed
        return made

    for kept, chunk_size in ((2, 8), (6, 24)):
        runs = chain(CHUNK, None)
        runs = runs.with_config(memory_budget=budget_for(runs, kept))
        got = runs.value_and_gradients(x, y, l1_loss)
        expected = chain(chunk_size, None).value_and_gradients(x, y, l1_loss)
        assert_all_close(got.loss, expected.loss, F64, "loss")
        assert_all_close(got.grads, expected.grads, F64, "grads")


@pytest.mark.default_budget
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


@pytest.mark.default_budget
def test_a_kept_run_keeps_an_embedding_s_rows():
    """An Embedding's gradient stays rows of lookups (IndexedSlices), one per step of the
    call, whatever is kept; the rows add up to the dense gradient of the chain keeping
    nothing."""
    keras.utils.set_random_seed(1)
    chain = tbptt.RecurrentChain(
        [keras.layers.GRUCell(4, dtype="float64")],
        inputs_layer=keras.layers.Embedding(20, 3, dtype="float64"),
        chunk_size=4,
        dtype="float64",
    )
    assert chain.chunk_plan(STEPS, BATCH, features=3).kept_chunks == 6
    ids = np.random.default_rng(0).integers(0, 20, [BATCH, STEPS])
    targets = np.random.default_rng(1).normal(size=[BATCH, STEPS, 4])
    got = chain.value_and_gradients(ids, targets, l1_loss).grads[0]
    assert isinstance(got, tf.IndexedSlices) and got.values.shape[0] == BATCH * STEPS
    least = chain.with_config(memory_budget=None).value_and_gradients(ids, targets, l1_loss)
    assert_all_close(tf.convert_to_tensor(got), tf.convert_to_tensor(least.grads[0]), F64)


@pytest.mark.default_budget
def test_auto_chunks_under_the_default_budget_run_in_a_function_and_in_fit():
    """chunk_size="auto" with the default budget plans in Python inside a trace too, and a
    batch unknown there (Keras's fit) is not taken for one row: the chunk size stays about
    sqrt(T) and the compiled call keeps what its real batch fits."""
    x, y = data()
    chain = tbptt.StatefulGRUChain(
        (5, 3), head=keras.layers.Dense(2, dtype="float64"), chunk_size="auto", dtype="float64"
    )
    plan = chain.chunk_plan(STEPS, BATCH, features=4)
    assert (plan.chunk_size, plan.kept_chunks) == (5, plan.chunks)  # ceil(sqrt(23)), all kept
    expected = full_bptt(chain, x, y, l1_loss)
    got = tf.function(lambda: chain.value_and_gradients(x, y, l1_loss))()
    assert_all_close(got.grads, expected[1], F64, "grads")
    if int(keras.__version__.split(".")[0]) >= 3:
        model = tbptt.keras.ChunkedModel(
            tbptt.StatefulGRUChain(4, head=keras.layers.Dense(2), chunk_size="auto")
        )
        model.compile(optimizer="sgd", loss="mse")
        history = model.fit(x.astype("float32"), y.astype("float32"), batch_size=3, verbose=0)
        assert np.isfinite(history.history["loss"][-1])

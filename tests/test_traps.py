"""Structural traps: edge shapes, state that reaches no loss, resets at the cuts, float64 all the
way, and float32 drift over long chains, each against an independent reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from cells import make_cells
from conftest import assert_all_close, l1_loss, make_sequence
from references import full_bptt, truncated_reference

import tbptt

# (mode, backend): the exact gradient on both backends, and truncation with m=2.
EXECUTIONS = [("exact", "eager"), ("exact", "graph"), ("truncated", "eager")]
M = 2


def make_chain(execution, chunk_size, kind="gru", features=3, head="dense", dtype="float64"):
    mode, backend = execution
    keras.utils.set_random_seed(5)
    heads = {
        "dense": keras.layers.Dense(2, dtype=dtype),
        "none": None,
        "zero": lambda top: 0.0 * top[..., :2],
        "constant": lambda top: tf.zeros_like(top[..., :2]),
    }
    return tbptt.RecurrentChain(
        make_cells(kind, features, dtype),
        chunk_size=chunk_size,
        head=heads[head],
        mode=mode,
        backend=backend,
        backprop_chunks=M if mode == "truncated" else 1,
        dtype=dtype,
    )


def reference(chain, x, y, loss_fn):
    """(grads, initial_state_grad) from one tape: full BPTT, or per-chunk stop_gradient tapes."""
    if chain.mode == "exact":
        _, grads, _, state_grad = full_bptt(chain, x, y, loss_fn)
    else:
        _, grads, state_grad = truncated_reference(
            chain, x, y, loss_fn, M, chain.initial_state(x.shape[0])
        )
    zeros = lambda g, v: tf.zeros_like(v) if g is None else g  # noqa: E731
    return [zeros(g, v) for g, v in zip(grads, chain.trainable_variables)], state_grad


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize(
    "steps,chunk_size,batch,kind",
    [
        (7, 1, 2, "lstm"),  # chunks of one step
        (3, 10, 2, "gru"),  # T < chunk_size: one short chunk
        (9, 4, 1, "stacked"),  # batch size 1, ragged last chunk
        (1, 1, 1, "custom"),  # one step, one row
    ],
)
@pytest.mark.default_cases("7-1-2-lstm-execution0")
def test_edge_shapes_match_the_reference(execution, steps, chunk_size, batch, kind):
    chain = make_chain(execution, chunk_size, kind)
    x, y = make_sequence(batch, steps, 3, "float64"), make_sequence(batch, steps, 2, "float64", 1.0)
    result = chain.value_and_gradients(x, y, l1_loss)
    grads, state_grad = reference(chain, x, y, l1_loss)
    assert_all_close(result.grads, grads, 1e-10, "grads")
    assert_all_close(result.initial_state_grad, state_grad, 1e-10, "initial_state_grad")
    outputs, final_state = chain(x)
    assert_all_close([result.loss], [l1_loss(y, outputs)], 1e-12, "loss")
    # To float64 rounding: a call of at most 8 steps runs its loop unrolled (the online step).
    assert_all_close(result.final_state, final_state, 1e-14, "final_state")


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("head", ["zero", "constant"])
@pytest.mark.default_cases("zero-execution0")
def test_state_that_reaches_no_loss_gets_zero_gradients(execution, head):
    """A head that ignores the state ("zero": multiplied by 0, "constant": not connected at
    all): every cell gradient and the initial-state gradient are zeros, never None or NaN."""
    chain = make_chain(execution, 3, "lstm", head=head)
    x, y = make_sequence(2, 8, 3, "float64"), make_sequence(2, 8, 2, "float64", 1.0)
    result = chain.value_and_gradients(x, y, l1_loss)
    assert len(result.grads) == len(chain.trainable_variables) > 0
    for g, v in zip(result.grads, chain.trainable_variables):
        assert g.shape == v.shape and not np.any(g.numpy())
    assert not any(np.any(s.numpy()) for s in tf.nest.flatten(result.initial_state_grad))
    assert_all_close([result.loss], [l1_loss(y, tf.zeros_like(y))], 1e-12)


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.default_cases("execution0")
def test_resets_at_every_cut_make_the_chunks_independent(execution):
    """With a reset at each chunk's first step no gradient crosses a cut: every mode's gradient
    is the sum of separate tapes over the chunks, each from a zero state."""
    size, steps = 3, 10
    chain = make_chain(execution, size, "gru")
    x, y = make_sequence(2, steps, 3, "float64"), make_sequence(2, steps, 2, "float64", 1.0)
    reset = np.zeros([2, steps], bool)
    reset[:, ::size] = True
    ones = tf.nest.map_structure(tf.ones_like, chain.initial_state(2))
    result = chain.value_and_gradients(x, y, l1_loss, initial_state=ones, reset=reset)
    with tf.GradientTape() as tape:
        total = tf.add_n(
            [
                l1_loss(y[:, s : s + size], chain(x[:, s : s + size])[0])
                for s in range(0, steps, size)
            ]
        )
    assert_all_close(result.grads, tape.gradient(total, chain.trainable_variables), 1e-10)
    assert not np.any(result.initial_state_grad[0].numpy())  # the reset at step 0 cuts it


def test_float64_throughout():
    """Every value the chain returns is float64, and the gradient matches float64 central
    finite differences of the loss."""
    chain = make_chain(("exact", "eager"), 4, "gru", features=2)
    x, y = make_sequence(1, 9, 2, "float64"), make_sequence(1, 9, 2, "float64", 1.0)
    result = chain.value_and_gradients(x, y, l1_loss)
    returned = (
        [result.loss]
        + result.grads
        + tf.nest.flatten([result.final_state, result.initial_state_grad])
    )
    assert {t.dtype for t in returned} == {tf.float64}
    variable = chain.trainable_variables[1]  # the recurrent kernel: gradient through the cuts
    index, eps = (1, 2), 1e-6
    values = variable.numpy()
    losses = []
    for sign in (1, -1):
        shifted = values.copy()
        shifted[index] += sign * eps
        variable.assign(shifted)
        losses.append(float(l1_loss(y, chain(x)[0])))
    variable.assign(values)
    finite_difference = (losses[0] - losses[1]) / (2 * eps)
    assert abs(result.grads[1].numpy()[index] - finite_difference) <= 1e-7 * max(
        1.0, abs(finite_difference)
    )


@pytest.mark.slow
def test_float32_drift_over_10k_steps_stays_at_rounding_level():
    """benchmarks/drift.py, one row: at T=10,000 the float32 chunked gradient is as close to
    the float64 one as one float32 tape over the whole sequence is (closer: it sums per chunk,
    then over chunks). Measured: 1.4e-7 chunked, 1.8e-6 one tape (README, float32 drift)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import drift

    row = drift.measure(10_000)
    assert row["chunked_f64"] < 1e-12
    assert row["chunked_f32"] < min(1e-5, 2 * row["one_tape_f32"])

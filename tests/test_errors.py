"""Bad input gets a clear ValueError/TypeError naming the argument, before any tracing, and a
rejected call leaves the chain working."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tbptt
from conftest import assert_all_close, make_sequence, sum_squares


def gru(**kwargs):
    kwargs.setdefault("chunk_size", 3)
    kwargs.setdefault("head", keras.layers.Dense(2))
    return tbptt.StatefulGRUChain(4, **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int .* got 0"),
    ({"chunk_size": -3}, ValueError, "chunk_size"),
    ({"chunk_size": 2.5}, TypeError, "chunk_size"),
    ({"chunk_size": True}, TypeError, "chunk_size"),
    ({"mode": "full"}, ValueError, r"mode must be one of \('exact', 'truncated'\), got 'full'"),
    ({"backend": "jax"}, ValueError, "backend must be one of"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"mode": "truncated", "backprop_chunks": 0}, ValueError, "backprop_chunks"),
    ({"backprop_chunks": 2}, ValueError, "only applies to mode='truncated'"),
    ({"backend": "graph", "compiled": False}, ValueError, "compiled=True"),
    ({"head": "dense"}, TypeError, "head must be"),
])
def test_bad_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        gru(**kwargs)


@pytest.mark.parametrize("units,error", [((), ValueError), (0, ValueError), ((4, -1), ValueError),
                                         ("4", ValueError), (None, TypeError)])
def test_bad_units(units, error):
    with pytest.raises(error, match="units"):
        tbptt.StatefulGRUChain(units, chunk_size=2)


@pytest.mark.parametrize("cells", [[], None, [object()], "gru"])
def test_bad_cells(cells):
    with pytest.raises(TypeError, match="cells"):
        tbptt.RecurrentChain(cells, chunk_size=2)


def test_dtype_conflict_with_a_built_cell():
    cell = keras.layers.GRUCell(3)
    cell.build((None, 2))
    with pytest.raises(ValueError, match="already built in float32"):
        tbptt.RecurrentChain([cell], chunk_size=2, dtype="float64")


X, Y = make_sequence(2, 7, 3), make_sequence(2, 7, 2, offset=1.0)


@pytest.mark.parametrize("call,error,match", [
    (lambda c: c.value_and_gradients(X[0], Y, sum_squares), ValueError, r"rank 3.*\[7, 3\]"),
    (lambda c: c.value_and_gradients(X[:, :0], Y[:, :0], sum_squares), ValueError,
     "at least one time step"),
    (lambda c: c.value_and_gradients(X, Y[:, :5], sum_squares), ValueError,
     r"targets must share \[batch, time\] = \[2, 7\].*\[2, 5, 2\]"),
    (lambda c: c.value_and_gradients(X, Y[:1], sum_squares), ValueError, "targets"),
    (lambda c: c.value_and_gradients(X, Y, sum_squares, sample_weight=np.ones([2, 6])),
     ValueError, "sample_weight"),
    (lambda c: c.value_and_gradients(X, Y, "mse"), TypeError, "loss_fn must be callable"),
    (lambda c: c.value_and_gradients(X, Y, lambda a, b: a - b), ValueError,
     "loss_fn must return a scalar"),
    (lambda c: c.value_and_gradients(X, Y, sum_squares, initial_state=(tf.zeros([2, 4]),) * 2),
     ValueError, "initial_state must be a nest of 1 tensors"),
    (lambda c: c.value_and_gradients(X, Y, sum_squares, initial_state=tf.zeros([2, 5])),
     ValueError, r"initial_state: entry 0 must have shape \[2, 4\]"),
    (lambda c: c.value_and_gradients(X, Y, sum_squares, initial_state=tf.zeros([3, 4])),
     ValueError, "batch size"),
    (lambda c: c.value_and_gradients(X, Y, sum_squares, final_state_grad=tf.zeros([2, 3])),
     ValueError, "final_state_grad: entry 0"),
    (lambda c: c(X[..., :2]), ValueError, "must have 3 features"),
    (lambda c: c.initial_state(0), ValueError, "batch_size"),
])
def test_bad_call_raises_and_leaves_the_chain_working(call, error, match):
    chain = gru()
    before = chain.value_and_gradients(X, Y, sum_squares)
    with pytest.raises(error, match=match):
        call(chain)
    after = chain.value_and_gradients(X, Y, sum_squares)
    assert_all_close([after.loss] + after.grads, [before.loss] + before.grads, 0.0)


def test_final_state_grad_with_one_chunk_truncation_is_refused():
    chain = gru(mode="truncated")
    with pytest.raises(ValueError, match="would be dropped"):
        chain.value_and_gradients(X, Y, sum_squares, final_state_grad=tf.ones([2, 4]))

"""chunk_size="auto", memory budgets and two-level checkpointing against the one-tape reference."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close, l1_loss, make_sequence
from references import full_bptt

import tbptt
from tbptt._src.core import chunking

F64 = 1e-10


def gru_chain(**kwargs):
    return tbptt.StatefulGRUChain(
        (5, 3), head=keras.layers.Dense(2, dtype="float64"), dtype="float64", **kwargs
    )


def data(steps, batch=3):
    return (
        make_sequence(batch, steps, 4, "float64"),
        make_sequence(batch, steps, 2, "float64", offset=0.5),
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunk_size": "auto"},
        {"chunk_size": "auto", "levels": 2},
        {"chunk_size": 2, "levels": 2},
        {"chunk_size": 3, "levels": 2, "backend": "graph"},
        {"chunk_size": "auto", "memory_budget": 12000},
    ],
    ids=["auto", "auto-levels2", "k2-levels2", "k3-levels2-graph", "budget"],
)
@pytest.mark.default_cases("auto")
def test_exact_gradient_whatever_the_chunking(kwargs):
    x, y = data(37)
    chain = gru_chain(**kwargs)
    state = tf.nest.map_structure(lambda s: s + 0.2, chain.initial_state(3))
    final_grad = tf.nest.map_structure(lambda s: tf.ones_like(s) * 0.3, state)
    result = chain.value_and_gradients(x, y, l1_loss, state, final_state_grad=final_grad)
    loss, grads, final_state, state_grad = full_bptt(chain, x, y, l1_loss, state, final_grad)
    assert_all_close(result.loss, loss, F64, "loss")
    assert_all_close(result.grads, grads, F64, "grads")
    assert_all_close(result.final_state, final_state, F64, "final_state")
    assert_all_close(result.initial_state_grad, state_grad, F64, "initial_state_grad")


@pytest.mark.slow
def test_auto_is_about_sqrt_t_and_one_trace_serves_every_length():
    chain = gru_chain(chunk_size="auto", memory_budget=None)
    for steps in (10, 50, 101):
        x, y = data(steps)
        chain.value_and_gradients(x, y, l1_loss)
        assert chain.chunk_plan(steps).chunk_size == math.ceil(math.sqrt(steps))
    assert chain.trace_count == 1


def test_levels_2_keeps_about_cube_root_states():
    chain = gru_chain(chunk_size="auto", levels=2)
    plan = chain.chunk_plan(1_000_000, features=4)
    assert plan.chunk_size == 100 and plan.chunks == 10_000 and plan.group == 100
    one_level = gru_chain(chunk_size="auto", memory_budget=None).chunk_plan(1_000_000, features=4)
    assert plan.estimated_bytes < one_level.estimated_bytes / 5


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.default_cases("1")
def test_memory_budget_gives_the_largest_chunk_that_fits(levels):
    chain = gru_chain(chunk_size="auto", memory_budget=200_000, levels=levels)
    plan = chain.chunk_plan(10_000, batch_size=4, features=4)
    assert plan.estimated_bytes <= 200_000
    step_floats = 4 + 10 * 8 + 3 * 2  # inputs, the gates of 8 state floats, the head's outputs
    bigger = chunking.estimated_bytes(10_000, plan.chunk_size + 1, levels, 4, 8, step_floats, 8)
    assert bigger > 200_000
    assert gru_chain(chunk_size="auto", memory_budget=1e12).chunk_plan(500).chunk_size == 500


def test_a_budget_too_small_is_refused_before_tracing():
    chain = gru_chain(chunk_size="auto", memory_budget=1000)
    x, y = data(400)
    with pytest.raises(
        ValueError,
        match=r"memory_budget=1000 bytes is too small for T=400.*"
        r"levels=2",
    ):
        chain.value_and_gradients(x, y, l1_loss)
    assert chain.trace_count == 0


def test_auto_inside_a_tf_function_with_unknown_time_is_refused():
    chain = gru_chain(chunk_size="auto")
    x, y = data(12)
    chain.build(x.shape)

    @tf.function(
        input_signature=[
            tf.TensorSpec([3, None, 4], tf.float64),
            tf.TensorSpec([3, None, 2], tf.float64),
        ]
    )
    def step(x, y):
        return chain.value_and_gradients(x, y, l1_loss).loss

    with pytest.raises(ValueError, match="chunk_size='auto'.*static time dimension"):
        step(x, y)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"chunk_size": "big"}, ValueError, "chunk_size must be a positive int .* or 'auto'"),
        ({"chunk_size": 4, "levels": 3}, ValueError, "levels must be 1 or 2, got 3"),
        (
            {"chunk_size": 4, "levels": 2, "mode": "truncated"},
            ValueError,
            "levels=2 only applies to mode='exact'",
        ),
        (
            {"chunk_size": 4, "memory_budget": "lots"},
            ValueError,
            "memory_budget must be a positive number of bytes, 'auto' or None, got 'lots'",
        ),
        (
            {"chunk_size": "auto", "memory_budget": -5},
            ValueError,
            "memory_budget must be a positive",
        ),
        ({"chunk_size": "auto", "memory_budget": [1e9]}, TypeError, "memory_budget must be"),
    ],
)
@pytest.mark.default_cases("kwargs0-ValueError-chunk_size must be a positive int .* or 'auto'")
def test_bad_chunking_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        gru_chain(**kwargs)


@pytest.mark.slow
def test_two_level_float32_long_sequence_matches_one_level():
    chain = tbptt.StatefulGRUChain(8, head=keras.layers.Dense(1), chunk_size=10)
    two = tbptt.StatefulGRUChain(8, head=keras.layers.Dense(1), chunk_size=10, levels=2)
    x = np.random.RandomState(0).randn(2, 997, 3).astype("float32")
    y = np.sin(np.cumsum(x[..., :1], axis=1))
    chain.build(x.shape)
    two.build(x.shape)
    for a, b in zip(two.trainable_variables, chain.trainable_variables):
        a.assign(b)
    one_result = chain.value_and_gradients(x, y, l1_loss)
    two_result = two.value_and_gradients(x, y, l1_loss)
    assert_all_close(two_result.grads, one_result.grads, 1e-5, "grads")

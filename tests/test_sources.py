"""Chunk sources: sequences read chunk by chunk from memmaps, array-likes and callables."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close, l1_loss, make_sequence

import tbptt


def chain(**kwargs):
    return tbptt.StatefulGRUChain(
        (5, 3), head=keras.layers.Dense(2, dtype="float64"), chunk_size=4, dtype="float64", **kwargs
    )


def memmap(tmp_path, name, array):
    mapped = np.memmap(tmp_path / name, dtype=array.dtype, mode="w+", shape=array.shape)
    mapped[:] = array
    mapped.flush()
    return np.memmap(tmp_path / name, dtype=array.dtype, mode="r", shape=array.shape)


@pytest.mark.parametrize(
    "mode,backend", [("exact", "eager"), ("exact", "graph"), ("truncated", "eager")]
)
@pytest.mark.default_cases("exact-eager")
def test_memmap_inputs_and_targets_equal_in_memory(tmp_path, mode, backend):
    x, y = make_sequence(3, 14, 4, "float64"), make_sequence(3, 14, 2, "float64", offset=0.5)
    kwargs = dict(mode=mode, backend=backend, backprop_chunks=2 if mode == "truncated" else 1)
    model = chain(**kwargs)
    expected = model.value_and_gradients(x, y, l1_loss)
    result = model.value_and_gradients(memmap(tmp_path, "x", x), memmap(tmp_path, "y", y), l1_loss)
    assert_all_close([result.loss] + result.grads, [expected.loss] + expected.grads, 1e-12)
    assert_all_close(result.final_state, expected.final_state, 1e-12)
    assert_all_close(result.initial_state_grad, expected.initial_state_grad, 1e-12)


@pytest.mark.parametrize(
    "budget, expected",
    [
        (None, [(0, 4), (0, 4), (4, 8), (4, 8), (8, 10)]),
        ("auto", [(0, 10)]),
    ],
    ids=["least-memory", "all-kept"],
)
@pytest.mark.default_cases("least-memory", "all-kept")
@pytest.mark.default_budget
def test_callable_source_reads_each_chunk_as_often_as_it_runs_and_nothing_more(budget, expected):
    """With the least memory, once in the forward sweep and once in the backward recompute
    (the loop may read ahead), the last chunk only in the recompute, which gives the final
    state; when the whole call fits the budget, once, as one chunk."""
    x, y = make_sequence(2, 10, 3, "float64"), make_sequence(2, 10, 2, "float64", offset=0.5)
    reads = []

    def fetch(start, stop):
        reads.append((start, stop))
        return x[:, start:stop]

    model = chain(memory_budget=budget)
    expected_result = model.value_and_gradients(x, y, l1_loss)
    result = model.value_and_gradients(tbptt.ChunkSource(fetch, x.shape, "float64"), y, l1_loss)
    assert_all_close(result.grads, expected_result.grads, 1e-12)
    assert sorted(reads) == expected


def test_a_new_source_of_another_length_costs_no_trace(tmp_path):
    model = chain()
    for steps in (9, 13):
        x = make_sequence(2, steps, 3, "float64")
        y = make_sequence(2, steps, 2, "float64", offset=0.5)
        model.value_and_gradients(memmap(tmp_path, f"x{steps}", x), y, l1_loss)
    assert model.trace_count == 1


def test_one_pass_iterators_are_refused_with_the_reason():
    model = chain()
    chunks = (np.zeros([2, 4, 3]) for _ in range(3))
    with pytest.raises(TypeError, match="reverse order"):
        model.value_and_gradients(chunks, np.zeros([2, 12, 2]), l1_loss)


def test_bad_sources():
    with pytest.raises(ValueError, match="time > 0"):
        tbptt.ChunkSource(lambda a, b: None, shape=(2, 0, 3))
    source = tbptt.ChunkSource(lambda a, b: np.zeros([2, 1, 3]), shape=(2, 5, 3))
    with pytest.raises(ValueError, match="must return shape"):
        source.read(0, 4)
    with pytest.raises(ValueError, match="rank 3"):
        chain().value_and_gradients(
            tbptt.ChunkSource(lambda a, b: None, (2, 5)), np.zeros([2, 5, 2]), l1_loss
        )
    with pytest.raises(ValueError, match="targets must share"):
        chain().value_and_gradients(
            tbptt.ChunkSource(lambda a, b: None, (2, 5, 3)), np.zeros([2, 6, 2]), l1_loss
        )


def test_a_failing_fetch_surfaces_and_the_chain_still_works():
    x, y = make_sequence(2, 8, 3, "float64"), make_sequence(2, 8, 2, "float64", offset=0.5)
    model = chain()
    expected = model.value_and_gradients(x, y, l1_loss)
    bad = tbptt.ChunkSource(lambda a, b: np.zeros([2, 1, 3]), shape=(2, 8, 3))
    with pytest.raises(ValueError, match="must return shape"):
        model.value_and_gradients(bad, y, l1_loss)

    class Unavailable(Exception):
        pass

    def fetch(a, b):
        raise Unavailable("disk gone")

    with pytest.raises(Unavailable, match="disk gone"):  # the user's own exception
        model.value_and_gradients(tbptt.ChunkSource(fetch, shape=(2, 8, 3)), y, l1_loss)
    with pytest.raises(TypeError, match="must return numbers"):
        model.value_and_gradients(
            tbptt.ChunkSource(lambda a, b: np.full([2, b - a, 3], "x"), shape=(2, 8, 3)), y, l1_loss
        )
    again = model.value_and_gradients(x, y, l1_loss)
    assert_all_close(again.grads, expected.grads, 0.0)


@pytest.mark.parametrize("chunk_size", [4, "auto"])
@pytest.mark.default_cases("4")
def test_forward_over_a_source_equals_in_memory_and_is_differentiable(tmp_path, chunk_size):
    x = make_sequence(3, 14, 4, "float64")
    model = tbptt.StatefulGRUChain(
        (5, 3), head=keras.layers.Dense(2, dtype="float64"), chunk_size=chunk_size, dtype="float64"
    )
    state = tf.nest.map_structure(lambda s: s + 0.1, model.initial_state(3))
    weights = make_sequence(3, 14, 2, "float64", offset=0.3)

    def outputs_and_grads(inputs):
        with tf.GradientTape() as tape:
            outputs, final = model(inputs, state)
            loss = tf.reduce_sum(outputs * weights) + tf.reduce_sum(final[0])
        return [outputs, *final] + tape.gradient(loss, model.trainable_variables)

    expected = outputs_and_grads(x)
    actual = outputs_and_grads(memmap(tmp_path, "x.dat", x))
    assert actual[0].shape == (3, 14, 2)
    assert_all_close(actual, expected, 1e-12, "forward over a memmap")

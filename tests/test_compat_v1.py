"""tbptt.compat.v1: grad_ys chaining in graphs, the TF1 weight converter, the seed-001 scripts."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import LEGACY_CELLS_HERE, make_sequence

import tbptt

ROOT = Path(__file__).resolve().parents[1]


def run(args, legacy=True):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if legacy and not LEGACY_CELLS_HERE:
        env["TF_USE_LEGACY_KERAS"] = "1"
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    return out.returncode, out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.skipif(LEGACY_CELLS_HERE, reason="collected directly in this process")
def test_tf1_graph_suite_in_a_legacy_keras_process():
    code, output = run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "0",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::UserWarning",
            "tests/legacy",
        ]
    )
    assert code == 0, output[-3000:]
    assert " passed" in output


@pytest.mark.slow  # end-to-end script runs in their own processes (60 s)
@pytest.mark.parametrize(
    "experiment,expected",
    [("gru-500-500", "all four routes agree"), ("gru-minibatch", "equal one pass")],
)
@pytest.mark.default_cases("gru-500-500-all four routes agree")
def test_reproduce_seed_001(experiment, expected):
    code, output = run([sys.executable, "-m", "tbptt._src.cli", "reproduce", experiment])
    assert code == 0, output[-3000:]
    assert expected in output


@pytest.mark.slow
def test_backprop_chunks_in_a_tf_function_equals_one_tape():
    """The same grad_ys chain over Keras cells in a tf.function graph (no TF1 cells needed)."""
    cell, dense = keras.layers.GRUCell(5), keras.layers.Dense(2)
    x, y = make_sequence(2, 9, 3), make_sequence(2, 9, 2, offset=0.4)
    rnn = keras.layers.RNN(cell, return_sequences=True, return_state=True)
    rnn(x[:, :1])
    dense(tf.zeros([1, 5]))
    variables = cell.trainable_variables + dense.trainable_variables
    s0 = tf.fill([2, 5], 0.3)

    @tf.function
    def chunked(final_grad):
        state, losses, boundary = s0, [], [s0]
        for k in range(3):
            out, state = rnn(x[:, 3 * k : 3 * k + 3], initial_state=[state])
            losses.append(tf.reduce_sum(tf.abs(dense(out) - y[:, 3 * k : 3 * k + 3])))
            boundary.append(state)
        result = tbptt.compat.v1.backprop_chunks(losses, boundary, variables, final_grad)
        return result.variable_grads, result.initial_state_grad

    final_grad = tf.fill([2, 5], 0.5)
    grads, state_grad = chunked(final_grad)
    with tf.GradientTape() as tape:
        tape.watch(s0)
        out, state = rnn(x, initial_state=[s0])
        total = tf.reduce_sum(tf.abs(dense(out) - y)) + tf.reduce_sum(final_grad * state)
    expected = tape.gradient(total, variables + [s0])
    for a, b in zip(list(grads) + [state_grad], expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_backprop_chunks_refuses_eager_execution():
    with pytest.raises(RuntimeError, match="while building a graph"):
        tbptt.compat.v1.backprop_chunks([tf.constant(1.0)], [tf.zeros([1]), tf.zeros([1])])


def test_gru_weights_from_tf1_layout():
    """Gate columns move from TF1's (r, u) to Keras's (z=u, r, h), rows split into x and h."""
    inputs, units = 2, 3
    gates = np.arange((inputs + units) * 2 * units, dtype=float).reshape(inputs + units, -1)
    candidate = -np.arange((inputs + units) * units, dtype=float).reshape(inputs + units, -1)
    gates_bias, candidate_bias = np.arange(2 * units) + 100.0, np.arange(units) + 200.0
    kernel, recurrent, bias = tbptt.compat.v1.gru_weights_from_tf1(
        gates, gates_bias, candidate, candidate_bias
    )
    np.testing.assert_array_equal(kernel[:, :units], gates[:inputs, units:])  # z = TF1 u
    np.testing.assert_array_equal(kernel[:, units : 2 * units], gates[:inputs, :units])  # r
    np.testing.assert_array_equal(recurrent[:, 2 * units :], candidate[inputs:])  # h
    np.testing.assert_array_equal(
        bias, np.r_[gates_bias[units:], gates_bias[:units], candidate_bias]
    )

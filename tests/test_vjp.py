"""Both VJP backends against a Jacobian formed explicitly (in the test only)."""

import numpy as np
import pytest
import tensorflow as tf

from tbptt._src.core import vjp as vjp_lib


def vjp(backend, fn, primals, variables, seeds, want):
    linearize = vjp_lib.get_linearize(backend)
    outputs, pullback = linearize(fn, primals, variables, persistent=len(seeds) > 1)
    return outputs, pullback(seeds, want)


def setup():
    w = tf.Variable(np.array([[0.3, -0.2], [0.5, 0.1]]))
    unused = tf.Variable(np.array([1.0, 2.0]))
    s = tf.constant(np.array([[0.7, -1.1]]))

    def fn(primals):
        (h,) = primals
        out = tf.tanh(h @ w)
        return [tf.reduce_sum(out**2), out]

    return w, unused, s, fn


@pytest.mark.parametrize("backend", vjp_lib.BACKENDS)
@pytest.mark.default_cases("eager")
def test_vjp_matches_explicit_jacobian(backend):
    w, unused, s, fn = setup()
    seeds = [
        [1.5, tf.constant([[0.2, -0.4]], tf.float64)],
        [None, tf.constant([[1.0, 0.0]], tf.float64)],
    ]

    def compute():
        return vjp(backend, fn, [s], [w, unused], seeds, [True, False])

    outputs, results = tf.function(compute)() if backend == "graph" else compute()
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(s)
        loss, out = fn([s])
    for (d_vars, d_primals), seed in zip(results, seeds):
        jac_w = [tape.jacobian(loss, w), tape.jacobian(out, w)]
        jac_s = [tape.jacobian(loss, s), tape.jacobian(out, s)]
        expected_w = sum(
            np.tensordot(np.asarray(c), j, axes=np.ndim(c))
            for c, j in zip(seed, jac_w)
            if c is not None
        )
        np.testing.assert_allclose(d_vars[0], expected_w, rtol=1e-12)
        np.testing.assert_array_equal(d_vars[1], np.zeros(2))  # unconnected: zeros, not None
        if d_primals is None:
            continue
        expected_s = sum(
            np.tensordot(np.asarray(c), j, axes=np.ndim(c))
            for c, j in zip(seed, jac_s)
            if c is not None
        )
        np.testing.assert_allclose(d_primals[0], expected_s, rtol=1e-12)
    np.testing.assert_allclose(outputs[0], loss, rtol=1e-12)


def test_equal_primals_get_separate_gradients():
    z = tf.zeros([1, 2], tf.float64)
    _, [(_, d_primals)] = vjp(
        "eager", lambda p: [tf.reduce_sum(2 * p[0] + 3 * p[1])], [z, z], [], [[1.0]], [True]
    )
    np.testing.assert_array_equal(d_primals[0], [[2, 2]])
    np.testing.assert_array_equal(d_primals[1], [[3, 3]])


def test_graph_backend_refuses_eager_execution():
    with pytest.raises(RuntimeError, match="tf.function"):
        vjp("graph", lambda p: p, [tf.ones([1])], [], [[1.0]], [True])

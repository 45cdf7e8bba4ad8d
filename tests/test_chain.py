"""The segment chain on a toy core with a closed-form gradient, on both backends."""

import numpy as np
import pytest
import tensorflow as tf

from tbptt._src.core import chain as chain_lib
from tbptt._src.core import schedules
from tbptt._src.core import segments as segments_lib
from tbptt._src.core import vjp as vjp_lib

A, C = 0.8, 1.3
XS = np.array([0.5, -1.0, 2.0, 0.25, 1.5, -0.75])  # one step per segment
S0 = 0.4


def toy_segments(a, c):
    """s_k = a s_{k-1} + x_k ;  L_k = c s_k  (k = 1 .. n)."""
    xs = tf.constant(XS)

    def advance(k, carry):
        return [a * carry[0] + xs[k]]

    def segment(k, carry):
        s = a * carry[0] + xs[k]
        return c * tf.reduce_sum(s), [s]

    return segments_lib.Segments(tf.constant(len(XS)), advance, segment)


def states():
    s = [S0]
    for x in XS:
        s.append(A * s[-1] + x)
    return s


def closed_form(m=None, final_grad=0.0):
    """d(sum_j L_j + final_grad * s_n)/d(a, c, s_0), the cotangent of L_j dropped after m steps."""
    n, s = len(XS), states()
    m = 10**6 if m is None else m  # exact: nothing is ever dropped
    da = dc = ds0 = 0.0
    for j in range(1, n + 1):
        dc += s[j]
        depth = min(m, j)  # segments L_j reaches back through
        # s_j = a^depth s_{j-depth} + sum_{i<depth} a^i x_{j-i}, with s_{j-depth} held fixed
        da += C * (
            depth * A ** (depth - 1) * s[j - depth]
            + sum(i * A ** (i - 1) * XS[j - i - 1] for i in range(1, depth))
        )
        if j < m:
            ds0 += C * A**j
    if final_grad:
        depth = min(m - 1, n)  # the final cotangent arrives having crossed one cut already
        da += final_grad * (
            depth * A ** (depth - 1) * s[n - depth]
            + sum(i * A ** (i - 1) * XS[n - i - 1] for i in range(1, depth))
        )
        if n < m - 1:
            ds0 += final_grad * A**n
    return da, dc, ds0


def run(backend, m=None, final_grad=None):
    a = tf.Variable(A, dtype=tf.float64)
    c = tf.Variable(C, dtype=tf.float64)

    def compute():
        carry_grad = None if final_grad is None else [tf.constant(final_grad, tf.float64)]
        schedule = schedules.Exact() if m is None else schedules.Truncated(m)
        return chain_lib.gradients(
            toy_segments(a, c),
            [tf.constant(S0, tf.float64)],
            [a, c],
            vjp_lib.get_linearize(backend),
            schedule,
            loss_dtype=tf.float64,
            final_carry_grad=carry_grad,
        )

    return tf.function(compute)() if backend == "graph" else compute()


@pytest.mark.parametrize("backend", ["eager", "graph"])
@pytest.mark.parametrize("final_grad", [None, 0.6])
@pytest.mark.default_cases("None-eager")
def test_exact_matches_closed_form(backend, final_grad):
    result = run(backend, final_grad=final_grad)
    da, dc, ds0 = closed_form(final_grad=final_grad or 0.0)
    np.testing.assert_allclose([g.numpy() for g in result.grads], [da, dc], rtol=1e-12)
    np.testing.assert_allclose(result.initial_carry_grad[0], ds0, rtol=1e-12)
    np.testing.assert_allclose(result.loss, C * sum(states()[1:]), rtol=1e-12)
    np.testing.assert_allclose(result.final_carry[0], states()[-1], rtol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "graph"])
@pytest.mark.parametrize("m", [3, 1, 2, 5, 6, 7])
@pytest.mark.default_cases("3-eager")
def test_truncated_matches_closed_form(backend, m):
    final_grad = None if m == 1 else 0.6
    result = run(backend, m=m, final_grad=final_grad)
    da, dc, ds0 = closed_form(m=m, final_grad=final_grad or 0.0)
    np.testing.assert_allclose([g.numpy() for g in result.grads], [da, dc], rtol=1e-12)
    np.testing.assert_allclose(result.initial_carry_grad[0], ds0, rtol=1e-12, atol=1e-15)


def test_closed_form_truncation_is_not_vacuous():
    exact, truncated = closed_form(), closed_form(m=2)
    assert abs(exact[0] - truncated[0]) > 0.1 and abs(exact[2] - truncated[2]) > 0.1

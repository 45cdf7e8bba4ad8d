"""The time chain over any core `core(x [B, K, F], state) -> (y [B, K, O], state)`: a plain
function and a tf.Module work as well as a stack of Keras cells, against one tape."""

import numpy as np
import pytest
import tensorflow as tf

import tbptt
from tbptt._src.core import chain as chain_lib
from tbptt._src.core import schedules
from tbptt._src.core import vjp as vjp_lib
from tbptt._src.recurrent import calls, losses, timechain

A, C = 0.8, 1.3


class LeakyCore(tf.Module):
    """s_t = a s_{t-1} + x_t ;  y_t = c s_t, over a chunk with `tbptt.unroll`."""

    def __init__(self):
        super().__init__()
        self.a = tf.Variable(A, dtype=tf.float64)
        self.c = tf.Variable(C, dtype=tf.float64)

    def __call__(self, x, state):
        def step(x_t, s):
            s = self.a * s[0] + x_t
            return self.c * s, [s]

        return tbptt.unroll(step, x, state)


def function_core(module):
    return lambda x, state: module(x, state)  # a lambda: no variables of its own


def as_core(fn):
    """A plain `fn(x [B, K, F], state) -> (y [B, K, O], state)` with the core contract."""

    def core(
        x, state, *, training=True, flags=None, with_outputs=True, loop=None, draws=None, chunk=0
    ):
        assert flags is None
        y, state = fn(x, list(state))
        return (y if with_outputs else None), list(state)

    return core


def loss_fn(y_true, y_pred):
    return tf.reduce_sum(tf.square(y_true - y_pred))


def inputs():
    x = np.sin(np.arange(1.0, 23.0)).reshape(1, 11, 2)
    return tf.constant(x), tf.constant(np.cos(x))


@pytest.mark.parametrize("backend", ["eager", "graph"])
@pytest.mark.parametrize("kind", ["module", "function"])
@pytest.mark.default_cases("module-eager")
def test_a_plain_core_gives_the_full_bptt_gradient(kind, backend):
    module = LeakyCore()
    core = as_core(module if kind == "module" else function_core(module))
    x, y = inputs()
    s0 = [tf.constant([[0.4, -0.2]], tf.float64)]
    call = calls.Call(calls.Batch(x, y), s0, tf.constant(4))

    def compute():
        segments = timechain.segments(core, call, loss_fn, losses.Reduction("sum"), tf.float64)
        return chain_lib.gradients(
            segments,
            s0,
            list(module.trainable_variables),
            vjp_lib.get_linearize(backend),
            schedules.Exact(),
            loss_dtype=tf.float64,
        )

    result = tf.function(compute)() if backend == "graph" else compute()
    with tf.GradientTape() as tape:
        tape.watch(s0)
        outputs, final = module(x, s0)
        loss = loss_fn(y, outputs)
    grads, state_grad = tape.gradient(loss, [list(module.trainable_variables), s0])
    np.testing.assert_allclose(result.loss, loss, rtol=1e-12)
    np.testing.assert_allclose(
        [g.numpy() for g in result.grads], [g.numpy() for g in grads], rtol=1e-12
    )
    np.testing.assert_allclose(result.initial_carry_grad[0], state_grad[0], rtol=1e-12)
    np.testing.assert_allclose(result.final_carry[0], final[0], rtol=1e-12)


def test_masked_weight_broadcasts_over_trailing_axes_only():
    """A [B, T, 1] weight with a [B, T] mask stays [B, T, 1] even when B == T."""
    weight = tf.reshape(tf.range(1.0, 10.0), [3, 3, 1])
    mask = tf.constant([[True, False, True]] * 3)
    masked = timechain.masked_weight(weight, mask, tf.float32)
    assert masked.shape == (3, 3, 1)
    np.testing.assert_allclose(masked[..., 0], weight[..., 0] * tf.cast(mask, tf.float32))

"""A time loop compiled with XLA on its own, differentiated by its written-out backward.

XLA fuses a step's element-wise ops into a few kernels and runs the loop without TensorFlow's
per-op cost, which at these sizes is most of a step. The chunk loops around them stay in
TensorFlow. Autodiff of a `tf.while_loop` pushes every intermediate of every step onto a stack
and pops it in a loop of one gradient op per forward op; here the forward keeps only what the
backward needs (the gates), and the backward loop is written out beside it (`gru.py`,
`lstm.py`, `any_cell.py`).
"""

import functools

import tensorflow as tf


@functools.cache
def loop_function(fn, jit: bool, **static):
    """`loop_call` of `fn(*tensors, **static)`: one per function and static setting, shared
    by every chain, traced per shape and dtype."""
    return loop_call(functools.partial(fn, **static), jit)


def loop_call(plain, jit: bool):
    """`plain(*tensors)` (with `jit`, compiled with XLA) that no tape sees inside.

    A tape recording inside would make TensorFlow keep every step's intermediates for
    autodiff (accumulators that XLA cannot size). The loops run here are differentiated by
    their written-out backward; only a second derivative (a gradient penalty, or TensorFlow
    preparing one for a persistent tape or a SavedModel) differentiates the call itself, and
    gets the autodiff of the same loop run without XLA: the exact derivative, at the speed of
    the step-by-step loop."""
    run = tf.function(plain, jit_compile=True, autograph=False) if jit else plain

    @tf.function(autograph=False)  # shapes kept: the loops read static sizes
    def vjp(args, seeds):
        floats = [a for a in args if a.dtype.is_floating]  # not the steps to run
        with tf.GradientTape() as tape:
            tape.watch(floats)
            again = tf.nest.flatten(plain(*args))
        grads = tape.gradient(again, floats, output_gradients=seeds)
        return [tf.zeros_like(a) if g is None else g for a, g in zip(floats, grads)]

    @tf.custom_gradient
    def call(*args):
        outputs = run(*[tf.stop_gradient(a) for a in args])

        def grad(*d_outputs):
            seeds = [
                tf.zeros_like(y) if d is None else d
                for y, d in zip(tf.nest.flatten(outputs), d_outputs)
            ]
            floats = iter(vjp(list(args), seeds))
            return [next(floats) if a.dtype.is_floating else None for a in args]

        return outputs, grad

    return call

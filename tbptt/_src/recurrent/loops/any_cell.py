"""The compiled time loops of any step with explicit weights, and their backward.

A step without a written-out transpose (other activations, recurrent dropout, SimpleRNNCell,
custom Keras cells run on their weights) gets compiled loops too: the forward keeps the state
entering each step, and the backward loop runs each step again under a tape and pulls the
step's cotangent back through it, a fixed-size computation per step, compiled as the forward
is.
"""

import functools
from typing import NamedTuple

import tensorflow as tf

from tbptt._src.recurrent.loops import compiled, timeloop


def _zeros_for_none(values: list, like: list) -> list:
    return [tf.zeros_like(x) if v is None else v for v, x in zip(values, like)]


class Counts(NamedTuple):
    """How a step's flat arguments split: weights, state leaves, flags (their kinds); and
    whether a masked row outputs its kept first state (see `timeloop.flagged`)."""

    weights: int
    states: int
    kinds: tuple
    output_is_state: bool = False

    def split(self, values) -> tuple:
        w, s = self.weights, self.states
        return list(values[:w]), list(values[w : w + s]), tuple(values[w + s :])


def forward_loop(step, counts: Counts, xs, length, *rest):
    """``step(x_t, states, weights)`` over the first `length` steps of ``xs [P, B, F]``, each
    `timeloop.flagged`: ``[outputs [P, B, U], *saved [P, B, ...] (the state leaves entering
    each step, after any reset), *last states]``."""
    weights, states, flags = counts.split(rest)
    inputs = timeloop.readable(xs)
    flags_at = timeloop.flag_steps(flags, counts.kinds)
    size = timeloop.length_of(xs)

    def body(t, states, outputs, saved):
        reset, mask = flags_at(t)
        entered = timeloop.entering(states, reset)
        y, new_states = step(inputs.read(t), entered, weights)
        new_states = timeloop.leaving(new_states, entered, mask)
        y = new_states[0] if counts.output_is_state else y
        saved = [a.write(t, s) for a, s in zip(saved, entered)]
        return t + 1, new_states, outputs.write(t, y), saved

    _, last, outputs, saved = tf.while_loop(
        lambda t, *_: t < length,
        body,
        (
            tf.constant(0),
            states,
            tf.TensorArray(xs.dtype, size=size),
            [tf.TensorArray(s.dtype, size=size) for s in states],
        ),
    )
    return [outputs.stack()] + [a.stack() for a in saved] + list(last)


def backward_loop(step, counts: Counts, d_outputs, *args):
    """The transpose of `forward_loop`: args are ``(*d_last, xs, length, *saved, *weights,
    *states, *flags)``; returns ``[d_xs, *d_weights, *d_states]``."""
    n = counts.states
    d_last, (xs, length), rest = list(args[:n]), args[n : n + 2], args[n + 2 :]
    saved, (weights, _, flags) = [timeloop.readable(a) for a in rest[:n]], counts.split(rest[n:])
    inputs, d_ys = timeloop.readable(xs), timeloop.readable(d_outputs)
    flags_at = timeloop.flag_steps(flags, counts.kinds)

    def back(i, d_states, d_weights, d_xs):
        t = length - 1 - i
        x, entered, d_y = inputs.read(t), [a.read(t) for a in saved], d_ys.read(t)

        def transposed(d_new):
            with tf.GradientTape() as tape:
                tape.watch([x, entered, weights])
                y, new_states = step(x, entered, weights)
            own = [] if counts.output_is_state else [d_y]  # else d_y joins the state's below
            d_x, d_entered, d_w = tape.gradient(
                ([] if counts.output_is_state else [y]) + list(new_states),
                [x, entered, weights],
                output_gradients=own + d_new,
            )
            d_x = tf.zeros_like(x) if d_x is None else d_x
            return _zeros_for_none(d_entered, entered), (d_x, _zeros_for_none(d_w, weights))

        d_own = [d_y] + [None] * (n - 1) if counts.output_is_state else [None] * n
        d_prev, (d_x, d_w) = timeloop.through_flags(d_states, d_own, transposed, *flags_at(t))
        return i + 1, d_prev, [a + b for a, b in zip(d_weights, d_w)], d_xs.write(t, d_x)

    _, d_states, d_weights, d_xs = tf.while_loop(
        lambda i, *_: i < length,
        back,
        (
            tf.constant(0),
            d_last,
            [tf.zeros_like(w) for w in weights],
            tf.TensorArray(xs.dtype, size=timeloop.length_of(xs)),
        ),
    )
    return [d_xs.stack()] + d_weights + d_states


class StepLoops:
    """The compiled time loops of one step with explicit weights,
    ``step(x_t, states, weights) -> (y_t, new states)``, traced once per layout and kept."""

    def __init__(self, step, output_is_state: bool = False):
        # Weights kept in another dtype (float32 under mixed precision) are cast inside each
        # step: their gradient is summed over the steps in the kept dtype.
        self._step = lambda x, states, weights: step(
            x, states, [tf.cast(w, x.dtype) for w in weights]
        )
        self._output_is_state = output_is_state  # see `timeloop.flagged`
        self._sequences: dict = {}

    def run(
        self,
        xs,
        states: list,
        weights: list,
        flags: timeloop.StepFlags | None,
        loop: timeloop.LoopSettings,
    ):
        """The step over ``xs [K, B, F]``, time-major: ``(outputs [K, B, U], states)``."""
        length = timeloop.length_of(xs)
        kinds, padded_flags = timeloop.padded_flags(flags, length, loop.max_steps)
        counts = Counts(len(weights), len(states), kinds, self._output_is_state)
        sequence = self._sequence(counts, loop.compiled_alone())
        outputs, *last = sequence(
            timeloop.padded_steps(xs, length, loop.max_steps),
            tf.convert_to_tensor(length, tf.int32),
            *weights,
            *states,
            *padded_flags,
        )
        return outputs[:length], list(last)

    def _sequence(self, counts: Counts, jit: bool):
        key = (counts, jit)
        if key not in self._sequences:  # two threads may both make one; the first is kept
            self._sequences.setdefault(key, sequence(self._step, counts, jit))
        return self._sequences[key]


def sequence(step, counts: Counts, jit: bool):
    """``(xs [P, B, F], length, *weights, *states, *flags) -> (outputs [P, B, U], *states)``
    with `backward_loop` as its gradient; each loop compiled with XLA with `jit`."""
    forward = compiled.loop_call(functools.partial(forward_loop, step, counts), jit)
    backward = compiled.loop_call(functools.partial(backward_loop, step, counts), jit)

    @tf.custom_gradient
    def sequence(xs, length, *rest):
        outputs, *saved_and_last = forward(xs, length, *rest)
        saved, last = saved_and_last[: counts.states], saved_and_last[counts.states :]

        def grad(d_outputs, *d_last):
            d_outputs = tf.zeros_like(outputs) if d_outputs is None else d_outputs
            d_xs, *d_rest = backward(
                d_outputs, *_zeros_for_none(list(d_last), last), xs, length, *saved, *rest
            )
            return [d_xs, None] + d_rest + [None] * len(counts.kinds)

        return (outputs, *last), grad

    return sequence

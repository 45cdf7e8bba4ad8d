"""One layer's time loop over a chunk, step by step, and the per-step flags.

A chunk is run layer by layer, time-major ``[K, B, ...]``: layer l sees the outputs of layer
l-1 for all K steps at once. Per-step flags (`StepFlags`): `reset` gives a row a fresh zero
state before step t (episodes packed end to end), `mask` keeps a row's state through step t
(padding). They are `where`s before and after a step (`flagged`), taken by every loop, forward
and backward alike (`through_flags` is their transpose). The helpers below read a step of a
stacked tensor in a loop, pad a chunk to a compiled size, and sum a weight's gradient over all
steps as one matmul.
"""

from typing import NamedTuple

import tensorflow as tf

from tbptt._src.core import compat


class LoopSettings(NamedTuple):
    """How one chunk's time loops run.

    Attributes:
      max_steps: a bound of K where K is unknown when the loop is traced (the chunk size): XLA
        sizes autodiff's accumulators with it, and the compiled loops pad every chunk to it.
      xla: compile the loops of stock cells with XLA, each on its own (the chain's config
        says; False: a device without an XLA compiler).
    """

    max_steps: tf.Tensor | None = None
    xla: bool = True

    def compiled_alone(self) -> bool:
        """`xla`, and never inside a function that XLA compiles as a whole: a compiled
        function nested in the cluster sees the chunk's dynamic length as a padded bound and
        returns wrong values (the enclosing cluster compiles the plain loop anyway)."""
        return self.xla and not compat.in_xla_context()


class StepFlags(NamedTuple):
    """Per-row, per-step flags of one chunk, time-major ``[K, B]`` bool (None: no flag)."""

    reset: tf.Tensor | None = None
    mask: tf.Tensor | None = None


def _rows(flag: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """``[B]`` bool reshaped to broadcast against ``like [B, ...]``."""
    return tf.reshape(flag, [-1] + [1] * (like.shape.rank - 1))


def entering(states: list, reset) -> list:
    """The states a step starts from: zero in the rows of ``reset [B]`` (None: no reset)."""
    if reset is None:
        return list(states)
    return [tf.where(_rows(reset, s), tf.zeros_like(s), s) for s in states]


def leaving(new_states: list, states: list, mask) -> list:
    """The states after a step: the new ones in the rows of ``mask [B]``, the entering ones
    elsewhere (None: every row takes the step)."""
    if mask is None:
        return list(new_states)
    return [tf.where(_rows(mask, s), n, s) for n, s in zip(new_states, states)]


def flagged(step, output_is_state: bool = False):
    """`step` with a reset before it and a mask after it: ``(x_t, states, reset_t, mask_t)``.

    reset_t: rows whose state is zeroed before the step. mask_t: rows that take the step; the
    others keep the state they entered with (after any reset). With `output_is_state` (a cell
    whose output is its first state: Keras's GRU, LSTM and SimpleRNN cells) a masked row
    outputs the state it keeps, which is the last output, as Keras's RNN repeats it; else the
    step's output is its own either way.
    """

    def run(x, states, reset, mask):
        states = entering(states, reset)
        y, new_states = step(x, states)
        new_states = leaving(new_states, states, mask)
        return (new_states[0] if output_is_state else y), new_states

    return run


def time_major(xs: tf.Tensor) -> tf.Tensor:
    """``[B, K, ...] <-> [K, B, ...]``."""
    return tf.transpose(xs, [1, 0] + list(range(2, xs.shape.rank)))


def unroll_time_major(
    step,
    xs: tf.Tensor,
    states: list,
    *,
    with_outputs: bool,
    flags: StepFlags | None = None,
    loop: LoopSettings = LoopSettings(),
    output_is_state: bool = False,
):
    """``step(x_t, states) -> (y_t, states)`` over ``xs [K, B, ...]``; outputs ``[K, B, U]``.

    With `flags`, each step is `flagged` with the step's reset and mask (and
    `output_is_state`); `loop.max_steps` bounds K where it is unknown when traced (autodiff
    inside XLA sizes its accumulators).
    """
    if is_short(xs):
        return _unrolled(
            step,
            xs,
            states,
            with_outputs=with_outputs,
            flags=flags,
            output_is_state=output_is_state,
        )
    count = length_of(xs)
    inputs = readable(xs)
    outputs = tf.TensorArray(xs.dtype, size=count) if with_outputs else None
    with_flags = flagged(step, output_is_state) if flags is not None else None
    flag_arrays = [
        None if f is None else tf.TensorArray(tf.bool, size=count).unstack(f) for f in (flags or ())
    ]

    def body(t, states, *outputs):
        if with_flags is None:
            y, states = step(inputs.read(t), states)
        else:
            y, states = with_flags(
                inputs.read(t), states, *[None if a is None else a.read(t) for a in flag_arrays]
            )
        return (t + 1, list(states)) + ((outputs[0].write(t, y),) if with_outputs else ())

    loop_vars = (tf.constant(0), list(states)) + ((outputs,) if with_outputs else ())
    bound = count if loop.max_steps is None else loop.max_steps
    _, states, *outputs = tf.while_loop(
        lambda t, *_: t < count, body, loop_vars, maximum_iterations=bound
    )
    return (outputs[0].stack() if with_outputs else None), states


# A loop of at most this many steps, known when traced, is unrolled into plain ops: an online
# step (a model serving one observation at a time) pays no loop and no XLA launch.
SHORT_STEPS = 8


def is_short(xs: tf.Tensor) -> bool:
    """Whether ``xs [K, ...]`` has a static K of at most `SHORT_STEPS` steps."""
    return xs.shape[0] is not None and xs.shape[0] <= SHORT_STEPS


def _unrolled(
    step,
    xs: tf.Tensor,
    states: list,
    *,
    with_outputs: bool,
    flags: StepFlags | None = None,
    output_is_state: bool = False,
):
    """`unroll_time_major` over a short, static K as K copies of the step."""
    run = flagged(step, output_is_state) if flags is not None else (lambda x, s, *_: step(x, s))
    outputs = []
    for t in range(xs.shape[0]):
        y, states = run(
            xs[t], list(states), *[None if f is None else f[t] for f in (flags or (None, None))]
        )
        outputs.append(y)
    return (tf.stack(outputs) if with_outputs else None), list(states)


def unroll(step, inputs: tf.Tensor, state) -> tuple:
    """Runs a core `step(x_t, state) -> (y_t, state)` over the time axis of `inputs`.

    Args:
      step: one time step; `state` is any nest of ``[B, ...]`` tensors, returned in the same
        structure.
      inputs: ``[B, T, F]``.
      state: the state entering the first step.

    Returns:
      ``(outputs [B, T, U], final state)``.

    Example, a counter core with a closed form:

    >>> import tensorflow as tf
    >>> outputs, count = unroll(lambda x, s: (x + s, s + 1), tf.ones([1, 4, 1]), tf.zeros([1, 1]))
    >>> outputs[0, :, 0].numpy().tolist(), float(count[0, 0])
    ([1.0, 2.0, 3.0, 4.0], 4.0)
    """

    def flat_step(x, leaves):
        y, new_state = step(x, tf.nest.pack_sequence_as(state, leaves))
        tf.nest.assert_same_structure(state, new_state)
        return y, tf.nest.flatten(new_state)

    outputs, leaves = unroll_time_major(
        flat_step,
        time_major(tf.convert_to_tensor(inputs)),
        tf.nest.flatten(state),
        with_outputs=True,
    )
    return time_major(outputs), tf.nest.pack_sequence_as(state, leaves)


def readable(stacked: tf.Tensor) -> tf.TensorArray:
    """A ``[K, ...]`` tensor as a TensorArray, to read step t of it in a loop."""
    return tf.TensorArray(stacked.dtype, size=length_of(stacked)).unstack(stacked)


def readable_parts(stacked: tf.Tensor, count: int) -> list:
    """``[K, ..., count * N]`` as `count` TensorArrays of ``[K, ..., N]``: a step reads each
    part whole (see `gru.forward_loop` on why not one read sliced)."""
    return [readable(part) for part in tf.split(stacked, count, axis=-1)]


def parts_of(x, count: int) -> list:
    """A step's ``[B, count * N]`` value as `count` parts ``[B, N]``, or its parts as given."""
    return list(x) if isinstance(x, (list, tuple)) else tf.split(x, count, axis=-1)


def arrays(dtype: tf.DType, like: tf.Tensor) -> tf.TensorArray:
    """The array a loop writes a step's values ``[B, N]`` into, joined: one array of `like`'s
    leading length (one write a step; `stacked_parts` parts them after the loop)."""
    return tf.TensorArray(dtype, size=length_of(like))


def written(array: tf.TensorArray, t, values) -> tf.TensorArray:
    """`values` ``[B, N]`` each, written at step t as one row ``[B, len(values) * N]``."""
    return array.write(t, tf.concat(list(values), axis=-1))


def stacked_parts(array: tf.TensorArray, count: int) -> tuple:
    """The `count` values a loop `written` at each step, each ``[K, B, N]``."""
    return tuple(tf.split(array.stack(), count, axis=-1))


def length_of(stacked: tf.Tensor):
    """The leading dimension: a Python int when it is known (XLA needs fixed list sizes)."""
    return stacked.shape[0] if stacked.shape[0] is not None else tf.shape(stacked)[0]


def padded_steps(xs: tf.Tensor, length, max_steps) -> tf.Tensor:
    """``xs [K, B, ...]`` padded with zero steps to the chunk size `max_steps`, so that every
    chunk of a call, the last and shorter one too, is one shape that XLA compiles once; or,
    for a whole sequence, to the power of two at or above K (few shapes for many lengths).
    The loops run the first K steps only."""
    if max_steps is None:
        target = tf.cast(
            2.0
            ** tf.math.ceil(
                tf.math.log(tf.cast(length, tf.float64)) / tf.math.log(tf.constant(2.0, tf.float64))
            ),
            tf.int32,
        )
        target = tf.maximum(target, tf.cast(length, tf.int32))  # rounding at exact powers
    else:
        target = tf.maximum(tf.cast(max_steps, tf.int32), tf.cast(length, tf.int32))
    return tf.pad(xs, [[0, target - length]] + [[0, 0]] * (xs.shape.rank - 1))


def padded_flags(flags: StepFlags | None, length, max_steps) -> tuple:
    """``(kinds, tensors)``: the names of the flags given, a static part of the loops
    ("reset", "mask"; () without flags), and each as ``[P, B, 1]`` bool padded as
    `padded_steps` pads the inputs, to read one step's rows in a loop and broadcast them over
    the units."""
    given = (
        [] if flags is None else [(k, f) for k, f in zip(StepFlags._fields, flags) if f is not None]
    )
    return tuple(k for k, _ in given), tuple(
        tf.cast(padded_steps(tf.cast(f[..., None], tf.int8), length, max_steps), tf.bool)
        for _, f in given
    )


def previous(first: tf.Tensor, stacked: tf.Tensor) -> tf.Tensor:
    """``[first, stacked[0], ..., stacked[K-2]]``: the value entering each step."""
    return tf.concat([first[None], stacked[:-1]], axis=0)


def flat_steps(stacked: tf.Tensor) -> tf.Tensor:
    """``[K, B, N] -> [K*B, N]``."""
    return tf.reshape(stacked, [-1, tf.shape(stacked)[-1]])


def flag_steps(flags: tuple, kinds: tuple):
    """The loop's reader of step t's ``(reset_t, mask_t) [B, 1]`` (None where not given)."""
    readers = dict(zip(kinds, [readable(f) for f in flags]))
    return lambda t: tuple(readers[k].read(t) if k in readers else None for k in StepFlags._fields)


def through_flags(d_state: list, d_own: list, transpose, reset, mask) -> tuple:
    """The transpose of one `flagged` step.

    Args:
      d_state: the carried gradients of the states after the step.
      d_own: the gradients of the states after the step from elsewhere (the output's: a
        masked row outputs the state it keeps, see `flagged`), or None.
      transpose: ``d_new_states -> (d_states_in, d_step)``, the unflagged step's
        transpose.
      reset, mask: the step's ``[B, 1]`` flags, or None.

    Returns:
      ``(the gradients of the states before the step, d_step)``.
    """

    def plus_own(d_new):
        return [d if own is None else own + d for own, d in zip(d_own, d_new)]

    d_after = plus_own(d_state)
    if mask is None:
        d_in, d_step = transpose(d_after)
    else:  # masked rows pass the gradient by; the others take it through the step
        zeros = [tf.zeros_like(d) for d in d_after]
        d_in, d_step = transpose(leaving(d_after, zeros, mask))
        d_in = [d + passed for d, passed in zip(d_in, leaving(zeros, d_after, mask))]
    return entering(d_in, reset), d_step


def weight_product(a: tf.Tensor, b: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """``sum_t a_t^T b_t`` over ``[K, B, M]`` and ``[K, B, N]``: a weight's gradient over
    all steps as one matmul, in the weight's kept `dtype`."""
    return tf.matmul(tf.cast(flat_steps(a), dtype), tf.cast(flat_steps(b), dtype), transpose_a=True)

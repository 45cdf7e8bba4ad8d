"""Keras's GRUCell over a chunk: one step, its transpose, and the compiled loops of both.

The forward of a step serves the runners (step by step, autodiff) and the loops below; each
backward is the exact transpose of the step above it for sigmoid/tanh, written out so that the
loop's backward keeps only the gates (see `compiled.py`).
"""

import functools
from typing import NamedTuple

import tensorflow as tf

from tbptt._src.recurrent.loops import compiled, timeloop


def step(
    x, h, recurrent_kernel, recurrent_bias, reset_after: bool, activation, recurrent_activation
):
    """Keras `GRUCell.call` on ``x = inputs @ kernel + input_bias``: ``[B, 3U]``, or its three
    gates' parts ``[B, U]`` (update, reset, candidate), as the compiled loops read them.

    Returns ``(h, z, r, hh, aux)``: the new state, the gates, the candidate, and what the
    backward needs of the candidate's recurrent term (reset_after: ``h @ U_h + b``; else the
    reset state ``r * h``).
    """
    units = recurrent_kernel.shape[0]
    x_z, x_r, x_candidate = timeloop.parts_of(x, 3)
    if reset_after:
        inner = tf.matmul(h, recurrent_kernel)
        if recurrent_bias is not None:
            inner = tf.nn.bias_add(inner, recurrent_bias)
        aux = inner[:, 2 * units :]
    else:
        inner = tf.matmul(h, recurrent_kernel[:, : 2 * units])
    z = recurrent_activation(x_z + inner[:, :units])
    r = recurrent_activation(x_r + inner[:, units : 2 * units])
    if reset_after:
        candidate = r * aux
    else:
        aux = r * h
        candidate = tf.matmul(aux, recurrent_kernel[:, 2 * units :])
    hh = activation(x_candidate + candidate)
    return z * h + (1 - z) * hh, z, r, hh, aux


def step_dropped(
    x,
    h,
    recurrent_kernel,
    recurrent_bias,
    reset_after: bool,
    activation,
    recurrent_activation,
    masks: tuple,
):
    """Keras `GRUCell.call` with recurrent dropout (its implementation 1) on ``x = inputs @
    kernel + input_bias`` ``[B, 3U]``: each gate's recurrent product takes the state times its
    own mask of ``masks`` (3 of ``[B, U]``); the new state mixes in the state undropped."""
    kernels = tf.split(recurrent_kernel, 3, axis=1)
    biases = [None] * 3 if recurrent_bias is None else tf.split(recurrent_bias, 3)
    x_z, x_r, x_h = tf.split(x, 3, axis=1)

    def inner(gate):
        product = tf.matmul(h * masks[gate], kernels[gate])
        return product if biases[gate] is None else product + biases[gate]

    z = recurrent_activation(x_z + inner(0))
    r = recurrent_activation(x_r + inner(1))
    if reset_after:
        candidate = r * inner(2)
    else:
        candidate = tf.matmul(r * (h * masks[2]), kernels[2])
    hh = activation(x_h + candidate)
    return z * h + (1 - z) * hh


class Kernels(NamedTuple):
    """The recurrent kernel ``[U, 3U]`` split as the step backward uses it, once per loop."""

    inner: tf.Tensor  # the columns the recurrent matmul uses: [U, 3U] reset_after, else gates'
    candidate: tf.Tensor  # [U, U]: the candidate's columns


def kernels_of(recurrent_kernel, reset_after: bool) -> Kernels:
    units = recurrent_kernel.shape[0]
    inner = recurrent_kernel if reset_after else recurrent_kernel[:, : 2 * units]
    return Kernels(inner, recurrent_kernel[:, 2 * units :])


def step_backward(dh, h_prev, z, r, hh, aux, kernels: Kernels, reset_after: bool):
    """The transpose of a sigmoid/tanh `step` at one step.

    Args:
      dh: dLoss/dh_t ``[B, U]`` (this step's output gradient plus the carried one).
      h_prev, z, r, hh, aux: the step's input state and what `step` returned.

    Returns:
      ``(dh_prev [B, U], d_step)``: the gradient of the state entering the step, and the
      step's other gradients as a tuple of ``[B, U]`` parts (one write each per step in a
      loop; `step_parts` joins them): the recurrent matmul's output gradient ``d_inner``
      (the gates', then with reset_after the candidate's recurrent term), then the
      candidate's pre-activation gradient.
    """
    d_pre_candidate = dh * (1 - z) * (1 - hh * hh)
    dz = dh * (h_prev - hh)
    dh_prev = dh * z
    if reset_after:
        dr = d_pre_candidate * aux
    else:
        d_reset_state = tf.matmul(d_pre_candidate, kernels.candidate, transpose_b=True)
        dr = d_reset_state * h_prev
        dh_prev += d_reset_state * r
    d_inner = [dz * z * (1 - z), dr * r * (1 - r)] + ([d_pre_candidate * r] if reset_after else [])
    dh_prev += tf.matmul(tf.concat(d_inner, axis=1), kernels.inner, transpose_b=True)
    return dh_prev, tuple(d_inner) + (d_pre_candidate,)


def step_parts(d_step: tuple, reset_after: bool) -> tuple:
    """`step_backward`'s d_step parts ``[..., U]`` -> (the projected input's gradient
    ``[..., 3U]``: gates then candidate, the recurrent matmul's output gradient ``[..., 3U
    or 2U]``)."""
    gates, candidate = list(d_step[:2]), d_step[-1]
    inner = tf.concat(list(d_step[:-1]), axis=-1)
    return tf.concat(gates + [candidate], axis=-1), inner


def forward_loop(
    projected, length, h0, recurrent_kernel, recurrent_bias, *flags, reset_after: bool, kinds: tuple
):
    """`step` over the first `length` steps of ``projected [P, B, 3U]``, each `timeloop.flagged`
    by `flags` (the `kinds` of `timeloop.padded_flags`): ``(*saved, h_length)``, where saved
    are ``[P, B, U]`` arrays of each step's (h, z, r, hh, aux), and with flags the state it
    started from (zeros past `length`).

    Each value a step reads is an array of its own: XLA's CPU code for a step that slices a
    value read at step t (a dynamic slice) is element by element, several times slower than
    the step's matmul. A step's values are written as one row (`timeloop.written`): one
    array per value costs XLA more to compile (about 0.2 s per shape) for no speed."""
    xs = timeloop.readable_parts(projected, 3)
    flags_at = timeloop.flag_steps(flags, kinds)

    def body(t, h, saved):
        reset, mask = flags_at(t)
        h_in = timeloop.entering([h], reset)[0]
        values = step(
            [x.read(t) for x in xs],
            h_in,
            recurrent_kernel,
            recurrent_bias,
            reset_after,
            tf.tanh,
            tf.sigmoid,
        )
        # a masked row outputs the kept state
        h_next = timeloop.leaving([values[0]], [h_in], mask)[0]
        row = (h_next,) + values[1:] + ((h_in,) if flags else ())
        return t + 1, h_next, timeloop.written(saved, t, row)

    count = 6 if flags else 5
    start = (tf.constant(0), h0, timeloop.arrays(projected.dtype, projected))
    _, h_last, saved = tf.while_loop(lambda t, *_: t < length, body, start)
    return timeloop.stacked_parts(saved, count) + (h_last,)


@functools.cache
def sequence(reset_after: bool, jit: bool, kinds: tuple = ()):
    """``(projected [P, B, 3U], length, h0 [B, U], recurrent_kernel [U, 3U], recurrent_bias
    [3U], *flags) -> (outputs [P, B, U], h_length)`` for sigmoid/tanh GRUs over the first
    `length` steps (outputs past them zero), each step `timeloop.flagged` by `flags` (the `kinds` of
    `timeloop.padded_flags`), with its backward written out; with `jit` (see
    `LoopSettings.compiled_alone`), the forward loop and the backward loop are each compiled with
    XLA."""

    @tf.custom_gradient
    def gru_sequence(projected, length, h0, recurrent_kernel, recurrent_bias, *flags):
        kept_dtype = recurrent_kernel.dtype  # float32 under mixed precision: cast in here
        kernel, bias = (tf.cast(w, projected.dtype) for w in (recurrent_kernel, recurrent_bias))
        *saved, h_last = compiled.loop_function(
            forward_loop, jit, reset_after=reset_after, kinds=kinds
        )(projected, length, h0, kernel, bias, *flags)
        outputs = saved[0]

        def grad(d_outputs, d_last):
            d_outputs = tf.zeros_like(outputs) if d_outputs is None else d_outputs
            d_last = tf.zeros_like(h0) if d_last is None else d_last
            d_projected, d_h0, d_kernel, d_bias = compiled.loop_function(
                backward_loop, jit, reset_after=reset_after, kinds=kinds, kept_dtype=kept_dtype
            )(d_outputs, d_last, length, h0, kernel, bias, *saved, *flags)
            return (d_projected, None, d_h0, d_kernel, d_bias) + (None,) * len(flags)

        return (outputs, h_last), grad

    return gru_sequence


def backward_loop(
    d_outputs,
    d_last,
    length,
    h0,
    recurrent_kernel,
    recurrent_bias,
    *saved_and_flags,
    reset_after: bool,
    kinds: tuple,
    kept_dtype: tf.DType,
):
    """The gradients of `sequence`'s inputs: `step_backward` over the steps in
    reverse (reads and writes of ``[B, U]`` arrays, through the flags' `where`s), then the
    recurrent weights' gradients as one matmul over all steps, in their `kept_dtype` (the
    padded steps' gradients are zero). `saved_and_flags`: `forward_loop`'s saved arrays, then
    the flags."""
    saved_count = 6 if kinds else 5
    saved, flags = saved_and_flags[:saved_count], saved_and_flags[saved_count:]
    # The state each step started from: saved with flags, else the previous step's output.
    previous = saved[5] if flags else timeloop.previous(h0, saved[0])
    step_values = [timeloop.readable(v) for v in (d_outputs, previous) + tuple(saved[1:5])]
    kernels = kernels_of(recurrent_kernel, reset_after)
    flags_at = timeloop.flag_steps(flags, kinds)

    def back(i, dh, d_steps):
        t = length - 1 - i
        d_output, h_prev, z, r, hh, aux = [v.read(t) for v in step_values]

        def transposed(d_new):
            dh_prev, d_step = step_backward(d_new[0], h_prev, z, r, hh, aux, kernels, reset_after)
            return [dh_prev], d_step

        (dh_prev,), d_step = timeloop.through_flags([dh], [d_output], transposed, *flags_at(t))
        return i + 1, dh_prev, timeloop.written(d_steps, t, d_step)

    parts = 4 if reset_after else 3
    d_steps = timeloop.arrays(d_outputs.dtype, d_outputs)
    _, d_h0, d_steps = tf.while_loop(lambda i, *_: i < length, back, (0, d_last, d_steps))
    d_projected, d_inner = step_parts(timeloop.stacked_parts(d_steps, parts), reset_after)
    d_kernel, d_bias = _weights_backward(
        previous, saved[4], d_projected, d_inner, reset_after, kept_dtype
    )
    return d_projected, d_h0, d_kernel, d_bias


def _weights_backward(previous, aux, d_projected, d_inner, reset_after: bool, kept_dtype):
    """The recurrent kernel's and bias's gradients, each one matmul (or sum) over all steps
    in their `kept_dtype`: ``d_kernel = sum_t h_{t-1}^T d_inner_t`` (without reset_after, the
    candidate's columns take the reset state r * h, saved as aux)."""
    units = previous.shape[-1]
    d_kernel = timeloop.weight_product(previous, d_inner, kept_dtype)
    if reset_after:
        return d_kernel, tf.reduce_sum(tf.cast(timeloop.flat_steps(d_inner), kept_dtype), axis=0)
    d_candidate = timeloop.weight_product(aux, d_projected[..., 2 * units :], kept_dtype)
    return tf.concat([d_kernel, d_candidate], axis=1), tf.zeros([3 * units], kept_dtype)

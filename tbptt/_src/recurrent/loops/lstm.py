"""Keras's LSTMCell over a chunk: one step, its transpose, and the compiled loops of both
(as `gru.py`)."""

import functools

import tensorflow as tf

from tbptt._src.recurrent.loops import compiled, timeloop


def step(x, h, c, recurrent_kernel, activation, recurrent_activation):
    """Keras `LSTMCell.call` on ``x = inputs @ kernel + bias``: ``[B, 4U]``, or its four gates'
    parts ``[B, U]`` (input, forget, cell, output), as the compiled loops read them.

    Returns ``(h, c, i, f, o, g, activation(c))``.
    """
    units = recurrent_kernel.shape[0]
    inner = tf.matmul(h, recurrent_kernel)
    z_i, z_f, z_c, z_o = [
        x_g + inner[:, g * units : (g + 1) * units] for g, x_g in enumerate(timeloop.parts_of(x, 4))
    ]
    i, f, o = recurrent_activation(z_i), recurrent_activation(z_f), recurrent_activation(z_o)
    g = activation(z_c)
    c = f * c + i * g
    activation_c = activation(c)
    return o * activation_c, c, i, f, o, g, activation_c


def step_dropped(x, h, c, recurrent_kernel, activation, recurrent_activation, masks: tuple):
    """Keras `LSTMCell.call` with recurrent dropout (its implementation 1) on ``x = inputs @
    kernel + bias`` ``[B, 4U]``: each gate's recurrent product takes the state times its own
    mask of ``masks`` (4 of ``[B, U]``). Returns ``(h, c)``."""
    kernels = tf.split(recurrent_kernel, 4, axis=1)
    z_i, z_f, z_c, z_o = [
        x_g + tf.matmul(h * m, k) for x_g, m, k in zip(tf.split(x, 4, axis=1), masks, kernels)
    ]
    i, f, o = recurrent_activation(z_i), recurrent_activation(z_f), recurrent_activation(z_o)
    c = f * c + i * activation(z_c)
    return o * activation(c), c


def step_backward(dh, dc, c_prev, i, f, o, g, tanh_c, recurrent_kernel):
    """The transpose of a sigmoid/tanh `step` at one step.

    Args:
      dh, dc: dLoss/dh_t (output gradient plus carried) and the carried dLoss/dc_t ``[B, U]``.
      c_prev, i, f, o, g, tanh_c: the step's input cell state and what `step` returned.

    Returns:
      ``(dh_prev, dc_prev [B, U], d_x)``: d_x, the gates' four parts ``[B, U]`` (written as
      one row per step in a loop), is also the gradient of the recurrent matmul's output, so
      dW = sum_t h_{t-1}^T d_x_t.
    """
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    d_x = (
        dc * g * i * (1 - i),
        dc * c_prev * f * (1 - f),
        dc * i * (1 - g * g),
        dh * tanh_c * o * (1 - o),
    )
    dh_prev = tf.matmul(tf.concat(d_x, axis=1), recurrent_kernel, transpose_b=True)
    return dh_prev, dc * f, d_x


def forward_loop(projected, length, h0, c0, recurrent_kernel, *flags, kinds: tuple):
    """`step` over the first `length` steps of ``projected [P, B, 4U]``, each `timeloop.flagged`
    by `flags`: ``(*saved, h_length, c_length)``, where saved are ``[P, B, U]`` arrays of each
    step's (h, c, i, f, o, g, tanh(c)), and with flags the states (h, c) it started from
    (zeros past `length`); each value read from an array of its own and a step's values
    written as one row, as in `gru.forward_loop`."""
    xs = timeloop.readable_parts(projected, 4)
    flags_at = timeloop.flag_steps(flags, kinds)

    def body(t, h, c, saved):
        reset, mask = flags_at(t)
        h_in, c_in = timeloop.entering([h, c], reset)
        values = step([x.read(t) for x in xs], h_in, c_in, recurrent_kernel, tf.tanh, tf.sigmoid)
        h_next, c_next = timeloop.leaving(values[:2], [h_in, c_in], mask)
        row = (h_next, c_next) + values[2:] + ((h_in, c_in) if flags else ())
        return t + 1, h_next, c_next, timeloop.written(saved, t, row)

    count = 9 if flags else 7
    arrays = timeloop.arrays(projected.dtype, projected)
    _, h_last, c_last, saved = tf.while_loop(
        lambda t, *_: t < length, body, (tf.constant(0), h0, c0, arrays)
    )
    return timeloop.stacked_parts(saved, count) + (h_last, c_last)


@functools.cache
def sequence(jit: bool, kinds: tuple = ()):
    """``(projected [P, B, 4U], length, h0, c0 [B, U], recurrent_kernel [U, 4U], *flags)
    -> (outputs [P, B, U], h_length, c_length)`` for sigmoid/tanh LSTMs over the first `length`
    steps, each `timeloop.flagged` by `flags` as in `gru.sequence`, with its backward written out;
    both loops compiled with XLA with `jit`, as in `gru.sequence`."""

    @tf.custom_gradient
    def lstm_sequence(projected, length, h0, c0, recurrent_kernel, *flags):
        kept_dtype = recurrent_kernel.dtype  # float32 under mixed precision: cast in here
        kernel = tf.cast(recurrent_kernel, projected.dtype)
        *saved, h_last, c_last = compiled.loop_function(forward_loop, jit, kinds=kinds)(
            projected, length, h0, c0, kernel, *flags
        )
        outputs = saved[0]

        def grad(d_outputs, d_h_last, d_c_last):
            d_outputs = tf.zeros_like(outputs) if d_outputs is None else d_outputs
            d_h_last = tf.zeros_like(h0) if d_h_last is None else d_h_last
            d_c_last = tf.zeros_like(c0) if d_c_last is None else d_c_last
            d_projected, d_h0, d_c0, d_kernel = compiled.loop_function(
                backward_loop, jit, kinds=kinds, kept_dtype=kept_dtype
            )(d_outputs, d_h_last, d_c_last, length, h0, c0, kernel, *saved, *flags)
            return (d_projected, None, d_h0, d_c0, d_kernel) + (None,) * len(flags)

        return (outputs, h_last, c_last), grad

    return lstm_sequence


def backward_loop(
    d_outputs,
    d_h_last,
    d_c_last,
    length,
    h0,
    c0,
    recurrent_kernel,
    *saved_and_flags,
    kinds: tuple,
    kept_dtype: tf.DType,
):
    """The gradients of `sequence`'s inputs: `step_backward` over the steps in
    reverse (through the flags' `where`s), then the recurrent kernel's gradient as one matmul
    over all steps, in its `kept_dtype` (the padded steps' gradients are zero).
    `saved_and_flags`: `forward_loop`'s saved arrays, then the flags."""
    saved_count = 9 if kinds else 7
    saved, flags = saved_and_flags[:saved_count], saved_and_flags[saved_count:]
    if flags:  # the states each step started from
        h_previous, c_previous = saved[7], saved[8]
    else:
        h_previous = timeloop.previous(h0, saved[0])
        c_previous = timeloop.previous(c0, saved[1])
    step_values = [timeloop.readable(v) for v in (d_outputs, c_previous) + tuple(saved[2:7])]
    flags_at = timeloop.flag_steps(flags, kinds)

    def back(k, dh, dc, d_projected):
        t = length - 1 - k
        d_output, c_prev, *step_gates = [v.read(t) for v in step_values]

        def transposed(d_new):
            dh_prev, dc_prev, d_x = step_backward(
                d_new[0], d_new[1], c_prev, *step_gates, recurrent_kernel
            )
            return [dh_prev, dc_prev], d_x

        (dh_prev, dc_prev), d_x = timeloop.through_flags(
            [dh, dc], [d_output, None], transposed, *flags_at(t)
        )
        return k + 1, dh_prev, dc_prev, timeloop.written(d_projected, t, d_x)

    start = (0, d_h_last, d_c_last, timeloop.arrays(d_outputs.dtype, d_outputs))
    _, d_h0, d_c0, d_projected = tf.while_loop(lambda k, *_: k < length, back, start)
    d_projected = d_projected.stack()  # the four gates' parts joined, as the kernel's columns
    return d_projected, d_h0, d_c0, timeloop.weight_product(h_previous, d_projected, kept_dtype)

"""Keras's own GRU, LSTM and SimpleRNN cells over a chunk, their input projection hoisted.

A stock cell's step splits into an input half, ``x_t @ kernel + bias``, the same function of
each step's input, and a recurrent half. The input half runs as one ``[K*B, F] @ [F, G]``
matmul per chunk (`project`), forward and backward; only the recurrent half stays in the time
loop:

- `HoistedRunner` (SimpleRNNCell; GRU/LSTM with other activations or recurrent dropout): the
  step in the compiled loops of any step (`any_cell.StepLoops`);
- `FusedRunner` (GRU/LSTM with sigmoid/tanh): the compiled loop with its written-out backward
  (`gru.py`, `lstm.py`).

Keras's dropout masks of a call are drawn here as Keras's RNN draws them (`draw_masks`) and
applied as the cells apply them: the input masks in the projection, the recurrent masks in the
step (Keras's implementation 1, a mask per gate).
"""

import abc
from typing import NamedTuple

import tensorflow as tf

from tbptt._src.core import compat
from tbptt._src.core.randomness import DropoutMasks
from tbptt._src.recurrent.loops import any_cell, gru, lstm, timeloop


class Recurrent(NamedTuple):
    """The recurrent half of a step: its kernel ``[U, G]``, its bias (or None) and the
    recurrent dropout masks of the call (a tuple of ``[B, U]``, or None)."""

    kernel: tf.Tensor
    bias: tf.Tensor | None = None
    masks: tuple | None = None

    def weights(self) -> list:
        """As the step loops take them: ``[kernel, (bias), *masks]``."""
        return [self.kernel] + [w for w in [self.bias] if w is not None] + list(self.masks or ())

    def cast(self, dtype: tf.DType) -> "Recurrent":
        """Kernel and bias cast to the compute dtype (kept in float32 under mixed precision)."""
        bias = None if self.bias is None else tf.cast(self.bias, dtype)
        return self._replace(kernel=tf.cast(self.kernel, dtype), bias=bias)


class HoistedRunner(abc.ABC):
    """A stock Keras cell, its input projection hoisted and its step in the compiled loops of
    any step. A subclass says how the weights split (input and recurrent biases) and gives
    one step on a projected input."""

    def __init__(self, cell):
        self._cell = cell
        self._loops = any_cell.StepLoops(
            lambda x, states, weights: self._step(x, states, self._recurrent_of(weights)),
            output_is_state=True,
        )

    def _recurrent_of(self, weights: list) -> Recurrent:
        """`Recurrent.weights` read back."""
        with_bias = self._has_recurrent_bias()
        masks = tuple(weights[1 + with_bias :]) or None
        return Recurrent(weights[0], weights[1] if with_bias else None, masks)

    def draw_masks(self, batch) -> DropoutMasks | None:
        """The cell's dropout masks for one call, drawn from its seed generator as Keras's RNN
        draws them before its loop: the inputs' masks ``[B, F]``, then the state's ``[B, U]``,
        one per gate where the cell counts them (implementation 1), in the cell's compute
        dtype. None when the cell has no dropout."""
        cell = self._cell
        dtype = compat.compute_dtype(cell)

        def draw(rate, width):
            if not 0.0 < rate < 1.0:
                return None
            ones = tf.ones(tf.stack([batch, width]), dtype)
            count = getattr(cell, "dropout_mask_count", None) or 1
            seed = cell.seed_generator
            return tuple(compat.keras.random.dropout(ones, rate, seed=seed) for _ in range(count))

        inputs, recurrent = cell.kernel.shape[0], cell.units
        masks = DropoutMasks(draw(cell.dropout, inputs), draw(cell.recurrent_dropout, recurrent))
        return None if masks == DropoutMasks() else masks

    def _weight(self, name: str):
        """A weight as it is kept (float32 under mixed precision): the loops cast it to the
        compute dtype inside, so its gradient is summed in the kept dtype, as Keras sums it."""
        return tf.convert_to_tensor(getattr(self._cell, name))

    def project(self, xs, batch_major: bool, masks: DropoutMasks | None = None):
        inputs = None if masks is None else masks.inputs
        return project(xs, self._weight("kernel"), self._input_bias(), batch_major, inputs)

    def run(
        self,
        xs,
        states,
        *,
        training: bool,
        with_outputs: bool,
        flags=None,
        loop: timeloop.LoopSettings = timeloop.LoopSettings(),
        masks=None,
    ):
        """The layer over ``xs [K, B, G]`` (projected, input dropout applied)."""
        del training  # dropout comes as the call's masks; nothing else depends on it
        recurrent = self._recurrent(masks)
        return self._step_loop(xs, states, recurrent, with_outputs, flags, loop)

    def _recurrent(self, masks: DropoutMasks | None) -> Recurrent:
        kernel = self._weight("recurrent_kernel")
        return Recurrent(kernel, self._recurrent_bias(), None if masks is None else masks.recurrent)

    def _step_loop(self, xs, states, recurrent: Recurrent, with_outputs: bool, flags, loop):
        """The compiled loops of `_step`, or the step unrolled on a few steps."""
        if not timeloop.is_short(xs):
            return self._loops.run(xs, list(states), recurrent.weights(), flags, loop)
        cast = recurrent.cast(xs.dtype)
        return timeloop.unroll_time_major(
            lambda x, s: self._step(x, s, cast),
            xs,
            states,
            with_outputs=with_outputs,
            flags=flags,
            loop=loop,
            output_is_state=True,
        )

    @abc.abstractmethod
    def _input_bias(self):
        """The bias added to the hoisted projection, or None."""

    def _recurrent_bias(self):
        """The bias added to the recurrent matmul inside the loop, or None."""
        return None

    def _has_recurrent_bias(self) -> bool:
        """Whether `_recurrent_bias` is one (told without reading the weights)."""
        return False

    @abc.abstractmethod
    def _step(self, x, states, recurrent: Recurrent):
        """One step on a projected input: ``(output, new states)``; `recurrent.masks` multiply
        the state entering the recurrent products, as Keras's recurrent dropout does."""


class FusedRunner(HoistedRunner):
    """A stock GRU or LSTM cell: with sigmoid/tanh and no recurrent dropout, its time loop is
    compiled with a written-out backward (flags or not: a forward that only carries the state
    runs it too, the same program, so the same state to the last bit)."""

    def run(
        self,
        xs,
        states,
        *,
        training: bool,
        with_outputs: bool,
        flags=None,
        loop: timeloop.LoopSettings = timeloop.LoopSettings(),
        masks=None,
    ):
        recurrent = self._recurrent(masks)
        if (
            recurrent.masks is not None
            or not self._default_activations()
            or (timeloop.is_short(xs))
        ):
            return self._step_loop(xs, states, recurrent, with_outputs, flags, loop)
        length = timeloop.length_of(xs)
        padded = timeloop.padded_steps(xs, length, loop.max_steps)
        kinds, flag_tensors = timeloop.padded_flags(flags, length, loop.max_steps)
        sequence = self._sequence(loop.compiled_alone(), kinds)
        outputs, *states = sequence(
            padded,
            tf.convert_to_tensor(length, tf.int32),
            *states,
            *recurrent.weights(),
            *flag_tensors,
        )
        return outputs[:length], list(states)

    def _default_activations(self) -> bool:
        activations = compat.keras.activations
        cell = self._cell
        return cell.activation is activations.tanh and (
            cell.recurrent_activation is activations.sigmoid
        )

    @abc.abstractmethod
    def _sequence(self, jit: bool, kinds: tuple):
        """``(xs [P, B, G], length, *states, *weights, *flags) -> (outputs [P, B, U],
        *states)``: the first `length` steps (padded) with the loop's written-out backward,
        each loop compiled with XLA with `jit`; `kinds` the flags' (`timeloop.padded_flags`)."""


class GRURunner(FusedRunner):
    """Keras `GRUCell`, reset_after either way: the same arithmetic as its `call`."""

    def _input_bias(self):
        if not self._cell.use_bias:
            return None
        bias = self._weight("bias")
        return bias[0] if self._cell.reset_after else bias

    def _recurrent_bias(self):
        return self._weight("bias")[1] if self._has_recurrent_bias() else None

    def _has_recurrent_bias(self) -> bool:
        return bool(self._cell.use_bias and self._cell.reset_after)

    def _step(self, x, states, recurrent: Recurrent):
        cell = self._cell
        activations = (cell.activation, cell.recurrent_activation)
        kernel, bias, reset_after = recurrent.kernel, recurrent.bias, cell.reset_after
        if recurrent.masks is not None:
            h = gru.step_dropped(
                x, states[0], kernel, bias, reset_after, *activations, recurrent.masks
            )
            return h, [h]
        h = gru.step(x, states[0], kernel, bias, reset_after, *activations)[0]
        return h, [h]

    def _sequence(self, jit: bool, kinds: tuple):
        sequence = gru.sequence(self._cell.reset_after, jit, kinds)

        def run(xs, length, h0, kernel, *rest):
            bias = (
                rest[0]
                if self._has_recurrent_bias()
                else tf.zeros([kernel.shape[-1]], kernel.dtype)
            )
            flags = rest[1:] if self._has_recurrent_bias() else rest
            return sequence(xs, length, h0, kernel, bias, *flags)

        return run


class LSTMRunner(FusedRunner):
    """Keras `LSTMCell`: the same arithmetic as its `call`."""

    def _input_bias(self):
        return self._weight("bias") if self._cell.use_bias else None

    def _step(self, x, states, recurrent: Recurrent):
        cell = self._cell
        activations = (cell.activation, cell.recurrent_activation)
        if recurrent.masks is not None:
            h, c = lstm.step_dropped(
                x, states[0], states[1], recurrent.kernel, *activations, recurrent.masks
            )
            return h, [h, c]
        h, c = lstm.step(x, states[0], states[1], recurrent.kernel, *activations)[:2]
        return h, [h, c]

    def _sequence(self, jit: bool, kinds: tuple):
        return lstm.sequence(jit, kinds)


class SimpleRNNRunner(HoistedRunner):
    """Keras `SimpleRNNCell`: ``h = activation(x @ kernel + bias + h @ recurrent_kernel)``, its
    input projection hoisted, its step in the compiled loops of any step."""

    def _input_bias(self):
        return self._weight("bias") if self._cell.use_bias else None

    def _step(self, x, states, recurrent: Recurrent):
        state = states[0] if recurrent.masks is None else states[0] * recurrent.masks[0]
        h = x + tf.matmul(state, recurrent.kernel)
        if self._cell.activation is not None:
            h = self._cell.activation(h)
        return h, [h]


RUNNERS = {
    compat.keras.layers.GRUCell: GRURunner,
    compat.keras.layers.LSTMCell: LSTMRunner,
    compat.keras.layers.SimpleRNNCell: SimpleRNNRunner,
}


def project(
    xs: tf.Tensor, kernel: tf.Tensor, bias, batch_major: bool, masks: tuple | None = None
) -> tf.Tensor:
    """``xs @ kernel + bias`` as one matmul over all steps, returned time-major. With input
    dropout `masks` (``[B, F]`` each, the same at every step), ``(xs * mask) @ kernel``; with
    one mask per gate (Keras's implementation 1), each gate's columns take their own."""
    if masks is not None and len(masks) > 1:
        kernels = tf.split(kernel, len(masks), axis=1)
        biases = [None] * len(masks) if bias is None else tf.split(bias, len(masks))
        parts = [project(xs, k, b, batch_major, (m,)) for k, b, m in zip(kernels, biases, masks)]
        return tf.concat(parts, axis=-1)
    if masks is not None:  # [B, F] broadcast over the steps of [B, K, F] or [K, B, F]
        xs = xs * (masks[0][:, None] if batch_major else masks[0][None])
    shape = tf.shape(xs)
    flat = tf.reshape(xs, [-1, shape[2]])
    if kernel.dtype != xs.dtype:  # mixed precision: kept in float32
        flat = affine_in(flat, kernel, bias)
    else:
        flat = tf.matmul(flat, kernel)
        flat = flat if bias is None else tf.nn.bias_add(flat, bias)
    projected = tf.reshape(flat, [shape[0], shape[1], kernel.shape[-1]])
    return timeloop.time_major(projected) if batch_major else projected


def affine_in(x: tf.Tensor, kernel: tf.Tensor, bias=None) -> tf.Tensor:
    """``x @ kernel + bias`` in x's dtype, with kernel and bias kept in another (float32
    under mixed precision): their gradients are computed and summed in the kept dtype, as a
    Keras layer's are, rather than in 16 bits, where the sum over B*K rows overflows."""
    kept_dtype = kernel.dtype

    @tf.custom_gradient
    def affine(x, kernel, *bias):
        y = tf.matmul(x, tf.cast(kernel, x.dtype))
        y = tf.nn.bias_add(y, tf.cast(bias[0], x.dtype)) if bias else y

        def grad(dy):
            d_x = tf.matmul(dy, tf.cast(kernel, x.dtype), transpose_b=True)
            wide_x, wide_dy = tf.cast(x, kept_dtype), tf.cast(dy, kept_dtype)
            d_kernel = tf.matmul(wide_x, wide_dy, transpose_a=True)
            d_bias = [tf.reduce_sum(wide_dy, axis=0)] if bias else []
            return [d_x, d_kernel] + d_bias

        return y, grad

    return affine(x, kernel, *([] if bias is None else [bias]))

"""Runners: how each kind of Keras cell is run over a chunk (the one module that knows Keras
cells' attributes).

- Stock GRU/LSTM cells with sigmoid/tanh: the input projection ``x_t @ kernel + bias`` hoisted
  out of the loop (one ``[K*B, F] @ [F, G]`` matmul per chunk, forward and backward), and the
  compiled loop with its written-out backward (`gru.py`, `lstm.py`).
- Stock cells with other activations, recurrent dropout, and SimpleRNNCell: the projection
  hoisted, the step in the compiled loops of any step (`any_cell.StepLoops`).
- Any other Keras 3 cell: its own `call` on its weights (`compat.stateless_step`) in
  `StepLoops`; a cell that cannot run again on its weights runs as itself, one
  `cell(x_t, states)` call per step (`timeloop.unroll_time_major`), differentiated by autodiff.

Keras's dropout masks of a call (`randomness.DropoutMasks`) are drawn by the runner of their
cell and applied as Keras applies them.
"""

import abc
from typing import Optional

import tensorflow as tf

from tbptt._src.core import compat
from tbptt._src.core import randomness
from tbptt._src.core.randomness import DropoutMasks
from tbptt._src.recurrent.loops import any_cell
from tbptt._src.recurrent.loops import gru
from tbptt._src.recurrent.loops import lstm
from tbptt._src.recurrent.loops import timeloop


def runner_for(cell):
    """The fastest exact runner for `cell`: hoisted for stock Keras GRU/LSTM cells (exactly
    these classes: a subclass may change `call`), the cell itself otherwise."""
    return _RUNNERS.get(type(cell), _CellRunner)(cell)


def runs_cell_itself(cell) -> bool:
    """Whether the chain runs `cell` as itself (its own `call`), not a stock runner's step."""
    return type(cell) not in _RUNNERS


def cell_states(cell, leaves: list) -> list:
    """A cell's flat state `leaves` nested as its `state_size` is (a StackedRNNCells of an
    LSTM and a GRU takes ``[[h, c], h2]``), as the cell's `call` takes them."""
    def structure(size):
        if isinstance(size, (list, tuple)):
            return [structure(s) for s in size]
        return 0

    nest = structure(cell.state_size)
    return tf.nest.pack_sequence_as(nest if isinstance(nest, list) else [nest], list(leaves))


def run_layers(runners: list, states: list, xs: tf.Tensor, *, training: bool,
               with_outputs: bool = True, flags: Optional[timeloop.StepFlags] = None,
               loop: timeloop.LoopSettings = timeloop.LoopSettings(), masks: tuple = ()):
    """All layers over one chunk.

    Args:
      runners: one runner per layer, bottom first (see `runner_for`).
      states: one list of state tensors per layer.
      xs: the chunk's inputs, batch-major ``[B, K, F]``.
      training: passed to cells that run as themselves.
      with_outputs: whether the top layer's outputs are needed (a forward that only carries
        the state lets a step loop skip writing them).
      flags: the chunk's per-step reset and mask (None: no flags).
      loop: how the time loops run (see `timeloop.LoopSettings`).
      masks: each layer's `DropoutMasks` for this call (or None); () for none.

    Returns:
      ``(top outputs [K, B, U] time-major, or None when not needed and not made, new states
      per layer)``.
    """
    new_states = []
    for index, (runner, layer_states) in enumerate(zip(runners, states)):
        layer_masks = masks[index] if masks else None
        projected = runner.project(xs, batch_major=index == 0, masks=layer_masks)
        keep = with_outputs or index < len(runners) - 1
        xs, layer_states = runner.run(projected, layer_states, training=training,
                                      with_outputs=keep, flags=flags, loop=loop,
                                      masks=layer_masks)
        new_states.append(layer_states)
    return xs, new_states


def project(xs: tf.Tensor, kernel: tf.Tensor, bias, batch_major: bool,
             masks: Optional[tuple] = None) -> tf.Tensor:
    """``xs @ kernel + bias`` as one matmul over all steps, returned time-major. With input
    dropout `masks` (``[B, F]`` each, the same at every step), ``(xs * mask) @ kernel``; with
    one mask per gate (Keras's implementation 1), each gate's columns take their own."""
    if masks is not None and len(masks) > 1:
        kernels = tf.split(kernel, len(masks), axis=1)
        biases = [None] * len(masks) if bias is None else tf.split(bias, len(masks))
        return tf.concat([project(xs, k, b, batch_major, (m,))
                          for k, b, m in zip(kernels, biases, masks)], axis=-1)
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
            d_kernel = tf.matmul(tf.cast(x, kept_dtype), tf.cast(dy, kept_dtype), transpose_a=True)
            d_bias = [tf.reduce_sum(tf.cast(dy, kept_dtype), axis=0)] if bias else []
            return [d_x, d_kernel] + d_bias

        return y, grad

    return affine(x, kernel, *([] if bias is None else [bias]))


class _CellRunner:
    """Any cell: no projection. A Keras 3 cell that can run on its weights as tensors (see
    `compat.stateless_step`) gets the compiled `any_cell.StepLoops`; any other, one call per step."""

    def __init__(self, cell):
        self._cell = cell
        self._loops = {}  # training -> StepLoops, once the cell is built

    def project(self, xs, batch_major: bool, masks=None):
        del masks  # only stock cells take Keras's dropout (see `randomness.py`)
        return timeloop.time_major(xs) if batch_major else xs

    def draw_masks(self, batch) -> None:
        return None

    def run(self, xs, states, *, training: bool, with_outputs: bool, flags=None,
            loop: timeloop.LoopSettings = timeloop.LoopSettings(), masks=None):
        loops = None if timeloop.is_short(xs) else self._step_loops(training, xs, states)
        if loops is not None:
            return loops.run(xs, list(states), self._weights(), flags, loop)

        def step(x, states):
            y, new_states = compat.call_layer(self._cell, x, cell_states(self._cell, states),
                                              training=training)
            return y, tf.nest.flatten(new_states)
        return timeloop.unroll_time_major(step, xs, states, with_outputs=with_outputs, flags=flags,
                                 loop=loop)

    def _weights(self) -> list:
        return [tf.convert_to_tensor(v) for v in self._cell.trainable_variables]

    def _step_loops(self, training: bool, xs, states) -> Optional[any_cell.StepLoops]:
        """The cell's `any_cell.StepLoops`, or None for a cell that cannot be run again alike: no
        stateless step (see `compat.stateless_step`), or one that draws random numbers or
        changes a variable (a step run again in the backward would be another step)."""
        if training not in self._loops:
            own_step = compat.stateless_step(self._cell, training)
            if own_step is None:
                return None  # not kept: the cell may be built later

            def step(x, states, weights):
                return own_step(x, cell_states(self._cell, states), weights)
            specs = [tf.TensorSpec(xs.shape[1:], xs.dtype),
                     [tf.TensorSpec(s.shape, s.dtype) for s in states],
                     [tf.TensorSpec(w.shape, w.dtype) for w in self._weights()]]
            self._loops.setdefault(training, None if randomness.draws_or_writes(step, specs)
                                   else any_cell.StepLoops(step))
        return self._loops[training]


class _FusedRunner(abc.ABC):
    """A stock Keras cell whose input projection is hoisted; the time loop has a hand-written
    backward when its activations are the defaults (tanh, sigmoid), autodiff otherwise.

    A subclass says how the cell's weights split into the projection and the recurrent part, and
    gives one step (for flags and other activations) and the fused sequence.
    """

    def __init__(self, cell):
        self._cell = cell
        # weights: [recurrent_kernel], the recurrent bias where there is one, then the
        # recurrent dropout masks where there are some (constants of the call)
        self._loops = any_cell.StepLoops(lambda x, states, weights: self._step(
            x, states, *self._split_weights(weights)), output_is_state=True)

    def _split_weights(self, weights: list) -> tuple:
        """``[recurrent_kernel, (recurrent_bias), *masks]`` -> (kernel, bias or None, masks
        or None)."""
        with_bias = self._has_recurrent_bias()
        bias = weights[1] if with_bias else None
        masks = tuple(weights[1 + with_bias:]) or None
        return weights[0], bias, masks

    def draw_masks(self, batch) -> Optional[DropoutMasks]:
        """The cell's dropout masks for one call, drawn from its seed generator as Keras's
        RNN draws them before its loop: the inputs' masks ``[B, F]``, then the state's
        ``[B, U]``, one per gate where the cell counts them (implementation 1), in the cell's
        compute dtype. None when the cell has no dropout."""
        cell = self._cell
        dtype = compat.compute_dtype(cell)

        def draw(rate, width):
            if not 0.0 < rate < 1.0:
                return None
            ones = tf.ones(tf.stack([batch, width]), dtype)
            return tuple(compat.keras.random.dropout(ones, rate=rate, seed=cell.seed_generator)
                         for _ in range(getattr(cell, "dropout_mask_count", None) or 1))

        masks = DropoutMasks(draw(cell.dropout, cell.kernel.shape[0]),
                             draw(cell.recurrent_dropout, cell.units))
        return None if masks == DropoutMasks() else masks

    def _weight(self, name: str):
        """A weight as it is kept (float32 under mixed precision): the loops cast it to the
        compute dtype inside, so its gradient is summed in the kept dtype, as Keras sums it."""
        return tf.convert_to_tensor(getattr(self._cell, name))

    def _default_activations(self) -> bool:
        activations = compat.keras.activations
        return (self._cell.activation is activations.tanh
                and self._cell.recurrent_activation is activations.sigmoid)

    def project(self, xs, batch_major: bool, masks: Optional[DropoutMasks] = None):
        return project(xs, self._weight("kernel"), self._input_bias(), batch_major,
                        None if masks is None else masks.inputs)

    def run(self, xs, states, *, training: bool, with_outputs: bool, flags=None,
            loop: timeloop.LoopSettings = timeloop.LoopSettings(), masks: Optional[DropoutMasks] = None):
        """The layer over ``xs [K, B, 3U or 4U]`` (projected, input dropout applied): the
        compiled loop with its written-out backward for sigmoid/tanh cells, flags or not (a
        forward that only carries the state runs it too: the same program, so the same state
        to the last bit); the step loop otherwise, and with recurrent dropout."""
        del training  # dropout comes as the call's masks; nothing else depends on it
        recurrent_kernel = self._weight("recurrent_kernel")
        recurrent_bias = self._recurrent_bias()
        recurrent_masks = None if masks is None else masks.recurrent
        if recurrent_masks is not None:
            return self._step_loop(xs, states, recurrent_kernel, recurrent_bias,
                                   recurrent_masks, with_outputs, flags, loop)
        if self._default_activations() and not timeloop.is_short(xs):
            length = timeloop.length_of(xs)
            outputs, states = self._fused(
                timeloop.padded_steps(xs, length, loop.max_steps), tf.convert_to_tensor(length, tf.int32),
                states, recurrent_kernel, recurrent_bias, loop.compiled_alone(),
                timeloop.padded_flags(flags, length, loop.max_steps))
            return outputs[:length], states
        return self._step_loop(xs, states, recurrent_kernel, recurrent_bias, None,
                               with_outputs, flags, loop)

    def _step_loop(self, xs, states, recurrent_kernel, recurrent_bias, recurrent_masks,
                   with_outputs: bool, flags, loop: timeloop.LoopSettings):
        """The compiled loops of `_step` (other activations, recurrent dropout), or the
        step unrolled on a few steps."""
        if not timeloop.is_short(xs):
            weights = [recurrent_kernel] + ([] if recurrent_bias is None else [recurrent_bias])
            weights += list(recurrent_masks or ())
            return self._loops.run(xs, list(states), weights, flags, loop)

        kernel, bias = [None if w is None else tf.cast(w, xs.dtype)
                        for w in (recurrent_kernel, recurrent_bias)]

        def step(x, s):
            return self._step(x, s, kernel, bias, recurrent_masks)
        return timeloop.unroll_time_major(step, xs, states, with_outputs=with_outputs, flags=flags,
                                 loop=loop, output_is_state=True)

    @abc.abstractmethod
    def _input_bias(self):
        """The bias added to the hoisted projection, or None."""

    @abc.abstractmethod
    def _recurrent_bias(self):
        """The bias added to the recurrent matmul inside the loop, or None."""

    def _has_recurrent_bias(self) -> bool:
        """Whether `_recurrent_bias` is one (told without reading the weights)."""
        return False

    @abc.abstractmethod
    def _step(self, x, states, recurrent_kernel, recurrent_bias, recurrent_masks=None):
        """One step on a projected input: ``(output, new states)``; `recurrent_masks` (a
        tuple of ``[B, U]``, one per gate or one) multiply the state entering the recurrent
        products, as Keras's recurrent dropout does."""

    @abc.abstractmethod
    def _fused(self, xs, length, states, recurrent_kernel, recurrent_bias, jit: bool,
               flags: tuple):
        """The first `length` steps of ``xs [P, B, G]`` (padded), with the loop's hand-written
        backward (each loop compiled with XLA with `jit`): ``(outputs [P, B, U], states)``,
        the outputs past `length` zero. `flags`: the padded ``(kinds, tensors)`` of
        `timeloop.padded_flags`."""


class _GRURunner(_FusedRunner):
    """Keras `GRUCell`, reset_after either way: the same arithmetic as its `call`."""

    def _input_bias(self):
        if not self._cell.use_bias:
            return None
        bias = self._weight("bias")
        return bias[0] if self._cell.reset_after else bias

    def _recurrent_bias(self):
        if not self._has_recurrent_bias():
            return None
        return self._weight("bias")[1]

    def _has_recurrent_bias(self) -> bool:
        return bool(self._cell.use_bias and self._cell.reset_after)

    def _step(self, x, states, recurrent_kernel, recurrent_bias, recurrent_masks=None):
        cell = self._cell
        if recurrent_masks is not None:
            h = gru.step_dropped(x, states[0], recurrent_kernel, recurrent_bias,
                                  cell.reset_after, cell.activation, cell.recurrent_activation,
                                  recurrent_masks)
            return h, [h]
        h = gru.step(x, states[0], recurrent_kernel, recurrent_bias, cell.reset_after,
                      cell.activation, cell.recurrent_activation)[0]
        return h, [h]

    def _fused(self, xs, length, states, recurrent_kernel, recurrent_bias, jit: bool,
               flags: tuple):
        if recurrent_bias is None:
            recurrent_bias = tf.zeros([recurrent_kernel.shape[-1]], recurrent_kernel.dtype)
        kinds, flags = flags
        outputs, h = gru.sequence(self._cell.reset_after, jit, kinds)(
            xs, length, states[0], recurrent_kernel, recurrent_bias, *flags)
        return outputs, [h]


class _LSTMRunner(_FusedRunner):
    """Keras `LSTMCell`: the same arithmetic as its `call`."""

    def _input_bias(self):
        return self._weight("bias") if self._cell.use_bias else None

    def _recurrent_bias(self):
        return None

    def _step(self, x, states, recurrent_kernel, recurrent_bias, recurrent_masks=None):
        del recurrent_bias
        cell = self._cell
        if recurrent_masks is not None:
            h, c = lstm.step_dropped(x, states[0], states[1], recurrent_kernel,
                                      cell.activation, cell.recurrent_activation,
                                      recurrent_masks)
            return h, [h, c]
        h, c = lstm.step(x, states[0], states[1], recurrent_kernel, cell.activation,
                          cell.recurrent_activation)[:2]
        return h, [h, c]

    def _fused(self, xs, length, states, recurrent_kernel, recurrent_bias, jit: bool,
               flags: tuple):
        del recurrent_bias
        kinds, flags = flags
        outputs, h, c = lstm.sequence(jit, kinds)(xs, length, states[0], states[1],
                                                   recurrent_kernel, *flags)
        return outputs, [h, c]


class _SimpleRNNRunner(_FusedRunner):
    """Keras `SimpleRNNCell`: ``h = activation(x @ kernel + bias + h @ recurrent_kernel)``, its
    input projection hoisted; no written-out backward (its time loop is `any_cell.StepLoops`')."""

    def _default_activations(self) -> bool:
        return False

    def _input_bias(self):
        return self._weight("bias") if self._cell.use_bias else None

    def _recurrent_bias(self):
        return None

    def _step(self, x, states, recurrent_kernel, recurrent_bias, recurrent_masks=None):
        del recurrent_bias
        state = states[0] if recurrent_masks is None else states[0] * recurrent_masks[0]
        h = x + tf.matmul(state, recurrent_kernel)
        if self._cell.activation is not None:
            h = self._cell.activation(h)
        return h, [h]

    def _fused(self, xs, length, states, recurrent_kernel, recurrent_bias, jit: bool,
               flags: tuple):
        raise AssertionError("SimpleRNNCell has no written-out backward")


_RUNNERS = {compat.keras.layers.GRUCell: _GRURunner, compat.keras.layers.LSTMCell: _LSTMRunner,
            compat.keras.layers.SimpleRNNCell: _SimpleRNNRunner}

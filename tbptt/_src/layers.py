"""One recurrent layer run over a whole chunk, time-major, with its input projection hoisted.

A chunk is run layer by layer rather than step by step: layer l sees the outputs of layer l-1
for all K steps at once. That is the same function, and it lets the input half of a Keras
`GRUCell` or `LSTMCell` (``x_t @ kernel + bias``) be one ``[K*B, F] @ [F, G]`` matmul per chunk
instead of K small ones, forward and backward. Only the recurrent half stays in the time loop.

Every layer's time loop is compiled with XLA, each loop on its own (`_loop_call`): XLA fuses a
step's element-wise ops into a few kernels and runs the loop without TensorFlow's per-op cost,
which at these sizes is most of a step. The chunk loops around them stay in TensorFlow.

- Stock GRU/LSTM cells with sigmoid/tanh: the forward keeps the gates and the backward loop is
  written out (`_gru_sequence`, `_lstm_sequence`).
- Any other step with explicit weights (`StepLoops`): the forward keeps the state entering each
  step, and the backward loop runs each step again under a tape and pulls its cotangent back.
  GRU/LSTM cells with other activations and `SimpleRNNCell` run their hoisted step so; any
  other Keras 3 cell runs its own `call` on its weights (`compat.stateless_step`).
- A cell that cannot run again on its weights runs as itself, one `cell(x_t, states)` call per
  step (`unroll_time_major`), differentiated by autodiff.

Per-step flags (`StepFlags`): `reset` gives a row a fresh zero state before step t (episodes
packed end to end), `mask` keeps a row's state through step t (padding). They are `where`s
before and after a step (`flagged`), taken by every loop, forward and backward alike
(`_through_flags` is their transpose).
"""

import abc
import functools
from typing import NamedTuple, Optional

import tensorflow as tf

from tbptt._src.core import compat
from tbptt._src.core import randomness
from tbptt._src.core.randomness import DropoutMasks


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


class Loop(NamedTuple):
    """How one chunk's time loops run.

    Attributes:
      max_steps: a bound of K where K is unknown when the loop is traced (the chunk size): XLA
        sizes autodiff's accumulators with it, and the compiled loops pad every chunk to it.
      xla: compile the loops of stock cells with XLA, each on its own (the chain's config
        says; False: a device without an XLA compiler).
    """

    max_steps: Optional[tf.Tensor] = None
    xla: bool = True

    def compiled_alone(self) -> bool:
        """`xla`, and never inside a function that XLA compiles as a whole: a compiled
        function nested in the cluster sees the chunk's dynamic length as a padded bound and
        returns wrong values (the enclosing cluster compiles the plain loop anyway)."""
        return self.xla and not compat.in_xla_context()


class StepFlags(NamedTuple):
    """Per-row, per-step flags of one chunk, time-major ``[K, B]`` bool (None: no flag)."""

    reset: Optional[tf.Tensor] = None
    mask: Optional[tf.Tensor] = None


def _rows(flag: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """``[B]`` bool reshaped to broadcast against ``like [B, ...]``."""
    return tf.reshape(flag, [-1] + [1] * (like.shape.rank - 1))


def entering(states: list, reset) -> list:
    """The states a step starts from: zero in the rows of ``reset [B]`` (None: no reset)."""
    if reset is None:
        return list(states)
    return [tf.where(_rows(reset, s), tf.zeros_like(s), s) for s in states]


def kept(new_states: list, states: list, mask) -> list:
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
        new_states = kept(new_states, states, mask)
        return (new_states[0] if output_is_state else y), new_states
    return run


def time_major(xs: tf.Tensor) -> tf.Tensor:
    """``[B, K, ...] <-> [K, B, ...]``."""
    return tf.transpose(xs, [1, 0] + list(range(2, xs.shape.rank)))


def unroll_time_major(step, xs: tf.Tensor, states: list, *, with_outputs: bool,
                      flags: Optional[StepFlags] = None, loop: Loop = Loop(),
                      output_is_state: bool = False):
    """``step(x_t, states) -> (y_t, states)`` over ``xs [K, B, ...]``; outputs ``[K, B, U]``.

    With `flags`, each step is `flagged` with the step's reset and mask (and
    `output_is_state`); `loop.max_steps` bounds K where it is unknown when traced (autodiff
    inside XLA sizes its accumulators).
    """
    if is_short(xs):
        return _unrolled(step, xs, states, with_outputs=with_outputs, flags=flags,
                         output_is_state=output_is_state)
    steps = _length(xs)
    inputs = _readable(xs)
    outputs = tf.TensorArray(xs.dtype, size=steps) if with_outputs else None
    with_flags = flagged(step, output_is_state) if flags is not None else None
    flag_arrays = [None if f is None else tf.TensorArray(tf.bool, size=steps).unstack(f)
                   for f in (flags or ())]

    def body(t, states, *outputs):
        if with_flags is None:
            y, states = step(inputs.read(t), states)
        else:
            y, states = with_flags(inputs.read(t), states,
                                   *[None if a is None else a.read(t) for a in flag_arrays])
        return (t + 1, list(states)) + ((outputs[0].write(t, y),) if with_outputs else ())

    loop_vars = (tf.constant(0), list(states)) + ((outputs,) if with_outputs else ())
    bound = steps if loop.max_steps is None else loop.max_steps
    _, states, *outputs = tf.while_loop(lambda t, *_: t < steps, body, loop_vars,
                                        maximum_iterations=bound)
    return (outputs[0].stack() if with_outputs else None), states


# A loop of at most this many steps, known when traced, is unrolled into plain ops: an online
# step (a model serving one observation at a time) pays no loop and no XLA launch.
SHORT_STEPS = 8


def is_short(xs: tf.Tensor) -> bool:
    """Whether ``xs [K, ...]`` has a static K of at most `SHORT_STEPS` steps."""
    return xs.shape[0] is not None and xs.shape[0] <= SHORT_STEPS


def _unrolled(step, xs: tf.Tensor, states: list, *, with_outputs: bool,
              flags: Optional[StepFlags] = None, output_is_state: bool = False):
    """`unroll_time_major` over a short, static K as K copies of the step."""
    run = flagged(step, output_is_state) if flags is not None else (
        lambda x, s, *_: step(x, s))
    outputs = []
    for t in range(xs.shape[0]):
        y, states = run(xs[t], list(states), *[None if f is None else f[t]
                                                 for f in (flags or (None, None))])
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

    outputs, leaves = unroll_time_major(flat_step, time_major(tf.convert_to_tensor(inputs)),
                                        tf.nest.flatten(state), with_outputs=True)
    return time_major(outputs), tf.nest.pack_sequence_as(state, leaves)


def run_layers(runners: list, states: list, xs: tf.Tensor, *, training: bool,
               with_outputs: bool = True, flags: Optional[StepFlags] = None,
               loop: Loop = Loop(), masks: tuple = ()):
    """All layers over one chunk.

    Args:
      runners: one runner per layer, bottom first (see `runner_for`).
      states: one list of state tensors per layer.
      xs: the chunk's inputs, batch-major ``[B, K, F]``.
      training: passed to cells that run as themselves.
      with_outputs: whether the top layer's outputs are needed (a forward that only carries
        the state lets a step loop skip writing them).
      flags: the chunk's per-step reset and mask (None: no flags).
      loop: how the time loops run (see `Loop`).
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


def _project(xs: tf.Tensor, kernel: tf.Tensor, bias, batch_major: bool,
             masks: Optional[tuple] = None) -> tf.Tensor:
    """``xs @ kernel + bias`` as one matmul over all steps, returned time-major. With input
    dropout `masks` (``[B, F]`` each, the same at every step), ``(xs * mask) @ kernel``; with
    one mask per gate (Keras's implementation 1), each gate's columns take their own."""
    if masks is not None and len(masks) > 1:
        kernels = tf.split(kernel, len(masks), axis=1)
        biases = [None] * len(masks) if bias is None else tf.split(bias, len(masks))
        return tf.concat([_project(xs, k, b, batch_major, (m,))
                          for k, b, m in zip(kernels, biases, masks)], axis=-1)
    if masks is not None:  # [B, F] broadcast over the steps of [B, K, F] or [K, B, F]
        xs = xs * (masks[0][:, None] if batch_major else masks[0][None])
    shape = tf.shape(xs)
    flat = tf.reshape(xs, [-1, shape[2]])
    if kernel.dtype != xs.dtype:  # mixed precision: kept in float32
        flat = _affine_in(flat, kernel, bias)
    else:
        flat = tf.matmul(flat, kernel)
        flat = flat if bias is None else tf.nn.bias_add(flat, bias)
    projected = tf.reshape(flat, [shape[0], shape[1], kernel.shape[-1]])
    return time_major(projected) if batch_major else projected


def _affine_in(x: tf.Tensor, kernel: tf.Tensor, bias=None) -> tf.Tensor:
    """``x @ kernel + bias`` in x's dtype, with kernel and bias kept in another (float32
    under mixed precision): their gradients are computed and summed in the kept dtype, as a
    Keras layer's are, rather than in 16 bits, where the sum over B*K rows overflows."""
    kept = kernel.dtype

    @tf.custom_gradient
    def affine(x, kernel, *bias):
        y = tf.matmul(x, tf.cast(kernel, x.dtype))
        y = tf.nn.bias_add(y, tf.cast(bias[0], x.dtype)) if bias else y

        def grad(dy):
            d_x = tf.matmul(dy, tf.cast(kernel, x.dtype), transpose_b=True)
            d_kernel = tf.matmul(tf.cast(x, kept), tf.cast(dy, kept), transpose_a=True)
            d_bias = [tf.reduce_sum(tf.cast(dy, kept), axis=0)] if bias else []
            return [d_x, d_kernel] + d_bias

        return y, grad

    return affine(x, kernel, *([] if bias is None else [bias]))


def weight_product(a: tf.Tensor, b: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """``sum_t a_t^T b_t`` over ``[K, B, M]`` and ``[K, B, N]``: a weight's gradient over
    all steps as one matmul, in the weight's kept `dtype`."""
    return tf.matmul(tf.cast(_flat_steps(a), dtype), tf.cast(_flat_steps(b), dtype),
                     transpose_a=True)


class _CellRunner:
    """Any cell: no projection. A Keras 3 cell that can run on its weights as tensors (see
    `compat.stateless_step`) gets the compiled `StepLoops`; any other, one call per step."""

    def __init__(self, cell):
        self._cell = cell
        self._loops = {}  # training -> StepLoops, once the cell is built

    def project(self, xs, batch_major: bool, masks=None):
        del masks  # only stock cells take Keras's dropout (see `randomness.py`)
        return time_major(xs) if batch_major else xs

    def draw_masks(self, batch) -> None:
        return None

    def run(self, xs, states, *, training: bool, with_outputs: bool, flags=None,
            loop: Loop = Loop(), masks=None):
        loops = None if is_short(xs) else self._step_loops(training, xs, states)
        if loops is not None:
            return loops.run(xs, list(states), self._weights(), flags, loop)

        def step(x, states):
            y, new_states = compat.call_layer(self._cell, x, cell_states(self._cell, states),
                                              training=training)
            return y, tf.nest.flatten(new_states)
        return unroll_time_major(step, xs, states, with_outputs=with_outputs, flags=flags,
                                 loop=loop)

    def _weights(self) -> list:
        return [tf.convert_to_tensor(v) for v in self._cell.trainable_variables]

    def _step_loops(self, training: bool, xs, states) -> Optional["StepLoops"]:
        """The cell's `StepLoops`, or None for a cell that cannot be run again alike: no
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
                                   else StepLoops(step))
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
        self._loops = StepLoops(lambda x, states, weights: self._step(
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
        return _project(xs, self._weight("kernel"), self._input_bias(), batch_major,
                        None if masks is None else masks.inputs)

    def run(self, xs, states, *, training: bool, with_outputs: bool, flags=None,
            loop: Loop = Loop(), masks: Optional[DropoutMasks] = None):
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
        if self._default_activations() and not is_short(xs):
            length = _length(xs)
            outputs, states = self._fused(
                _padded_steps(xs, length, loop.max_steps), tf.convert_to_tensor(length, tf.int32),
                states, recurrent_kernel, recurrent_bias, loop.compiled_alone(),
                _padded_flags(flags, length, loop.max_steps))
            return outputs[:length], states
        return self._step_loop(xs, states, recurrent_kernel, recurrent_bias, None,
                               with_outputs, flags, loop)

    def _step_loop(self, xs, states, recurrent_kernel, recurrent_bias, recurrent_masks,
                   with_outputs: bool, flags, loop: Loop):
        """The compiled loops of `_step` (other activations, recurrent dropout), or the
        step unrolled on a few steps."""
        if not is_short(xs):
            weights = [recurrent_kernel] + ([] if recurrent_bias is None else [recurrent_bias])
            weights += list(recurrent_masks or ())
            return self._loops.run(xs, list(states), weights, flags, loop)

        kernel, bias = [None if w is None else tf.cast(w, xs.dtype)
                        for w in (recurrent_kernel, recurrent_bias)]

        def step(x, s):
            return self._step(x, s, kernel, bias, recurrent_masks)
        return unroll_time_major(step, xs, states, with_outputs=with_outputs, flags=flags,
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
        `_padded_flags`."""


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
            h = _gru_step_dropped(x, states[0], recurrent_kernel, recurrent_bias,
                                  cell.reset_after, cell.activation, cell.recurrent_activation,
                                  recurrent_masks)
            return h, [h]
        h = _gru_step(x, states[0], recurrent_kernel, recurrent_bias, cell.reset_after,
                      cell.activation, cell.recurrent_activation)[0]
        return h, [h]

    def _fused(self, xs, length, states, recurrent_kernel, recurrent_bias, jit: bool,
               flags: tuple):
        if recurrent_bias is None:
            recurrent_bias = tf.zeros([recurrent_kernel.shape[-1]], recurrent_kernel.dtype)
        kinds, flags = flags
        outputs, h = _gru_sequence(self._cell.reset_after, jit, kinds)(
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
            h, c = _lstm_step_dropped(x, states[0], states[1], recurrent_kernel,
                                      cell.activation, cell.recurrent_activation,
                                      recurrent_masks)
            return h, [h, c]
        h, c = _lstm_step(x, states[0], states[1], recurrent_kernel, cell.activation,
                          cell.recurrent_activation)[:2]
        return h, [h, c]

    def _fused(self, xs, length, states, recurrent_kernel, recurrent_bias, jit: bool,
               flags: tuple):
        del recurrent_bias
        kinds, flags = flags
        outputs, h, c = _lstm_sequence(jit, kinds)(xs, length, states[0], states[1],
                                                   recurrent_kernel, *flags)
        return outputs, [h, c]


class _SimpleRNNRunner(_FusedRunner):
    """Keras `SimpleRNNCell`: ``h = activation(x @ kernel + bias + h @ recurrent_kernel)``, its
    input projection hoisted; no written-out backward (its time loop is `StepLoops`')."""

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


# -- one step on a projected input, and its backward ----------------------------------------------
#
# The forward of a step serves the runners (step by step, autodiff) and the hand-written loops;
# each backward below is the exact transpose of the step above it for sigmoid/tanh, written out
# so that a loop's backward keeps only the gates (see `_gru_sequence`).


def _gru_step(x, h, recurrent_kernel, recurrent_bias, reset_after: bool, activation,
              recurrent_activation):
    """Keras `GRUCell.call` on ``x = inputs @ kernel + input_bias`` ``[B, 3U]``.

    Returns ``(h, z, r, hh, aux)``: the new state, the gates, the candidate, and what the
    backward needs of the candidate's recurrent term (reset_after: ``h @ U_h + b``; else the
    reset state ``r * h``).
    """
    units = recurrent_kernel.shape[0]
    x_gates, x_candidate = tf.split(x, [2 * units, units], axis=1)
    if reset_after:
        inner = tf.matmul(h, recurrent_kernel)
        if recurrent_bias is not None:
            inner = tf.nn.bias_add(inner, recurrent_bias)
        inner_gates, aux = tf.split(inner, [2 * units, units], axis=1)
    else:
        inner_gates = tf.matmul(h, recurrent_kernel[:, :2 * units])
    z, r = tf.split(recurrent_activation(x_gates + inner_gates), 2, axis=1)
    if reset_after:
        candidate = r * aux
    else:
        aux = r * h
        candidate = tf.matmul(aux, recurrent_kernel[:, 2 * units:])
    hh = activation(x_candidate + candidate)
    return z * h + (1 - z) * hh, z, r, hh, aux


def _gru_step_dropped(x, h, recurrent_kernel, recurrent_bias, reset_after: bool, activation,
                      recurrent_activation, masks: tuple):
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


class GRUKernels(NamedTuple):
    """The recurrent kernel ``[U, 3U]`` split as the step backward uses it, once per loop."""

    inner: tf.Tensor  # the columns the recurrent matmul uses: [U, 3U] reset_after, else gates'
    candidate: tf.Tensor  # [U, U]: the candidate's columns


def _gru_kernels(recurrent_kernel, reset_after: bool) -> GRUKernels:
    units = recurrent_kernel.shape[0]
    inner = recurrent_kernel if reset_after else recurrent_kernel[:, :2 * units]
    return GRUKernels(inner, recurrent_kernel[:, 2 * units:])


def _gru_step_backward(dh, h_prev, z, r, hh, aux, kernels: GRUKernels, reset_after: bool):
    """The transpose of a sigmoid/tanh `_gru_step` at one step.

    Args:
      dh: dLoss/dh_t ``[B, U]`` (this step's output gradient plus the carried one).
      h_prev, z, r, hh, aux: the step's input state and what `_gru_step` returned.

    Returns:
      ``(dh_prev [B, U], d_step)``: the gradient of the state entering the step, and the
      step's other gradients in one tensor (one write per step in a loop; `_gru_step_parts`
      splits them). Its first columns are the recurrent matmul's output gradient ``d_inner``
      (gates, then with reset_after the candidate's recurrent term), then the candidate's
      pre-activation gradient: ``[B, 4U]`` reset_after, else ``[B, 3U]``.
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
    d_inner = tf.concat([dz * z * (1 - z), dr * r * (1 - r)]
                        + ([d_pre_candidate * r] if reset_after else []), axis=1)
    dh_prev += tf.matmul(d_inner, kernels.inner, transpose_b=True)
    return dh_prev, tf.concat([d_inner, d_pre_candidate], axis=1)


def _gru_step_parts(d_step: tf.Tensor, units: int, reset_after: bool) -> tuple:
    """`_gru_step_backward`'s d_step ``[..., 4U or 3U]`` -> (the projected input's gradient
    ``[..., 3U]``: gates then candidate, the recurrent matmul's output gradient ``[..., 3U
    or 2U]``)."""
    inner = d_step[..., :-units]
    if not reset_after:
        return d_step, inner
    return tf.concat([d_step[..., :2 * units], d_step[..., 3 * units:]], axis=-1), inner


def _lstm_step(x, h, c, recurrent_kernel, activation, recurrent_activation):
    """Keras `LSTMCell.call` on ``x = inputs @ kernel + bias`` ``[B, 4U]``.

    Returns ``(h, c, i, f, o, g, activation(c))``.
    """
    z_i, z_f, z_c, z_o = tf.split(x + tf.matmul(h, recurrent_kernel), 4, axis=1)
    i, f, o = recurrent_activation(z_i), recurrent_activation(z_f), recurrent_activation(z_o)
    g = activation(z_c)
    c = f * c + i * g
    activation_c = activation(c)
    return o * activation_c, c, i, f, o, g, activation_c


def _lstm_step_dropped(x, h, c, recurrent_kernel, activation, recurrent_activation,
                       masks: tuple):
    """Keras `LSTMCell.call` with recurrent dropout (its implementation 1) on ``x = inputs @
    kernel + bias`` ``[B, 4U]``: each gate's recurrent product takes the state times its own
    mask of ``masks`` (4 of ``[B, U]``). Returns ``(h, c)``."""
    kernels = tf.split(recurrent_kernel, 4, axis=1)
    z_i, z_f, z_c, z_o = [x_g + tf.matmul(h * m, k) for x_g, m, k in
                          zip(tf.split(x, 4, axis=1), masks, kernels)]
    i, f, o = recurrent_activation(z_i), recurrent_activation(z_f), recurrent_activation(z_o)
    c = f * c + i * activation(z_c)
    return o * activation(c), c


def _lstm_step_backward(dh, dc, c_prev, i, f, o, g, tanh_c, recurrent_kernel):
    """The transpose of a sigmoid/tanh `_lstm_step` at one step.

    Args:
      dh, dc: dLoss/dh_t (output gradient plus carried) and the carried dLoss/dc_t ``[B, U]``.
      c_prev, i, f, o, g, tanh_c: the step's input cell state and what `_lstm_step` returned.

    Returns:
      ``(dh_prev, dc_prev [B, U], d_x [B, 4U])``: d_x is also the gradient of the recurrent
      matmul's output, so dW = sum_t h_{t-1}^T d_x_t.
    """
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    d_x = tf.concat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                     dh * tanh_c * o * (1 - o)], axis=1)
    return tf.matmul(d_x, recurrent_kernel, transpose_b=True), dc * f, d_x


# -- hand-written backward passes of whole time loops ---------------------------------------
#
# Autodiff of a tf.while_loop pushes every intermediate of every step onto a stack and pops it
# in a loop of one gradient op per forward op. Here the forward keeps only the gates, and the
# backward loop runs the step backward alone: the weight gradients are one matmul over all
# steps after the loop (sum_t h_{t-1}^T @ d_inner_t = H_prev^T @ D_inner).


@functools.lru_cache(maxsize=None)
def _loop_function(fn, jit: bool, **static):
    """`_loop_call` of `fn(*tensors, **static)`: one per function and static setting, shared
    by every chain, traced per shape and dtype."""
    return _loop_call(functools.partial(fn, **static), jit)


def _loop_call(plain, jit: bool):
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
            seeds = [tf.zeros_like(y) if d is None else d
                     for y, d in zip(tf.nest.flatten(outputs), d_outputs)]
            floats = iter(vjp(list(args), seeds))
            return [next(floats) if a.dtype.is_floating else None for a in args]

        return outputs, grad

    return call


def _readable(stacked: tf.Tensor) -> tf.TensorArray:
    """A ``[K, ...]`` tensor as a TensorArray, to read step t of it in a loop."""
    return tf.TensorArray(stacked.dtype, size=_length(stacked)).unstack(stacked)


def _length(stacked: tf.Tensor):
    """The leading dimension: a Python int when it is known (XLA needs fixed list sizes)."""
    return stacked.shape[0] if stacked.shape[0] is not None else tf.shape(stacked)[0]


def _padded_steps(xs: tf.Tensor, length, max_steps) -> tf.Tensor:
    """``xs [K, B, ...]`` padded with zero steps to the chunk size `max_steps`, so that every
    chunk of a call, the last and shorter one too, is one shape that XLA compiles once; or,
    for a whole sequence, to the power of two at or above K (few shapes for many lengths).
    The loops run the first K steps only."""
    if max_steps is None:
        target = tf.cast(2.0 ** tf.math.ceil(tf.math.log(tf.cast(length, tf.float64))
                                             / tf.math.log(tf.constant(2.0, tf.float64))),
                         tf.int32)
        target = tf.maximum(target, tf.cast(length, tf.int32))  # rounding at exact powers
    else:
        target = tf.maximum(tf.cast(max_steps, tf.int32), tf.cast(length, tf.int32))
    return tf.pad(xs, [[0, target - length]] + [[0, 0]] * (xs.shape.rank - 1))


def _padded_flags(flags: Optional[StepFlags], length, max_steps) -> tuple:
    """``(kinds, tensors)``: the names of the flags given, a static part of the loops
    ("reset", "mask"; () without flags), and each as ``[P, B, 1]`` bool padded as
    `_padded_steps` pads the inputs, to read one step's rows in a loop and broadcast them over
    the units."""
    given = [] if flags is None else [(k, f) for k, f in zip(StepFlags._fields, flags)
                                      if f is not None]
    return tuple(k for k, _ in given), tuple(
        tf.cast(_padded_steps(tf.cast(f[..., None], tf.int8), length, max_steps), tf.bool)
        for _, f in given)


def _previous(first: tf.Tensor, stacked: tf.Tensor) -> tf.Tensor:
    """``[first, stacked[0], ..., stacked[K-2]]``: the value entering each step."""
    return tf.concat([first[None], stacked[:-1]], axis=0)


def _flat_steps(stacked: tf.Tensor) -> tf.Tensor:
    """``[K, B, N] -> [K*B, N]``."""
    return tf.reshape(stacked, [-1, tf.shape(stacked)[-1]])


def _flag_steps(flags: tuple, kinds: tuple):
    """The loop's reader of step t's ``(reset_t, mask_t) [B, 1]`` (None where not given)."""
    readers = dict(zip(kinds, [_readable(f) for f in flags]))
    return lambda t: tuple(readers[k].read(t) if k in readers else None
                           for k in StepFlags._fields)


def _gru_loop(projected, length, h0, recurrent_kernel, recurrent_bias, *flags,
              reset_after: bool, kinds: tuple):
    """`_gru_step` over the first `length` steps of ``projected [P, B, 3U]``, each `flagged`
    by `flags` (the `kinds` of `_padded_flags`): ``(saved [P, B, 5U or 6U], h_length)``,
    where each step saved (h, z, r, hh, aux), and with flags the state it started from, in one
    write (zeros past `length`)."""
    steps = length
    xs = _readable(projected)
    flags_at = _flag_steps(flags, kinds)

    def body(t, h, saved):
        reset, mask = flags_at(t)
        h_in = entering([h], reset)[0]
        values = _gru_step(xs.read(t), h_in, recurrent_kernel, recurrent_bias, reset_after,
                           tf.tanh, tf.sigmoid)
        h_next = kept([values[0]], [h_in], mask)[0]  # a masked row outputs the kept state
        row = (h_next,) + values[1:] + ((h_in,) if flags else ())
        return t + 1, h_next, saved.write(t, tf.concat(row, axis=1))

    _, h_last, saved = tf.while_loop(
        lambda t, *_: t < steps, body,
        (tf.constant(0), h0, tf.TensorArray(projected.dtype, size=_length(projected))))
    return saved.stack(), h_last


def _through_flags(d_state: list, d_own: list, step_backward, reset, mask) -> tuple:
    """The transpose of one `flagged` step.

    Args:
      d_state: the carried gradients of the states after the step.
      d_own: the gradients of the states after the step from elsewhere (the output's: a
        masked row outputs the state it keeps, see `flagged`), or None.
      step_backward: ``d_new_states -> (d_states_in, d_step)``, the unflagged step's
        transpose.
      reset, mask: the step's ``[B, 1]`` flags, or None.

    Returns:
      ``(the gradients of the states before the step, d_step)``.
    """
    def plus_own(d_new):
        return [d if own is None else own + d for own, d in zip(d_own, d_new)]

    d_after = plus_own(d_state)
    if mask is None:
        d_in, d_step = step_backward(d_after)
    else:  # masked rows pass the gradient by; the others take it through the step
        zeros = [tf.zeros_like(d) for d in d_after]
        d_in, d_step = step_backward(kept(d_after, zeros, mask))
        d_in = [d + passed for d, passed in zip(d_in, kept(zeros, d_after, mask))]
    return entering(d_in, reset), d_step


@functools.lru_cache(maxsize=None)
def _gru_sequence(reset_after: bool, jit: bool, kinds: tuple = ()):
    """``(projected [P, B, 3U], length, h0 [B, U], recurrent_kernel [U, 3U], recurrent_bias
    [3U], *flags) -> (outputs [P, B, U], h_length)`` for sigmoid/tanh GRUs over the first
    `length` steps (outputs past them zero), each step `flagged` by `flags` (the `kinds` of
    `_padded_flags`), with its backward written out; with `jit` (see
    `Loop.compiled_alone`), the forward loop and the backward loop are each compiled with
    XLA."""

    @tf.custom_gradient
    def gru_sequence(projected, length, h0, recurrent_kernel, recurrent_bias, *flags):
        kept = recurrent_kernel.dtype  # float32 under mixed precision: cast in here
        kernel, bias = (tf.cast(w, projected.dtype) for w in (recurrent_kernel, recurrent_bias))
        saved, h_last = _loop_function(_gru_loop, jit, reset_after=reset_after, kinds=kinds)(
            projected, length, h0, kernel, bias, *flags)
        outputs = saved[..., :recurrent_kernel.shape[0]]

        def grad(d_outputs, d_last):
            d_outputs = tf.zeros_like(outputs) if d_outputs is None else d_outputs
            d_last = tf.zeros_like(h0) if d_last is None else d_last
            d_projected, d_h0, d_kernel, d_bias = _loop_function(
                _gru_sequence_backward, jit, reset_after=reset_after, kinds=kinds, kept=kept)(
                    d_outputs, d_last, length, h0, saved, kernel, bias, *flags)
            return (d_projected, None, d_h0, d_kernel, d_bias) + (None,) * len(flags)

        return (outputs, h_last), grad

    return gru_sequence


def _gru_sequence_backward(d_outputs, d_last, length, h0, saved, recurrent_kernel,
                           recurrent_bias, *flags, reset_after: bool, kinds: tuple,
                           kept: tf.DType):
    """The gradients of `_gru_sequence`'s inputs: `_gru_step_backward` over the steps in
    reverse (one read and one write per step, through the flags' `where`s), then the
    recurrent weights' gradients as one matmul over all steps, in their `kept` dtype (the
    padded steps' gradients are zero)."""
    units = recurrent_kernel.shape[0]
    steps = length
    # The state each step started from: saved with flags, else the previous step's output.
    previous = saved[..., 5 * units:] if flags else _previous(h0, saved[..., :units])
    step_values = _readable(tf.concat([d_outputs, previous, saved[..., units:5 * units]],
                                      axis=-1))
    kernels = _gru_kernels(recurrent_kernel, reset_after)
    flags_at = _flag_steps(flags, kinds)

    def back(i, dh, d_steps):
        t = steps - 1 - i
        d_output, h_prev, z, r, hh, aux = tf.split(step_values.read(t), 6, axis=1)

        def step_backward(d_new):
            dh_prev, d_step = _gru_step_backward(d_new[0], h_prev, z, r, hh, aux, kernels,
                                                 reset_after)
            return [dh_prev], d_step

        (dh_prev,), d_step = _through_flags([dh], [d_output], step_backward, *flags_at(t))
        return i + 1, dh_prev, d_steps.write(t, d_step)

    _, d_h0, d_steps = tf.while_loop(
        lambda i, *_: i < steps, back,
        (tf.constant(0), d_last, tf.TensorArray(saved.dtype, size=_length(saved))))
    d_projected, d_inner = _gru_step_parts(d_steps.stack(), units, reset_after)
    d_kernel = weight_product(previous, d_inner, kept)
    if reset_after:
        d_bias = tf.reduce_sum(tf.cast(_flat_steps(d_inner), kept), axis=0)
    else:  # the candidate's recurrent term multiplies the reset state r * h (aux)
        d_candidate = weight_product(saved[..., 4 * units:5 * units],
                                     d_projected[..., 2 * units:], kept)
        d_kernel = tf.concat([d_kernel, d_candidate], axis=1)
        d_bias = tf.zeros(recurrent_bias.shape, kept)
    return d_projected, d_h0, d_kernel, d_bias


def _lstm_loop(projected, length, h0, c0, recurrent_kernel, *flags, kinds: tuple):
    """`_lstm_step` over the first `length` steps of ``projected [P, B, 4U]``, each `flagged`
    by `flags`: ``(saved [P, B, 7U or 9U], h_length, c_length)``, where each step saved (h,
    c, i, f, o, g, tanh(c)), and with flags the states (h, c) it started from, in one write
    (zeros past `length`)."""
    steps = length
    xs = _readable(projected)
    flags_at = _flag_steps(flags, kinds)

    def body(t, h, c, saved):
        reset, mask = flags_at(t)
        h_in, c_in = entering([h, c], reset)
        values = _lstm_step(xs.read(t), h_in, c_in, recurrent_kernel, tf.tanh, tf.sigmoid)
        h_next, c_next = kept(values[:2], [h_in, c_in], mask)
        row = (h_next,) + values[1:] + ((h_in, c_in) if flags else ())
        return t + 1, h_next, c_next, saved.write(t, tf.concat(row, axis=1))

    _, h_last, c_last, saved = tf.while_loop(
        lambda t, *_: t < steps, body,
        (tf.constant(0), h0, c0, tf.TensorArray(projected.dtype, size=_length(projected))))
    return saved.stack(), h_last, c_last


def _lstm_sequence_backward(d_outputs, d_h_last, d_c_last, length, h0, c0, saved,
                            recurrent_kernel, *flags, kinds: tuple, kept: tf.DType):
    """The gradients of `_lstm_sequence`'s inputs: `_lstm_step_backward` over the steps in
    reverse (through the flags' `where`s), then the recurrent kernel's gradient as one matmul
    over all steps, in its `kept` dtype (the padded steps' gradients are zero)."""
    units = recurrent_kernel.shape[0]
    steps = length
    if flags:  # the states each step started from
        h_previous, c_previous = saved[..., 7 * units:8 * units], saved[..., 8 * units:]
    else:
        h_previous = _previous(h0, saved[..., :units])
        c_previous = _previous(c0, saved[..., units:2 * units])
    step_values = _readable(tf.concat([d_outputs, c_previous, saved[..., 2 * units:7 * units]],
                                      axis=-1))
    flags_at = _flag_steps(flags, kinds)

    def back(k, dh, dc, d_projected):
        t = steps - 1 - k
        d_output, c_prev, *step_gates = tf.split(step_values.read(t), 7, axis=1)

        def step_backward(d_new):
            dh_prev, dc_prev, d_x = _lstm_step_backward(d_new[0], d_new[1], c_prev,
                                                        *step_gates, recurrent_kernel)
            return [dh_prev, dc_prev], d_x

        (dh_prev, dc_prev), d_x = _through_flags([dh, dc], [d_output, None], step_backward,
                                                 *flags_at(t))
        return k + 1, dh_prev, dc_prev, d_projected.write(t, d_x)

    _, d_h0, d_c0, d_projected = tf.while_loop(
        lambda k, *_: k < steps, back,
        (tf.constant(0), d_h_last, d_c_last, tf.TensorArray(saved.dtype, size=_length(saved))))
    d_projected = d_projected.stack()
    return d_projected, d_h0, d_c0, weight_product(h_previous, d_projected, kept)


@functools.lru_cache(maxsize=None)
def _lstm_sequence(jit: bool, kinds: tuple = ()):
    """``(projected [P, B, 4U], length, h0, c0 [B, U], recurrent_kernel [U, 4U], *flags)
    -> (outputs [P, B, U], h_length, c_length)`` for sigmoid/tanh LSTMs over the first `length`
    steps, each `flagged` by `flags` as in `_gru_sequence`, with its backward written out;
    both loops compiled with XLA with `jit`, as in `_gru_sequence`."""

    @tf.custom_gradient
    def lstm_sequence(projected, length, h0, c0, recurrent_kernel, *flags):
        kept = recurrent_kernel.dtype  # float32 under mixed precision: cast in here
        kernel = tf.cast(recurrent_kernel, projected.dtype)
        saved, h_last, c_last = _loop_function(_lstm_loop, jit, kinds=kinds)(
            projected, length, h0, c0, kernel, *flags)
        outputs = saved[..., :recurrent_kernel.shape[0]]

        def grad(d_outputs, d_h_last, d_c_last):
            d_outputs = tf.zeros_like(outputs) if d_outputs is None else d_outputs
            d_h_last = tf.zeros_like(h0) if d_h_last is None else d_h_last
            d_c_last = tf.zeros_like(c0) if d_c_last is None else d_c_last
            d_projected, d_h0, d_c0, d_kernel = _loop_function(
                _lstm_sequence_backward, jit, kinds=kinds, kept=kept)(
                d_outputs, d_h_last, d_c_last, length, h0, c0, saved, kernel, *flags)
            return (d_projected, None, d_h0, d_c0, d_kernel) + (None,) * len(flags)

        return (outputs, h_last, c_last), grad

    return lstm_sequence


# -- the compiled loop of any step, and its backward ----------------------------------------
#
# A step without a written-out transpose (other activations, SimpleRNNCell, custom Keras cells)
# gets compiled loops too: the forward keeps the state entering each step, and the backward
# loop runs each step again under a tape and pulls the step's cotangent back through it, a
# fixed-size computation per step, compiled as the forward is.


def _zeros_for_none(values: list, like: list) -> list:
    return [tf.zeros_like(x) if v is None else v for v, x in zip(values, like)]


class _Counts(NamedTuple):
    """How a step's flat arguments split: weights, state leaves, flags (their kinds); and
    whether a masked row outputs its kept first state (see `flagged`)."""

    weights: int
    states: int
    kinds: tuple
    output_is_state: bool = False

    def split(self, values) -> tuple:
        w, s = self.weights, self.states
        return list(values[:w]), list(values[w:w + s]), tuple(values[w + s:])


def _step_loop(step, counts: _Counts, xs, length, *rest):
    """``step(x_t, states, weights)`` over the first `length` steps of ``xs [P, B, F]``, each
    `flagged`: ``[outputs [P, B, U], *saved [P, B, ...] (the state leaves entering each step,
    after any reset), *last states]``."""
    weights, states, flags = counts.split(rest)
    inputs = _readable(xs)
    flags_at = _flag_steps(flags, counts.kinds)
    size = _length(xs)

    def body(t, states, outputs, saved):
        reset, mask = flags_at(t)
        entered = entering(states, reset)
        y, new_states = step(inputs.read(t), entered, weights)
        new_states = kept(new_states, entered, mask)
        y = new_states[0] if counts.output_is_state else y
        saved = [a.write(t, s) for a, s in zip(saved, entered)]
        return t + 1, new_states, outputs.write(t, y), saved

    _, last, outputs, saved = tf.while_loop(
        lambda t, *_: t < length, body,
        (tf.constant(0), states, tf.TensorArray(xs.dtype, size=size),
         [tf.TensorArray(s.dtype, size=size) for s in states]))
    return [outputs.stack()] + [a.stack() for a in saved] + list(last)


def _step_loop_backward(step, counts: _Counts, d_outputs, *args):
    """The transpose of `_step_loop`: args are ``(*d_last, xs, length, *saved, *weights,
    *states, *flags)``; returns ``[d_xs, *d_weights, *d_states]``."""
    n = counts.states
    d_last, (xs, length), rest = list(args[:n]), args[n:n + 2], args[n + 2:]
    saved, (weights, states, flags) = [_readable(a) for a in rest[:n]], counts.split(rest[n:])
    inputs, d_ys = _readable(xs), _readable(d_outputs)
    flags_at = _flag_steps(flags, counts.kinds)

    def back(i, d_states, d_weights, d_xs):
        t = length - 1 - i
        x, entered, d_y = inputs.read(t), [a.read(t) for a in saved], d_ys.read(t)

        def step_backward(d_new):
            with tf.GradientTape() as tape:
                tape.watch([x, entered, weights])
                y, new_states = step(x, entered, weights)
            own = [] if counts.output_is_state else [d_y]  # else d_y joins the state's below
            d_x, d_entered, d_w = tape.gradient(
                ([] if counts.output_is_state else [y]) + list(new_states),
                [x, entered, weights], output_gradients=own + d_new)
            d_x = tf.zeros_like(x) if d_x is None else d_x
            return _zeros_for_none(d_entered, entered), (d_x, _zeros_for_none(d_w, weights))

        d_own = [d_y] + [None] * (n - 1) if counts.output_is_state else [None] * n
        d_prev, (d_x, d_w) = _through_flags(d_states, d_own, step_backward, *flags_at(t))
        return i + 1, d_prev, [a + b for a, b in zip(d_weights, d_w)], d_xs.write(t, d_x)

    _, d_states, d_weights, d_xs = tf.while_loop(
        lambda i, *_: i < length, back,
        (tf.constant(0), d_last, [tf.zeros_like(w) for w in weights],
         tf.TensorArray(xs.dtype, size=_length(xs))))
    return [d_xs.stack()] + d_weights + d_states


class StepLoops:
    """The compiled time loops of one step with explicit weights,
    ``step(x_t, states, weights) -> (y_t, new states)``, traced once per layout and kept."""

    def __init__(self, step, output_is_state: bool = False):
        # Weights kept in another dtype (float32 under mixed precision) are cast inside each
        # step: their gradient is summed over the steps in the kept dtype.
        self._step = lambda x, states, weights: step(
            x, states, [tf.cast(w, x.dtype) for w in weights])
        self._output_is_state = output_is_state  # see `flagged`
        self._sequences = {}

    def run(self, xs, states: list, weights: list, flags: Optional[StepFlags], loop: Loop):
        """The step over ``xs [K, B, F]``, time-major: ``(outputs [K, B, U], states)``."""
        length = _length(xs)
        kinds, padded_flags = _padded_flags(flags, length, loop.max_steps)
        counts = _Counts(len(weights), len(states), kinds, self._output_is_state)
        sequence = self._sequence(counts, loop.compiled_alone())
        outputs, *last = sequence(_padded_steps(xs, length, loop.max_steps),
                                  tf.convert_to_tensor(length, tf.int32), *weights, *states,
                                  *padded_flags)
        return outputs[:length], list(last)

    def _sequence(self, counts: _Counts, jit: bool):
        key = (counts, jit)
        if key not in self._sequences:  # two threads may both make one; the first is kept
            self._sequences.setdefault(key, _step_sequence(self._step, counts, jit))
        return self._sequences[key]


def _step_sequence(step, counts: _Counts, jit: bool):
    """``(xs [P, B, F], length, *weights, *states, *flags) -> (outputs [P, B, U], *states)``
    with `_step_loop_backward` as its gradient; each loop compiled with XLA with `jit`."""
    forward = _loop_call(functools.partial(_step_loop, step, counts), jit)
    backward = _loop_call(functools.partial(_step_loop_backward, step, counts), jit)

    @tf.custom_gradient
    def sequence(xs, length, *rest):
        outputs, *saved_and_last = forward(xs, length, *rest)
        saved, last = saved_and_last[:counts.states], saved_and_last[counts.states:]

        def grad(d_outputs, *d_last):
            d_outputs = tf.zeros_like(outputs) if d_outputs is None else d_outputs
            d_xs, *d_rest = backward(d_outputs, *_zeros_for_none(list(d_last), last), xs,
                                     length, *saved, *rest)
            return [d_xs, None] + d_rest + [None] * len(counts.kinds)

        return (outputs, *last), grad

    return sequence

"""Runners: how each kind of Keras cell is run over a chunk (with `stock.py`, the only modules
that know Keras cells' attributes).

- Keras's own GRU, LSTM and SimpleRNN cells: their input projection hoisted out of the loop,
  the loop compiled with a written-out backward where there is one (`stock.py`).
- Any other Keras 3 cell: its own `call` on its weights (`compat.stateless_step`) in
  `StepLoops`; a cell that cannot run again on its weights runs as itself, one
  `cell(x_t, states)` call per step (`timeloop.unroll_time_major`), differentiated by autodiff.

Keras's dropout masks of a call (`randomness.DropoutMasks`) are drawn by the runner of their
cell and applied as Keras applies them.
"""

import tensorflow as tf

from tbptt._src.core import compat, randomness
from tbptt._src.recurrent.loops import any_cell, stock, timeloop


def runner_for(cell):
    """The fastest exact runner for `cell`: hoisted for stock Keras GRU/LSTM cells (exactly
    these classes: a subclass may change `call`), the cell itself otherwise."""
    return stock.RUNNERS.get(type(cell), _CellRunner)(cell)


def runs_cell_itself(cell) -> bool:
    """Whether the chain runs `cell` as itself (its own `call`), not a stock runner's step."""
    return type(cell) not in stock.RUNNERS


def cell_states(cell, leaves: list) -> list:
    """A cell's flat state `leaves` nested as its `state_size` is (a StackedRNNCells of an
    LSTM and a GRU takes ``[[h, c], h2]``), as the cell's `call` takes them."""

    def structure(size):
        if isinstance(size, (list, tuple)):
            return [structure(s) for s in size]
        return 0

    nest = structure(cell.state_size)
    return tf.nest.pack_sequence_as(nest if isinstance(nest, list) else [nest], list(leaves))


def run_layers(
    runners: list,
    states: list,
    xs: tf.Tensor,
    *,
    training: bool,
    with_outputs: bool = True,
    flags: timeloop.StepFlags | None = None,
    loop: timeloop.LoopSettings = timeloop.LoopSettings(),
    masks: tuple = (),
):
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
        xs, layer_states = runner.run(
            projected,
            layer_states,
            training=training,
            with_outputs=keep,
            flags=flags,
            loop=loop,
            masks=layer_masks,
        )
        new_states.append(layer_states)
    return xs, new_states


class _CellRunner:
    """Any cell: no projection. A Keras 3 cell that can run on its weights as tensors (see
    `compat.stateless_step`) gets the compiled `any_cell.StepLoops`; any other, one call per
    step."""

    def __init__(self, cell):
        self._cell = cell
        self._loops = {}  # training -> StepLoops, once the cell is built

    def project(self, xs, batch_major: bool, masks=None):
        del masks  # only stock cells take Keras's dropout (see `randomness.py`)
        return timeloop.time_major(xs) if batch_major else xs

    def draw_masks(self, batch) -> None:
        return None

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
        loops = None if timeloop.is_short(xs) else self._step_loops(training, xs, states)
        if loops is not None:
            return loops.run(xs, list(states), self._weights(), flags, loop)

        def step(x, states):
            y, new_states = compat.call_layer(
                self._cell, x, cell_states(self._cell, states), training=training
            )
            return y, tf.nest.flatten(new_states)

        return timeloop.unroll_time_major(
            step, xs, states, with_outputs=with_outputs, flags=flags, loop=loop
        )

    def _weights(self) -> list:
        return [tf.convert_to_tensor(v) for v in self._cell.trainable_variables]

    def _step_loops(self, training: bool, xs, states) -> any_cell.StepLoops | None:
        """The cell's `any_cell.StepLoops`, or None for a cell that cannot be run again alike: no
        stateless step (see `compat.stateless_step`), or one that draws random numbers or
        changes a variable (a step run again in the backward would be another step)."""
        if training not in self._loops:
            own_step = compat.stateless_step(self._cell, training)
            if own_step is None:
                return None  # not kept: the cell may be built later

            def step(x, states, weights):
                return own_step(x, cell_states(self._cell, states), weights)

            specs = [
                tf.TensorSpec(xs.shape[1:], xs.dtype),
                [tf.TensorSpec(s.shape, s.dtype) for s in states],
                [tf.TensorSpec(w.shape, w.dtype) for w in self._weights()],
            ]
            self._loops.setdefault(
                training,
                None if randomness.draws_or_writes(step, specs) else any_cell.StepLoops(step),
            )
        return self._loops[training]

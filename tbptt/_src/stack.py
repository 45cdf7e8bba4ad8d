"""A stack of RNN cells and a head: the recurrent core that a time chain runs chunk by chunk.

One contract, whatever is inside:

```
stack(x [B, K, F], state) -> (y [B, K, O], state)        state: a flat list of tensors
```

The stack owns the state layout (how the flat list maps onto each layer's state nest), the
dtypes (the cells compute in `dtype`; the state crosses chunk cuts in `state_dtype`, float32
under mixed precision), and building the variables. The chunk is run layer by layer with the
fastest exact runner for each cell (`layers.py`).
"""

import math
from typing import Optional, Sequence

import tensorflow as tf

from tbptt._src import checks
from tbptt._src import compat
from tbptt._src import layers

keras = compat.keras


def _leaf_shapes(state_size) -> list:
    """Per-tensor shapes (without batch) of one cell's state_size."""
    if _is_single_tensor(state_size):
        return [tuple(tf.TensorShape(state_size).as_list())]
    return [shape for size in state_size for shape in _leaf_shapes(size)]


def _is_single_tensor(state_size) -> bool:
    return checks.is_int(state_size) or isinstance(state_size, tf.TensorShape)


class CellStack(tf.Module):
    """Cells bottom first, then a head, over one chunk at a time."""

    def __init__(self, cells: Sequence, head=None, dtype=None):
        """Args:
          cells: Keras-style RNN cells (see `RecurrentChain`), checked here.
          head: a Keras layer or callable on the top layer's ``[B, K, U]`` outputs, or None.
          dtype: the compute dtype; None takes the first cell's (or Keras's floatx).
        """
        super().__init__(name="cell_stack")
        self._cells = _checked_cells(cells)
        if head is not None and not callable(head):
            raise TypeError(f"head must be a Keras layer or a callable, got {head!r}.")
        self._head = head
        self._runners = [layers.runner_for(cell) for cell in self._cells]
        self.dtype = _resolve_dtype(self._cells, head, dtype)
        # Under mixed precision the cells compute in float16/bfloat16, but the state carried
        # across cuts (and dLoss/dstate carried back) stays float32, as Keras keeps variables:
        # a long chain of 16-bit carries would lose the small gradients first.
        self.state_dtype = tf.float32 if self.dtype in (tf.float16, tf.bfloat16) else self.dtype
        self._state_sizes = [cell.state_size for cell in self._cells]
        self.leaf_shapes = [s for size in self._state_sizes for s in _leaf_shapes(size)]
        self.features = None

    @property
    def cells(self) -> list:
        return list(self._cells)

    @property
    def head(self):
        return self._head

    @property
    def trainable_variables(self) -> list:
        """Cells' variables bottom to top, then the head's (each once)."""
        parts = list(self._cells) + ([self._head] if self._head is not None else [])
        return compat.unique([v for part in parts for v in compat.trainable_variables_of(part)])

    @property
    def state_floats(self) -> int:
        """Floats in one row of the state (all layers)."""
        return sum(int(math.prod(shape)) for shape in self.leaf_shapes)

    # -- state layout --------------------------------------------------------------------------

    def zeros(self, batch) -> list:
        """The zero state, flat, in the state dtype."""
        return [tf.zeros([batch, *shape], self.state_dtype) for shape in self.leaf_shapes]

    def pack(self, leaves: list) -> tuple:
        """The flat state as a tuple with one entry per layer (a tuple for multi-part states)."""
        packed, start = [], 0
        for size in self._state_sizes:
            part = list(leaves[start:start + len(_leaf_shapes(size))])
            packed.append(part[0] if _is_single_tensor(size) else tuple(part))
            start += len(part)
        return tuple(packed)

    def leaves(self, name: str, state, batch) -> list:
        """A user's state nest (None: zeros) as checked flat leaves in the state dtype."""
        if state is None:
            return self.zeros(batch)
        static_batch = batch if isinstance(batch, int) else None
        leaves = checks.state_leaves(name, state, self.leaf_shapes, static_batch)
        return [tf.cast(leaf, self.state_dtype) for leaf in leaves]

    def _per_layer(self, leaves: list) -> list:
        return [list(s) if isinstance(s, tuple) else [s] for s in self.pack(list(leaves))]

    # -- building and running ------------------------------------------------------------------

    def build(self, input_shape) -> None:
        """Creates the variables for inputs ``[B, T, F]`` (only F matters), once."""
        features = tf.TensorShape(input_shape)[-1]
        if self.features is not None:
            if features != self.features:
                raise ValueError(f"inputs must have {self.features} features (the chain was "
                                 f"built for that), got shape {list(input_shape)}. Make a new "
                                 "chain for a different feature size.")
            return
        with tf.init_scope():  # Variables are made eagerly, even from inside a tf.function.
            # One step through each cell itself: the fast runners read built weights.
            x = tf.zeros([1, features], self.dtype)
            zeros = [tf.zeros((1,) + shape, self.dtype) for shape in self.leaf_shapes]
            for cell, states in zip(self._cells, self._per_layer(zeros)):
                x, _ = compat.call_layer(cell, x, states, training=False)
            if self._head is not None:
                compat.call_layer(self._head, x[:, None], training=False)
        self.features = features

    def __call__(self, x: tf.Tensor, leaves: list, *, training: bool = True,
                 flags: Optional[layers.StepFlags] = None, with_outputs: bool = True):
        """All layers and the head over one chunk.

        Args:
          x: ``[B, K, F]``.
          leaves: the flat state entering the chunk, in the state dtype.
          training: passed to Keras cells and head.
          flags: the chunk's per-step reset and mask, time-major (None: no flags).
          with_outputs: False skips the head and the top layer's outputs (a forward that only
            carries the state).

        Returns:
          ``(y [B, K, O] or None, the flat state leaving the chunk)``.
        """
        leaves = [tf.cast(leaf, self.dtype) for leaf in leaves]
        top, per_layer = layers.run_layers(self._runners, self._per_layer(leaves), x,
                                           training=training, with_outputs=with_outputs,
                                           flags=flags)
        leaves = [tf.cast(leaf, self.state_dtype) for layer in per_layer for leaf in layer]
        if not with_outputs:
            return None, leaves
        top = layers.time_major(top)
        if self._head is not None:
            top = compat.call_layer(self._head, top, training=training)
        return top, leaves


def _checked_cells(cells) -> list:
    if isinstance(cells, (str, bytes)) or not isinstance(cells, Sequence) or not cells:
        raise TypeError(f"cells must be a non-empty sequence of RNN cells (each with "
                        f"`state_size` and call(inputs, states) -> (output, new_states)), got "
                        f"{cells!r}.")
    for index, cell in enumerate(cells):
        if not hasattr(cell, "state_size") or not callable(cell):
            raise TypeError(f"cells[{index}] must be an RNN cell with `state_size` that is "
                            f"callable as cell(inputs, states) -> (output, new_states), got "
                            f"{cell!r}.")
        for inner in [cell] + list(getattr(cell, "cells", [])):
            dropout = getattr(inner, "dropout", 0) or 0
            recurrent = getattr(inner, "recurrent_dropout", 0) or 0
            if dropout > 0 or recurrent > 0:
                raise ValueError(
                    f"cell {index} ({type(inner).__name__}) has dropout={dropout} / "
                    f"recurrent_dropout={recurrent}: the backward pass recomputes each chunk, "
                    "and Keras would draw new dropout masks there, so the gradient would "
                    "belong to a different function. Use cells without dropout and put "
                    "dropout in the head, which runs once per chunk.")
    return list(cells)


def _resolve_dtype(cells: list, head, dtype) -> tf.DType:
    """The compute dtype; unbuilt Keras layers are set to it, built ones must have it."""
    if dtype is None:
        dtype = compat.compute_dtype(cells[0]) or keras.backend.floatx()
    dtype = tf.as_dtype(dtype)
    for what, layer in [(f"cells[{i}]", c) for i, c in enumerate(cells)] + [("head", head)]:
        if not compat.is_keras_layer(layer) or compat.compute_dtype(layer) == dtype or (
                compat.is_mixed_precision(layer)):
            continue
        if layer.built:
            raise ValueError(f"{what} is already built in {compat.compute_dtype(layer).name}, "
                             f"but the chain computes in {dtype.name}. Pass an unbuilt layer, "
                             "or leave dtype=None to use the layer's dtype.")
        compat.set_compute_dtype(layer, dtype)
    return dtype

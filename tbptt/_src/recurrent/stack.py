"""A stack of RNN cells and a head: the recurrent core that a time chain runs chunk by chunk.

One contract, whatever is inside:

```
stack(x [B, K, F], state) -> (y [B, K, O], state)        state: a flat list of tensors
```

The stack owns the state layout (how the flat list maps onto each layer's state nest), the
dtypes (the cells compute in `dtype`; the state crosses chunk cuts in `state_dtype`, float32
under mixed precision), and building the variables. The chunk is run layer by layer with the
fastest exact runner for each cell (`loops/runners.py`).
"""

import math
from collections.abc import Sequence

import tensorflow as tf

from tbptt._src.core import checks, compat, compiling, randomness
from tbptt._src.core.randomness import Draws
from tbptt._src.recurrent import parts
from tbptt._src.recurrent.loops import runners, timeloop

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

    def __init__(self, cells: Sequence, head=None, dtype=None, inputs_layer=None):
        """Args:
        cells: Keras-style RNN cells (see `RecurrentChain`), checked here.
        head: a Keras layer or callable on the top layer's ``[B, K, U]`` outputs, or None.
        dtype: the compute dtype; None takes the first cell's (or Keras's floatx).
        inputs_layer: a Keras layer or callable on each chunk's inputs ``[B, K, ...]``
          (token ids into an `Embedding`, say) giving the cells' ``[B, K, F]``, or None.
        """
        super().__init__(name="cell_stack")
        self._cells = parts.checked_cells(cells)
        for what, part in [("head", head), ("inputs_layer", inputs_layer)]:
            if part is not None and not callable(part):
                raise TypeError(f"{what} must be a Keras layer or a callable, got {part!r}.")
        self._head, self._inputs_layer = head, inputs_layer
        self._runners = [runners.runner_for(cell) for cell in self._cells]
        self.dtype = parts.resolve_dtype(self._cells, head, dtype, inputs_layer)
        # Under mixed precision the cells compute in float16/bfloat16, but the state carried
        # across cuts (and dLoss/dstate carried back) stays float32, as Keras keeps variables:
        # a long chain of 16-bit carries would lose the small gradients first.
        self.state_dtype = tf.float32 if self.dtype in (tf.float16, tf.bfloat16) else self.dtype
        self._state_sizes = [cell.state_size for cell in self._cells]
        self.leaf_shapes = [s for size in self._state_sizes for s in _leaf_shapes(size)]
        self.features = None  # F of the cells' inputs, once built
        self.input_tail: tuple | None = None  # the inputs' shape after [B, T], once built
        # The seed generators' states of the inputs layer and the head, replayed per chunk,
        # and why a call that recomputes chunks could not replay a part's draws (see
        # `randomness.py`), once built.
        self.seed_states: list = []
        self._replay_problems: list = []

    @property
    def cells(self) -> list:
        return list(self._cells)

    @property
    def head(self):
        return self._head

    @property
    def inputs_layer(self):
        return self._inputs_layer

    @property
    def parts(self) -> list:
        """The inputs layer (if any), the cells bottom first, the head (if any)."""
        return [p for p in [self._inputs_layer] + self._cells + [self._head] if p is not None]

    @property
    def trainable_variables(self) -> list:
        """The inputs layer's variables, the cells' bottom to top, then the head's (each
        once)."""
        return compat.unique(
            [v for part in self.parts for v in compat.trainable_variables_of(part)]
        )

    def sparse_variables(self) -> tuple:
        """Per trainable variable: whether one tape gives its gradient as `IndexedSlices`, one
        row per lookup (an `Embedding` table of the inputs layer that nothing else reads)."""
        elsewhere = {id(v) for part in self.parts[1:] for v in compat.trainable_variables_of(part)}
        tables = {id(layer.embeddings) for layer in self.embedding_layers()}
        return tuple(id(v) in tables and id(v) not in elsewhere for v in self.trainable_variables)

    def embedding_layers(self) -> list:
        """The inputs layer's trainable `Embedding` layers (built or not; LoRA's are left out:
        their factors' gradients are dense)."""
        if self._inputs_layer is None:
            return []
        return [
            layer
            for layer in compat.sublayers(self._inputs_layer)
            if isinstance(layer, compat.keras.layers.Embedding)
            and layer.trainable
            and not getattr(layer, "lora_enabled", False)
        ]

    def python_state(self) -> tuple:
        """The Python attributes of the parts and their layers that a trace may read
        (`compiling.attributes_key`): in every compiled function's key, so changes are seen."""
        return tuple(
            compiling.attributes_key(layer)
            for part in self.parts
            for layer in compat.sublayers(part)
            if hasattr(layer, "__dict__")
        )

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
            part = list(leaves[start : start + len(_leaf_shapes(size))])
            packed.append(part[0] if _is_single_tensor(size) else tuple(part))
            start += len(part)
        return tuple(packed)

    def leaves(self, name: str, state, batch) -> list:
        """A user's state nest (None: zeros) as checked flat leaves in the state dtype."""
        if state is None:
            return self.zeros(batch)
        static_batch = batch if isinstance(batch, int) else None
        leaves = checks.state_leaves(name, state, self.leaf_shapes, static_batch)
        self._check_structure(name, state)
        return [tf.cast(leaf, self.state_dtype) for leaf in leaves]

    def _check_structure(self, name: str, state) -> None:
        """The nest must be the state's own (lists for tuples allowed), or for one layer that
        layer's entry: a flat list for stacked multi-part states could be read in the wrong
        order without a shape to tell."""
        packed = self.pack([0] * len(self.leaf_shapes))
        candidates = [packed] + ([packed[0]] if len(packed) == 1 else [])
        for structure in candidates:
            try:
                tf.nest.assert_same_structure(structure, state, check_types=False)
                return
            except (TypeError, ValueError):
                pass
        raise ValueError(
            f"{name} must have the structure of chain.initial_state(batch_size): "
            f"one entry per layer, a tuple for multi-part states, here "
            f"{tf.nest.map_structure(lambda _: '*', packed)}; got "
            f"{tf.nest.map_structure(lambda _: '*', state)}. Pass the state the "
            "chain returned, or pack yours like initial_state."
        )

    def _per_layer(self, leaves: list) -> list:
        return [list(s) if isinstance(s, tuple) else [s] for s in self.pack(list(leaves))]

    # -- building and running ------------------------------------------------------------------

    def build(self, input_shape, chunk_size=None, input_dtype=None) -> None:
        """Creates the variables for inputs ``[B, T, F]`` (only F matters; with an inputs
        layer, the shape after [B, T] and `input_dtype`), once; the head and the inputs layer
        are checked on chunks of `chunk_size` steps (None or "auto": 64)."""
        input_shape = tf.TensorShape(input_shape)
        reach = chunk_size if checks.is_int(chunk_size) else parts.HEAD_PROBE_STEPS
        with compiling.BUILD_LOCK:  # threads making the first call build the variables once
            if self.input_tail is not None:
                if not input_shape[2:].is_compatible_with(self.input_tail):
                    tail = list(self.input_tail)
                    what = f"{tail[0]} features" if len(tail) == 1 else f"shape [B, T] + {tail}"
                    raise ValueError(
                        f"inputs must have {what} (the chain was built for that), got shape "
                        f"{input_shape.as_list()}. Make a new chain for a different feature "
                        "size."
                    )
                return
            features, problems = input_shape[-1], []
            if self._inputs_layer is not None:
                features, problems = parts.build_inputs_layer(
                    self._inputs_layer, input_shape, input_dtype or tf.int32, self.dtype, reach
                )

            def zeros():  # made where they are used: eagerly, or in the graph being traced
                return self._per_layer([tf.zeros((1, *s), self.dtype) for s in self.leaf_shapes])

            problems += parts.build_cells_and_head(
                self._cells, self._head, features, input_shape, zeros, self.dtype, reach
            )
            self._replay_problems = [p for p in problems if p is not None]
            self.features = features
            self.seed_states = compat.unique(
                [
                    v
                    for part in (self._inputs_layer, self._head)
                    if part is not None
                    for v in compat.seed_states(part)
                ]
            )
            self.input_tail = tuple(input_shape[2:].as_list())

    def check_replayable(self) -> None:
        """Refuses, by name, a part whose draws a call that recomputes chunks cannot replay."""
        if self._replay_problems:
            raise ValueError(self._replay_problems[0])

    def draws(self, batch, training: bool) -> Draws:
        """What one call draws once (see `randomness.py`): the seed generators' bases of the
        inputs layer and the head, and with `training` the cells' dropout masks; called at
        the start of a call, inside its compiled function."""
        seeds = randomness.draw_seeds(self.seed_states)
        masks = tuple(runner.draw_masks(batch) for runner in self._runners) if training else ()
        return Draws(seeds, () if not any(m is not None for m in masks) else masks)

    def __call__(
        self,
        x: tf.Tensor,
        leaves: list,
        *,
        training: bool = True,
        flags: timeloop.StepFlags | None = None,
        with_outputs: bool = True,
        loop: timeloop.LoopSettings = timeloop.LoopSettings(),
        draws: Draws = Draws(),
        chunk=0,
    ):
        """All layers and the head over one chunk.

        Args:
          x: ``[B, K, F]``.
          leaves: the flat state entering the chunk, in the state dtype.
          training: passed to Keras cells and head.
          flags: the chunk's per-step reset and mask, time-major (None: no flags).
          with_outputs: False skips the head and the top layer's outputs (a forward that only
            carries the state).
          loop: how the chunk's time loops run (see `timeloop.LoopSettings`).
          draws: what the call drew once (`draws`); chunk: this chunk's index in the call,
            from which its draws are replayed.

        Returns:
          ``(y [B, K, O] or None, the flat state leaving the chunk)``.
        """
        leaves = [tf.cast(leaf, self.dtype) for leaf in leaves]
        with randomness.replayed(self.seed_states, draws.seeds, chunk):
            if self._inputs_layer is not None:
                x = tf.cast(compat.call_layer(self._inputs_layer, x, training=training), self.dtype)
            top, per_layer = runners.run_layers(
                self._runners,
                self._per_layer(leaves),
                x,
                training=training,
                with_outputs=with_outputs,
                flags=flags,
                loop=loop,
                masks=draws.masks,
            )
            leaves = [tf.cast(leaf, self.state_dtype) for layer in per_layer for leaf in layer]
            if not with_outputs:
                return None, leaves
            top = timeloop.time_major(top)
            if self._head is not None:
                top = compat.call_layer(self._head, top, training=training)
        return top, leaves

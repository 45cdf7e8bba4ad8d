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

import functools
import math
from typing import Optional, Sequence

import tensorflow as tf

from tbptt._src.core import checks
from tbptt._src.core import compat
from tbptt._src.core import compiling
from tbptt._src.recurrent.loops import runners
from tbptt._src.recurrent.loops import timeloop
from tbptt._src.core import randomness
from tbptt._src.core.randomness import Draws

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
        self._cells = _checked_cells(cells)
        for what, part in [("head", head), ("inputs_layer", inputs_layer)]:
            if part is not None and not callable(part):
                raise TypeError(f"{what} must be a Keras layer or a callable, got {part!r}.")
        self._head, self._inputs_layer = head, inputs_layer
        self._runners = [runners.runner_for(cell) for cell in self._cells]
        self.dtype = _resolve_dtype(self._cells, head, dtype, inputs_layer)
        # Under mixed precision the cells compute in float16/bfloat16, but the state carried
        # across cuts (and dLoss/dstate carried back) stays float32, as Keras keeps variables:
        # a long chain of 16-bit carries would lose the small gradients first.
        self.state_dtype = tf.float32 if self.dtype in (tf.float16, tf.bfloat16) else self.dtype
        self._state_sizes = [cell.state_size for cell in self._cells]
        self.leaf_shapes = [s for size in self._state_sizes for s in _leaf_shapes(size)]
        self.features = None  # F of the cells' inputs, once built
        self.input_tail = None  # the chain's inputs' shape after [B, T], once built
        # The seed generators' states of the inputs layer and the head, replayed per chunk,
        # and why a call that recomputes chunks could not replay a part's draws (see
        # `randomness.py`), once built.
        self.seed_states = []
        self._replay_problems = []

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
        return compat.unique([v for part in self.parts
                              for v in compat.trainable_variables_of(part)])

    def python_state(self) -> tuple:
        """The Python attributes of the parts and their layers that a trace may read
        (`compiling.attributes_key`): in every compiled function's key, so changes are seen."""
        return tuple(compiling.attributes_key(layer) for part in self.parts
                     for layer in compat.sublayers(part) if hasattr(layer, "__dict__"))

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
        raise ValueError(f"{name} must have the structure of chain.initial_state(batch_size): "
                         f"one entry per layer, a tuple for multi-part states, here "
                         f"{tf.nest.map_structure(lambda _: '*', packed)}; got "
                         f"{tf.nest.map_structure(lambda _: '*', state)}. Pass the state the "
                         "chain returned, or pack yours like initial_state.")

    def _per_layer(self, leaves: list) -> list:
        return [list(s) if isinstance(s, tuple) else [s] for s in self.pack(list(leaves))]

    # -- building and running ------------------------------------------------------------------

    def build(self, input_shape, chunk_size=None, input_dtype=None) -> None:
        """Creates the variables for inputs ``[B, T, F]`` (only F matters; with an inputs
        layer, the shape after [B, T] and `input_dtype`), once; the head and the inputs layer
        are checked on chunks of `chunk_size` steps (None or "auto": 64)."""
        input_shape = tf.TensorShape(input_shape)
        reach = chunk_size if checks.is_int(chunk_size) else HEAD_PROBE_STEPS
        with compiling.BUILD_LOCK:  # threads making the first call build the variables once
            if self.input_tail is not None:
                if not input_shape[2:].is_compatible_with(self.input_tail):
                    tail = list(self.input_tail)
                    what = f"{tail[0]} features" if len(tail) == 1 else f"shape [B, T] + {tail}"
                    raise ValueError(
                        f"inputs must have {what} (the chain was built for that), got shape "
                        f"{input_shape.as_list()}. Make a new chain for a different feature "
                        "size.")
                return
            features = input_shape[-1]
            if self._inputs_layer is not None:
                features = self._embed(input_shape, input_dtype or tf.int32, reach)
            self._build(features, input_shape, reach)
            self.seed_states = compat.unique(
                [v for part in (self._inputs_layer, self._head) if part is not None
                 for v in compat.seed_states(part)])
            self.input_tail = tuple(input_shape[2:].as_list())

    def _embed(self, input_shape: tf.TensorShape, dtype, reach: int) -> int:
        """Builds and checks the inputs layer on zeros of the inputs' shape; its output's F."""
        shape = [1, 1] + input_shape[2:].as_list()
        with tf.init_scope():  # variables are made eagerly, even from inside a tf.function
            probe = tf.zeros(shape, dtype)
            features = compat.call_layer(self._inputs_layer, probe, training=False).shape[-1]
            steps = 2 * max(int(reach), 3)
            ids = tf.cast(tf.random.stateless_uniform([2, steps] + input_shape[2:].as_list(),
                                                      [5, 9], maxval=2, dtype=tf.int32), dtype)
            self._note(_check_part(self._inputs_layer, "inputs_layer", ids, self.dtype))
        compat.check_owns_its_variables("inputs_layer", self._inputs_layer, functools.partial(
            compat.call_layer, self._inputs_layer, tf.zeros(shape, dtype), training=True))
        return features

    def _build(self, features, input_shape, reach: int) -> None:
        if features is None:
            raise ValueError(f"inputs must have a known feature size (the last axis) to build "
                             f"the chain's variables, got shape {list(input_shape)}. Call "
                             "chain.build([None, None, features]) first, or give the inputs a "
                             "static last dimension.")
        with tf.init_scope():  # Variables are made eagerly, even from inside a tf.function.
            top = self._run_parts(features, owned=False)
            if self._head is not None:
                x = tf.random.stateless_normal([2, 2 * max(int(reach), 3), top.shape[-1]],
                                               [7, 11])
                self._note(_check_part(self._head, "head", tf.cast(x, self.dtype), self.dtype))
        # Again outside init_scope, which pauses tapes: which variables does each part read?
        self._run_parts(features, owned=True)
        self.features = features

    def _run_parts(self, features: int, *, owned: bool) -> tf.Tensor:
        """One step through each cell itself (the fast runners read built weights) and the
        head, on zeros; returns the top output ``[1, U]``. `owned`: refuse a part that reads
        variables it does not list, run as the gradient runs it (training=True; moving
        statistics and seeds are restored after); else check the states each cell returns."""
        x = tf.zeros([1, features], self.dtype)
        zeros = [tf.zeros((1,) + shape, self.dtype) for shape in self.leaf_shapes]
        for index, (cell, states) in enumerate(zip(self._cells, self._per_layer(zeros))):
            run = functools.partial(compat.call_layer, cell, x, runners.cell_states(cell, states),
                                    training=owned)
            if owned:
                x, _ = compat.check_owns_its_variables(f"cells[{index}]", cell, run)
            else:
                with compat.left_as_it_was(cell):
                    inputs, (x, new_states) = x, run()
                _check_new_states(index, cell, states, new_states)
                if runners.runs_cell_itself(cell):
                    with compat.left_as_it_was(cell):
                        self._note(randomness.cell_problem(
                            index, cell, inputs, runners.cell_states(cell, states)))
        if self._head is not None:
            run = functools.partial(compat.call_layer, self._head, x[:, None], training=owned)
            if owned:
                compat.check_owns_its_variables("head", self._head, run)
            else:
                with compat.left_as_it_was(self._head):
                    run()
        return x

    def _note(self, problem: Optional[str]) -> None:
        if problem is not None:
            self._replay_problems.append(problem)

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

    def __call__(self, x: tf.Tensor, leaves: list, *, training: bool = True,
                 flags: Optional[timeloop.StepFlags] = None, with_outputs: bool = True,
                 loop: timeloop.LoopSettings = timeloop.LoopSettings(), draws: Draws = Draws(), chunk=0):
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
                x = tf.cast(compat.call_layer(self._inputs_layer, x, training=training),
                            self.dtype)
            top, per_layer = runners.run_layers(self._runners, self._per_layer(leaves), x,
                                               training=training, with_outputs=with_outputs,
                                               flags=flags, loop=loop, masks=draws.masks)
            leaves = [tf.cast(leaf, self.state_dtype) for layer in per_layer for leaf in layer]
            if not with_outputs:
                return None, leaves
            top = timeloop.time_major(top)
            if self._head is not None:
                top = compat.call_layer(self._head, top, training=training)
        return top, leaves


def _check_new_states(index: int, cell, states: list, new_states) -> None:
    """A cell must return states shaped as its `state_size` says (the chain lays them out)."""
    got = [tuple(t.shape.as_list()) for t in tf.nest.flatten(new_states)]
    expected = [tuple(t.shape.as_list()) for t in states]
    if got != expected:
        raise ValueError(f"cells[{index}] ({type(cell).__name__}) returned states of shapes "
                         f"{got}, but its state_size {cell.state_size!r} says {expected}. "
                         "Make state_size describe the states call() returns.")


# The chunk length a head is checked on when the chain's is not fixed ("auto").
HEAD_PROBE_STEPS = 64

HEAD_RULE = ("The head and the inputs layer run on one chunk at a time, so they must act step "
             "by step: a Dense, an MLP, an Embedding, an activation, LayerNormalization. Put "
             "layers that look across time steps (Conv1D, an RNN with return_sequences, "
             "attention, BatchNormalization) in a cell or outside the chain, outside the "
             "chunked gradient.")


def _check_acts_step_by_step(part, what: str, x: tf.Tensor, dtype: tf.DType) -> None:
    """The head (or the inputs layer) must map each step on its own: on `x`, two chunks of
    the chain's length, the part of the whole must equal the parts of the pieces cut as the
    chain cuts (and one step), or the chunked gradient would belong to another function.

    What this proves: on these inputs, with training=False, no output depends on a step more
    than one cut away within the probe. What it cannot see: a part that mixes steps only in
    training (BatchNormalization is refused by name), or only further back than the probe's
    two chunks, or only on other inputs."""
    for layer in compat.sublayers(part):
        if "BatchNormalization" in type(layer).__name__:
            raise ValueError(f"the {what} contains {type(layer).__name__}, which in training "
                             f"normalizes over the chunk's steps. {HEAD_RULE}")
    steps = x.shape[1]
    whole = compat.call_layer(part, x, training=False)
    if not isinstance(whole, tf.Tensor) or whole.shape.rank is None or whole.shape.rank < 2 or (
            whole.shape[:2] != x.shape[:2]):
        raise ValueError(f"the {what} must return one tensor [batch, steps, ...] with the steps "
                         f"of its input: for {x.shape.as_list()} it returned "
                         f"{getattr(whole, 'shape', type(whole).__name__)}. {HEAD_RULE}")
    _check_traced_like_eager(part, what, x, whole)
    cuts = [0, 1, steps // 2, steps]
    pieces = tf.concat([compat.call_layer(part, x[:, a:b], training=False)
                        for a, b in zip(cuts[:-1], cuts[1:])], axis=1)
    error = float(tf.reduce_max(tf.abs(tf.cast(whole - pieces, tf.float64))))
    scale = 1.0 + float(tf.reduce_max(tf.abs(tf.cast(whole, tf.float64))))
    tolerance = {tf.float64: 1e-9, tf.float32: 1e-4}.get(dtype, 1e-2)  # 16-bit: coarse
    if error > tolerance * scale:
        raise ValueError(f"the {what} looks across time steps: on two chunks of {steps // 2} "
                         f"steps it gives another result than on the pieces the chain cuts "
                         f"(max difference {error:.3g}). {HEAD_RULE}")


def _check_part(part, what: str, x: tf.Tensor, dtype: tf.DType) -> Optional[str]:
    """The head or the inputs layer must act step by step, in inference and in training
    (dropout and all); returns why a call that recomputes chunks could not replay its draws,
    or None."""
    _check_acts_step_by_step(part, what, x, dtype)
    problem = randomness.part_problem(what, part, lambda: (
        compat.call_layer(part, x, training=True)))
    if problem is None:  # draws that cannot be replayed would hide a mixing of steps
        _check_training_acts_step_by_step(part, what, x, dtype)
    return problem


def _check_traced_like_eager(part, what: str, x: tf.Tensor, whole: tf.Tensor) -> None:
    """The part traced as the chain traces it, batch and steps unknown, must compute what it
    computes eagerly (Keras's TimeDistributed maps over the batch axis when the steps are
    unknown, and returns [B, B, ...])."""
    spec = tf.TensorSpec([None, None] + x.shape[2:].as_list(), x.dtype)
    traced = compat.quiet_function(lambda v: compat.call_layer(part, v, training=False),
                                   input_signature=[spec], autograph=False)
    try:
        got = traced(x)
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
        got = error
    if isinstance(got, tf.Tensor) and got.shape == whole.shape:
        error = tf.abs(tf.cast(got, tf.float64) - tf.cast(whole, tf.float64))
        if bool(tf.reduce_all(error <= 1e-6 * (1 + tf.abs(tf.cast(whole, tf.float64))))):
            return
    result = f"shape {got.shape.as_list()}" if isinstance(got, tf.Tensor) else repr(got)[:200]
    raise ValueError(f"the {what} computes otherwise when traced with the number of steps "
                     f"unknown, as the chain runs it: for inputs {x.shape.as_list()} it gave "
                     f"{result}, eagerly shape {whole.shape.as_list()}. Keras's "
                     "TimeDistributed does so (it maps over the batch axis then): pass the "
                     "layer it wraps directly; a Dense acts on each step already.")


def _check_training_acts_step_by_step(part, what: str, x: tf.Tensor, dtype: tf.DType) -> None:
    """Under training=True, as the chunked gradient runs the part: changing the input at one
    step must change no other step's output. Both runs draw the same numbers (the part's seed
    generators restored in between), so dropout passes and only a mixing of steps shows.

    What this proves: on these inputs, in training, no step's output reads another step's
    input. What it cannot see: a mixing only on other inputs, or only beyond the probe."""
    steps = x.shape[1]
    at = tf.reshape(tf.range(steps) == steps // 2, [1, steps] + [1] * (x.shape.rank - 2))
    bumped = tf.where(at, 1 - x, x) if x.dtype.is_integer else tf.where(at, x + 1, x)
    outputs = []
    for value in (x, bumped):
        with compat.left_as_it_was(part):
            outputs.append(tf.cast(compat.call_layer(part, value, training=True), tf.float64))
    others = tf.boolean_mask(outputs[0] - outputs[1], tf.range(steps) != steps // 2, axis=1)
    error = float(tf.reduce_max(tf.abs(others)))
    scale = 1.0 + float(tf.reduce_max(tf.abs(outputs[0])))
    if error > {tf.float64: 1e-9, tf.float32: 1e-4}.get(dtype, 1e-2) * scale:
        raise ValueError(f"the {what} looks across time steps when training: changing the "
                         f"input at one step of {steps} changed the outputs at other steps "
                         f"(max difference {error:.3g}). {HEAD_RULE}")


def _checked_cells(cells) -> list:
    if isinstance(cells, (str, bytes)) or not isinstance(cells, Sequence) or not cells:
        raise TypeError(f"cells must be a non-empty sequence of RNN cells (each with "
                        f"`state_size` and call(inputs, states) -> (output, new_states)), got "
                        f"{cells!r}.")
    for index, cell in enumerate(cells):
        if hasattr(cell, "cell") and hasattr(cell, "return_sequences"):
            raise TypeError(f"cells[{index}] is a whole RNN layer ({type(cell).__name__}), not a "
                            "cell: pass its cell, e.g. keras.layers.GRUCell(units) instead of "
                            "keras.layers.GRU(units); the chain runs the time loop itself.")
        if not hasattr(cell, "state_size") or not callable(cell):
            raise TypeError(f"cells[{index}] must be an RNN cell with `state_size` that is "
                            f"callable as cell(inputs, states) -> (output, new_states), got "
                            f"{cell!r}.")
        for inner in [cell] + list(getattr(cell, "cells", [])):
            dropout = getattr(inner, "dropout", 0) or 0
            recurrent = getattr(inner, "recurrent_dropout", 0) or 0
            if (dropout > 0 or recurrent > 0) and (
                    inner is not cell or runners.runs_cell_itself(cell)):
                raise ValueError(
                    f"cell {index} ({type(inner).__name__}) has dropout={dropout} / "
                    f"recurrent_dropout={recurrent}: the chain draws Keras's dropout masks once "
                    "per sequence and replays them in each chunk's recompute for Keras's own "
                    "GRUCell, LSTMCell and SimpleRNNCell, given to the chain directly (not "
                    "inside StackedRNNCells, not a subclass). Pass those, or put dropout in the "
                    "head or the inputs layer.")
    return list(cells)


def _resolve_dtype(cells: list, head, dtype, inputs_layer=None) -> tf.DType:
    """The compute dtype; unbuilt Keras cells are set to it, built ones must have it. The head
    follows too, unless it was given a dtype of its own (a float32 output layer under mixed
    precision, as Keras advises): Keras casts its inputs."""
    if dtype is None:
        dtype = compat.compute_dtype(cells[0]) or keras.backend.floatx()
    dtype = tf.as_dtype(dtype)
    parts = [("cells", c) for c in cells]
    for what, layer in [("head", head), ("inputs_layer", inputs_layer)]:
        if not (compat.is_keras_layer(layer) and compat.has_own_dtype(layer)):
            parts.append((what, layer))
    for what, layer in parts:
        # A layer under the global mixed policy computes in its 16-bit dtype: it follows a
        # chain computing in another dtype (float32 given explicitly) like any other layer.
        if not compat.is_keras_layer(layer) or compat.compute_dtype(layer) == dtype:
            continue
        if layer.built and what != "cells" and _float32_beside_16_bits(layer, dtype):
            continue  # a float32 output layer under mixed precision, loaded (already built)
        if layer.built and what != "cells" and _holds_no_variables_of_its_own(layer):
            compat.set_compute_dtype(layer, dtype)  # a loaded Sequential: how it casts inputs
            continue
        if layer.built:
            name = f"a cell ({type(layer).__name__})" if what == "cells" else f"the {what}"
            raise ValueError(f"{name} is already built in {compat.compute_dtype(layer).name}, "
                             f"but the chain computes in {dtype.name}. Pass an unbuilt layer, "
                             "or leave dtype=None to use the layer's dtype.")
        compat.set_compute_dtype(layer, dtype)
    return dtype


def _holds_no_variables_of_its_own(layer) -> bool:
    """A container (Sequential, Functional): its dtype says only how it casts its inputs, so it
    may follow the chain after it was built (Keras does not save a Sequential's dtype)."""
    inner = compat.sublayers(layer)[1:]
    own = {id(v) for v in layer.weights} - {id(v) for sub in inner for v in sub.weights}
    return bool(inner) and not own


def _float32_beside_16_bits(layer, dtype: tf.DType) -> bool:
    """A float32 head or inputs layer of a chain computing in 16 bits: Keras's advice under
    mixed precision (the layer casts its inputs), kept as it is."""
    return dtype in (tf.float16, tf.bfloat16) and compat.compute_dtype(layer) == tf.float32

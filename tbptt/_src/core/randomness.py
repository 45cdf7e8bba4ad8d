"""Randomness drawn once per chunk and replayed identically in that chunk's recompute.

With the least memory the exact backward runs each chunk twice: in the forward sweep and again
under a tape (a budget's kept run, one longer chunk, runs once). What a chunk draws must be the
same both times, or the gradient belongs to no forward pass. Two kinds
of draws are replayed, and what cannot be is refused by name when the chain is built:

- **Per chunk** (Dropout, GaussianNoise, `keras.random` with a `SeedGenerator` in the inputs
  layer or the head): the seed generators' states are read once per call and advanced
  (`draw_seeds`); chunk k then draws from a pure function of that value and k, never from the
  variables themselves (`replayed`, a `keras.StatelessScope`):

  ```
  base = (s0, s1);   state <- (s0, s1 + CALL_STRIDE)            once per call
  chunk k draws from (s0 + k + 1, s1), (s0 + k + 1, s1 + 1), ...   whenever it runs
  ```

  like `jax.random.fold_in(key, k)`: nothing is assigned inside the chunk loops, so a chunk
  draws the same however often, and in whatever order, it runs.
- **Per sequence** (Keras's `dropout` and `recurrent_dropout` in GRU, LSTM and SimpleRNN
  cells): one mask per sequence per call, drawn at the call's start from the cell's seed
  generator as Keras's RNN draws it, and given to every chunk (`DropoutMasks`, drawn and
  applied by the runners in `layers.py`).

Refused by the calls that recompute (`part_problem`, `cell_problem`, found when the chain is
built): a part that draws from a source the chain does not hold (stateful `tf.random` ops,
`keras.random` with `seed=None`), a cell that draws (or changes a variable) at every step of
its own. A plain forward pass (`chain(x)` under a tape) and truncation after one chunk run
each chunk once, and take them.
"""

import contextlib
from typing import NamedTuple

import tensorflow as tf

from tbptt._src.core import compat

# How far one call advances a seed generator: the draws of one chunk of one call (of each
# generator) may number up to this many before they meet the next call's.
CALL_STRIDE = 256


class DropoutMasks(NamedTuple):
    """One cell's dropout masks for one call, as Keras's `DropoutRNNCell` makes them: a tuple
    of ``[B, F]`` masks for the inputs and of ``[B, U]`` masks for the state (one per gate
    for Keras's implementation 1, else one), or None where the rate is 0."""

    inputs: tuple | None = None
    recurrent: tuple | None = None


class Draws(NamedTuple):
    """What one call draws once: the base of each replayed seed generator (``[2]`` int64, in
    the order of the stack's `seed_states`), and each cell's `DropoutMasks` (or None)."""

    seeds: tuple = ()
    masks: tuple = ()

    def masks_of(self, index: int) -> DropoutMasks | None:
        return self.masks[index] if self.masks else None


def draw_seeds(states: list) -> tuple:
    """The call's base value of each seed state, each advanced past this call's draws."""
    bases = []
    for state in states:
        base = tf.identity(state.value)
        state.assign_add(tf.constant([0, CALL_STRIDE], base.dtype))
        bases.append(base)
    return tuple(bases)


def chunk_seed(base: tf.Tensor, chunk) -> tf.Tensor:
    """The seed state chunk `chunk` of a call draws from: ``(s0 + chunk + 1, s1)``."""
    offset = tf.cast(chunk, base.dtype) + 1
    return base + tf.stack([offset, tf.zeros_like(offset)])


def replayed(states: list, seeds: tuple, chunk):
    """A context in which the seed states read as chunk `chunk`'s values and nothing is
    assigned to them (Keras's `StatelessScope`); a no-op without seed states."""
    if not states or not seeds:
        return contextlib.nullcontext()
    return compat.stateless_scope(
        [(state, chunk_seed(base, chunk)) for state, base in zip(states, seeds)]
    )


def part_problem(what: str, part, run) -> str | None:
    """Why the chunked gradient cannot replay the draws of `part` (the inputs layer or the
    head), or None: `run()` twice from the same seed states must give the same result (its own
    seed generators restored in between); a draw from a source the chain does not hold (a
    stateful `tf.random` op, `keras.random` with seed=None, a `tf.random.Generator`) differs.

    What this proves: on this input, the part's randomness is held by its seed generators.
    What it cannot see: a draw made only on other inputs."""
    states = compat.seed_states(part)
    saved = [tf.identity(s.value) for s in states]
    first = tf.nest.flatten(run())
    for state, value in zip(states, saved):
        state.assign(value)
    second = tf.nest.flatten(run())
    for state, value in zip(states, saved):
        state.assign(value)
    if all(bool(tf.reduce_all(tf.equal(a, b))) for a, b in zip(first, second)):
        return None
    return (
        f"the {what} draws random numbers that the chain cannot replay: two runs from the "
        "same seed states differ. The exact backward runs each chunk again and must draw "
        "what the forward drew. Draw through a keras.random.SeedGenerator the layer holds "
        "(keras.random.normal(shape, seed=self.seed_generator); Keras's Dropout and "
        "GaussianNoise do), not with tf.random ops or keras.random with seed=None; or "
        "train with mode='truncated', backprop_chunks=1 (no recompute)."
    )


# Op types whose outputs differ when a step runs again: random draws (stateless ones too, whose
# seed a cell may advance between steps) and variable updates.
_UNREPEATABLE_OPS = (
    "Random",
    "Rng",
    "Multinomial",
    "TruncatedNormal",
    "AssignVariable",
    "AssignAddVariable",
    "AssignSubVariable",
)


def draws_or_writes(fn, specs: list) -> bool:
    """Whether `fn` traced on `specs` has an op whose output would differ when run again (a
    random draw, a variable update), in its graph or in the functions it calls (branches,
    loops, nested tf.functions)."""
    graph = (
        compat.quiet_function(fn, autograph=False)
        .get_concrete_function(*specs)
        .graph.as_graph_def()
    )
    ops = [node.op for node in graph.node] + [
        node.op for f in graph.library.function for node in f.node_def
    ]
    return any(name in op for op in ops for name in _UNREPEATABLE_OPS)


def cell_problem(index: int, cell, x: tf.Tensor, states: list) -> str | None:
    """Why the chunked gradient cannot replay `cell` (run as itself, step by step), or None:
    a cell that draws random numbers or changes a variable at each step would draw or change
    again in the recompute."""
    specs = [
        tf.TensorSpec(x.shape, x.dtype),
        tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape, s.dtype), states),
    ]
    if not draws_or_writes(lambda x, s: compat.call_layer(cell, x, s, training=True), specs):
        return None
    return (
        f"cells[{index}] ({type(cell).__name__}) draws random numbers or changes a variable "
        "at every step of its call: the exact backward runs each chunk again and would draw "
        "(or change) anew, so the gradient would belong to no forward pass. Keras's "
        "GRUCell, LSTMCell and SimpleRNNCell dropout and recurrent_dropout are replayed (one "
        "mask per sequence); draw other noise in the inputs_layer or the head (once per "
        "chunk, replayed), or train with mode='truncated', backprop_chunks=1 (no recompute)."
    )

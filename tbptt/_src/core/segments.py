"""A chain of segments as values, and the one backward step through a segment.

Segments are given as two functions of the segment index `k` (0-based, a scalar tensor) and the
flat list of carried tensors: `advance(k, carry) -> carry` (the forward, no loss) and
`segment(k, carry) -> (loss_k, carry)` (what is differentiated). `step_back` pulls the
cotangents a segment receives back through it, with the seeds its schedule says
(`schedules.py`); every loop of `chain.py` uses it.
"""

from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf

from tbptt._src.core import schedules

Advance = Callable[[tf.Tensor, list], list]
Segment = Callable[[tf.Tensor, list], tuple]
# A segment of a static chain, linearized: () -> (outputs [loss or None, *carry], pullback).
Linearized = Callable[[], tuple]


class Segments(NamedTuple):
    """A chain of `count` segments over a flat list of carried tensors.

    `bound` (None: `count`) is a bound of `count` that XLA can evaluate when it compiles the
    loops (the chunk count of a group of the two-level chain is not): it sizes the loops'
    TensorArrays and iteration counts inside a user's `jit_compile=True`.

    `live` (None: every loss counts) says which segments' losses count (a bool scalar): the
    backward then follows which carried cotangents may be non-zero and pulls back only those
    (a streaming window's context chunks add no loss of their own).
    """

    count: tf.Tensor
    advance: Advance
    segment: Segment | None  # None for a chain only ever run forward
    bound: tf.Tensor | None = None
    live: Callable[[tf.Tensor], tf.Tensor] | None = None  # k -> does segment k's loss count

    @property
    def most(self) -> tf.Tensor:
        return self.count if self.bound is None else self.bound


class ChainGradients(NamedTuple):
    loss: tf.Tensor
    grads: list
    final_carry: list
    initial_carry_grad: list
    kept_carry: list | None = None  # the carry entering segment `keep_carry_at`
    non_finite: tf.Tensor | None = None  # [len(NUMERICS_KINDS)] int32, see `check_numerics`
    carry_grad_norms: tf.Tensor | None = None  # [n, ages], see `record_carry_grads`


class Record(NamedTuple):
    """What a run records beside the loss and gradients.

    Attributes:
      carry_at: a segment index j in [0, n]: the carry entering segment j is returned as
        `kept_carry` (streaming keeps the state where its context window starts); None: none.
      non_finite: test every segment's values for NaN/Inf and return `non_finite`.
      carry_grad_norms: return ``[n, ages]``: the norm of the cotangent carried into the cut
        before segment k, per age (diagnostics).
    """

    carry_at: tf.Tensor | None = None
    non_finite: bool = False
    carry_grad_norms: bool = False


class Rows(NamedTuple):
    """The running sum of a sparse variable's gradient (an embedding table's): the rows each
    segment gives (its `IndexedSlices`, one row per lookup), written at the segment's index and
    joined at the end, so the sum is the one `IndexedSlices` one tape over the whole sequence
    gives (Keras's optimizers update those rows, and Adam squares each row)."""

    values: tf.TensorArray  # [rows_k, ...] per segment
    indices: tf.TensorArray  # [rows_k] int32 per segment

    @classmethod
    def empty(cls, variable, size) -> "Rows":
        shape = [None] + list(variable.shape[1:])
        dtype = tf.as_dtype(variable.dtype)
        return cls(
            tf.TensorArray(dtype, size=size, element_shape=shape, infer_shape=False),
            tf.TensorArray(tf.int32, size=size, element_shape=[None], infer_shape=False),
        )

    def write(self, k, grad: tf.IndexedSlices) -> "Rows":
        return Rows(
            self.values.write(k, grad.values),
            self.indices.write(k, tf.cast(grad.indices, tf.int32)),
        )

    def joined(self, variable) -> tf.IndexedSlices:
        shape = tf.constant(variable.shape.as_list(), tf.int64)
        return tf.IndexedSlices(self.values.concat(), self.indices.concat(), shape)


def sums(variables: list, sparse: tuple, size) -> list:
    """Zero running sums of the variables' gradients: `Rows` of `size` segments where
    `sparse` says so, else zero tensors."""
    return [
        Rows.empty(v, size) if is_sparse else tf.zeros_like(v)
        for v, is_sparse in zip(variables, _padded(sparse, variables))
    ]


def added(grads: list, d_vars: list, k) -> list:
    """The running sums with segment `k`'s gradients added."""
    return [g.write(k, d) if isinstance(g, Rows) else g + d for g, d in zip(grads, d_vars)]


def totals(grads: list, variables: list) -> list:
    """The sums as gradients: a sparse variable's rows joined into one `IndexedSlices`."""
    return [g.joined(v) if isinstance(g, Rows) else g for g, v in zip(grads, variables)]


def _padded(sparse: tuple, variables: list) -> tuple:
    return tuple(sparse) + (False,) * (len(variables) - len(sparse))


def zeros(tensors: list) -> list:
    return [tf.zeros_like(t) for t in tensors]


def loss_dtype_for(dtype: tf.DType) -> tf.DType:
    """The dtype losses are accumulated in: float64 for a float64 chain, else float32 (16-bit
    chunk losses would lose the small ones in the sum)."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


def step_back(outputs: list, pullback, carried: list, schedule) -> tuple[list, list]:
    """Pulls the cotangents one segment receives back through it.

    Args:
      outputs: the segment's flat outputs ``[loss or None, *carry_out]``.
      pullback: the backend's pullback at those outputs (see `vjp.py`).
      carried: the cotangents of `carry_out` the segment receives, by age (one list of tensors
        per age; see the schedule's `seeds`).
      schedule: says which seeds to pull back and which cotangents to pass on.

    Returns:
      ``(d_variables, carried cotangents of carry_in by age)``: the segment's own loss is seeded
      with 1, and the ages the schedule drops are not pulled back to carry_in.
    """
    seeds, want = schedule.seeds(carried, len(outputs) - 1)
    return _summed(pullback(seeds, want))


def step_back_live(
    outputs: list, pullback, carried: list, schedule, loss_live, carried_live: list
) -> tuple[list, list, list]:
    """`step_back`, where the seed sets known to be zero are not pulled back.

    Args:
      loss_live: whether the segment's own loss counts (a bool scalar).
      carried_live: whether each of `carried` may be non-zero (bool scalars, by age).

    Returns:
      `step_back`'s, and whether each cotangent passed on may be non-zero.
    """
    seeds, want = schedule.seeds(carried, len(outputs) - 1)
    alive = schedule.live_sets(loss_live, carried_live)
    d_vars, carried = _summed(pullback(seeds, want, alive))
    return d_vars, carried, [a for a, w in zip(alive, want) if w]


def _summed(results: list) -> tuple[list, list]:
    """The variables' gradient summed over the seed sets, and the carry cotangents passed on."""
    d_vars = [_sum(list(parts)) for parts in zip(*[d for d, _ in results])]
    return d_vars, [d for _, d in results if d is not None]


def _sum(parts: list):
    """Tensors added; a sparse gradient's seed sets (the same lookups, pulled back with other
    seeds) as one row per lookup, their values added."""
    if not isinstance(parts[0], tf.IndexedSlices):
        return tf.add_n(parts)
    # A set that did not reach the table has no rows; the others have the segment's lookups
    # (vjp.pullback_of skips no set when a variable is sparse).
    parts = [p for p in parts if p.values.shape[0] != 0] or parts[:1]
    if len(parts) == 1:
        return parts[0]
    return tf.IndexedSlices(
        tf.add_n([p.values for p in parts]), parts[0].indices, parts[0].dense_shape
    )


def flat(loss_and_carry) -> list:
    loss, carry = loss_and_carry
    return [loss] + list(carry)


class Backprop(NamedTuple):
    """How a chain is differentiated, the same for every segment of a call: the variables, the
    backend's `linearize` (`vjp.py`), the schedule that says which cotangents travel
    (`schedules.py`), the dtype losses are summed in, and which variables' gradients are sparse
    (`IndexedSlices`, summed as `Rows`)."""

    variables: list
    linearize: Callable
    schedule: schedules.Schedule
    loss_dtype: tf.DType
    sparse: tuple = ()  # per variable (missing: False)


def linearize_segment(segments: Segments, k, carry: list, backprop: Backprop):
    """Segment k run from `carry` under the backend: ``(outputs [loss, *carry], pullback)``."""
    segment = segments.segment
    assert segment is not None, "a chain run only forward has no segment to differentiate"
    return backprop.linearize(
        lambda c: flat(segment(k, c)),
        carry,
        backprop.variables,
        persistent=backprop.schedule.seed_count > 1,
        sparse=backprop.sparse,
    )


def pull_back(segments: Segments, k, carry: list, carried: list, alive, backprop: Backprop):
    """Segment k linearized at `carry` and the cotangents it receives (`carried`, by age)
    pulled back through it; with `alive` (may each age be non-zero?), the seed sets known to
    be zero skipped. Returns ``(outputs, d_variables, carried on, alive on)``."""
    outputs, pullback = linearize_segment(segments, k, carry, backprop)
    if not alive:
        d_vars, carried = step_back(outputs, pullback, carried, backprop.schedule)
        return outputs, d_vars, carried, alive
    loss_live = tf.constant(True) if segments.live is None else segments.live(k)
    return (outputs,) + step_back_live(
        outputs, pullback, carried, backprop.schedule, loss_live, alive
    )

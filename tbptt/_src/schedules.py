"""Truncation schedules: which cotangents cross a cut, one value per schedule.

A schedule answers every question about truncation that the chain, the streaming step and the
checks ask, so that adding a schedule is adding one class:

- `seeds(carried, num_leaves)`: the VJP seeds of one segment from the cotangents it receives
  (by age), and which of them are pulled back to its input (the others are dropped there);
- `carried_ages`: how many cotangents, kept apart by age, travel across a cut;
- `context_chunks`: how many chunks of a batch a streaming step keeps and re-runs in front of
  the next batch, so that gradients reach back across the batch cut;
- `accepts_final_state_grad`: whether a dLoss/d(final state) from outside can be carried in;
- `run(...)`: the chain's loss and gradients with this schedule.

```
Exact()          every cotangent travels, summed into one: full BPTT
TwoLevel()       the same gradient, keeping a boundary every ~sqrt(n) segments only
Truncated(m)     the cotangent a loss sends back is dropped after m segments: TBPTT(K, mK)
```
"""

from typing import Optional

import tensorflow as tf

from tbptt._src import chain as chain_lib
from tbptt._src import chunking

KEEP_NEEDS_CARRIED_MSG = ("keep_carry_at and record_carry_grads need the one-level chain with a "
                          "carried cotangent.")


class Schedule:
    """One level: a forward that keeps every boundary, then the backward in reverse."""

    carried_ages = 1
    context_chunks = 0
    accepts_final_state_grad = True

    @property
    def seed_count(self) -> int:
        """How many VJP seeds a segment is pulled back with (its own loss and each age)."""
        return 1

    def seeds(self, carried: list, num_leaves: int) -> tuple[list, list]:
        raise NotImplementedError

    def initial_carried(self, final_carry_grad: list) -> list:
        """The cotangents entering the last segment, by age: one from outside counts as having
        crossed one cut already (age 1); the older ages start at zero."""
        zeros = [tf.zeros_like(c) for c in final_carry_grad]
        return [final_carry_grad] + [list(zeros) for _ in range(self.carried_ages - 1)]

    def context_start(self, count):
        """The segment where the context a streaming step keeps starts, or None."""
        return None

    def run(self, segments: chain_lib.Segments, carry: list, variables: list, linearize, *,
            loss_dtype: tf.DType, final_carry_grad: Optional[list] = None, keep_carry_at=None,
            check_numerics: bool = False,
            record_carry_grads: bool = False) -> chain_lib.ChainGradients:
        """Total loss, d(loss)/d(variables) and d(loss)/d(carry) over the whole chain.

        Args:
          segments: the chain, see `chain.Segments`.
          carry: flat list of tensors, the value entering the first segment.
          variables: the variables to differentiate.
          linearize: the backend's `linearize` (see `vjp.py`).
          loss_dtype: dtype of the loss accumulator.
          final_carry_grad: flat list, dLoss/d(final carry) from outside the chain (or None).
          keep_carry_at: a segment index j in [0, n]: the carry entering segment j is returned
            as `kept_carry` (streaming keeps the state where its context window starts).
          check_numerics: test every segment's values for NaN/Inf and return `non_finite`.
          record_carry_grads: return `carry_grad_norms` ``[n, ages]``: the norm of the
            cotangent carried into the cut before segment k, per age.

        Returns:
          `ChainGradients`, grads aligned with `variables`, the carries as flat lists.
        """
        final_carry, boundaries, kept, found = chain_lib.forward(
            segments, carry, keep_at=keep_carry_at, check=check_numerics)
        if final_carry_grad is None:
            final_carry_grad = [tf.zeros_like(c) for c in final_carry]
        back = chain_lib.backward(
            segments, boundaries, self.initial_carried(list(final_carry_grad)), variables,
            linearize, self, loss_dtype, check=check_numerics, found=found,
            record=record_carry_grads)
        initial_carry_grad = [tf.add_n(list(ages)) for ages in zip(*back.carried)]
        return chain_lib.ChainGradients(
            back.loss, back.grads, final_carry, initial_carry_grad, kept,
            back.non_finite if check_numerics else None, back.carry_grad_norms)


class Exact(Schedule):
    """Full BPTT: the own loss and the carried cotangent pulled back together."""

    def seeds(self, carried: list, num_leaves: int) -> tuple[list, list]:
        return [[1.0] + list(carried[0])], [True]

    def __repr__(self) -> str:
        return "Exact()"


class TwoLevel(Exact):
    """The exact gradient keeping only every `group`-th boundary (two-level checkpointing).

    The coarse chain's segments are groups of ~sqrt(n) segments. Its forward keeps the group
    boundaries; its backward runs, for each group in reverse, the one-level exact chain over
    that group's segments seeded with the carried cotangent, which is exactly the group's VJP.
    Memory n/G + G boundaries and one segment, for one more forward pass.
    """

    def run(self, segments, carry, variables, linearize, *, loss_dtype, final_carry_grad=None,
            keep_carry_at=None, check_numerics=False, record_carry_grads=False):
        if keep_carry_at is not None or record_carry_grads:
            raise ValueError(KEEP_NEEDS_CARRIED_MSG)
        group = chunking.group_size_tensor(segments.count)
        groups = chain_lib.Segments(
            (segments.count + group - 1) // group,
            lambda j, c: chain_lib.forward(_group(segments, group, j), c, keep=False)[0], None)
        # The coarse forward is not checked: each group's chain re-runs (and checks) its segments.
        final_carry, boundaries, _, _ = chain_lib.forward(groups, carry)
        if final_carry_grad is None:
            final_carry_grad = [tf.zeros_like(c) for c in final_carry]

        def body(i, carried, grads, loss, found):
            j = groups.count - 1 - i
            inner = Exact().run(_group(segments, group, j), [ta.read(j) for ta in boundaries],
                                variables, linearize, loss_dtype=loss_dtype,
                                final_carry_grad=carried, check_numerics=check_numerics)
            grads = [g + d for g, d in zip(grads, inner.grads)]
            if check_numerics:
                found = chain_lib.merge_non_finite(
                    found, chain_lib.offset_non_finite(inner.non_finite, j * group))
            return i + 1, inner.initial_carry_grad, grads, loss + inner.loss, found

        _, initial_carry_grad, grads, loss, found = tf.while_loop(
            lambda i, *_: i < groups.count, body,
            (tf.constant(0), list(final_carry_grad), [tf.zeros_like(v) for v in variables],
             tf.zeros([], loss_dtype), chain_lib.no_findings()),
            parallel_iterations=chain_lib.PARALLEL_SEGMENTS, maximum_iterations=groups.count)
        return chain_lib.ChainGradients(loss, grads, final_carry, initial_carry_grad,
                                        non_finite=found if check_numerics else None)

    def __repr__(self) -> str:
        return "TwoLevel()"


def _group(segments: chain_lib.Segments, group, j) -> chain_lib.Segments:
    """Segments j*group .. (j+1)*group - 1 as a chain of their own."""
    first = j * group
    return chain_lib.Segments(tf.minimum(group, segments.count - first),
                              lambda k, c: segments.advance(first + k, c),
                              lambda k, c: segments.segment(first + k, c), bound=group)


class Truncated(Schedule):
    """TBPTT(K, mK): the cotangent that a loss sends back is dropped after `m` segments.

    The carried cotangent is kept per age (how many cuts it has crossed): a segment pulls back
    its own loss and each age separately, because their input cotangents must stay apart to be
    aged; the oldest age (m-1) only contributes to dW, its input cotangent is the one dropped.
    With m = 1 nothing crosses a cut, so each segment's backward runs right after its forward.
    A `final_carry_grad` from outside counts as having crossed one cut already (age 1).
    """

    def __init__(self, m: int):
        self.m = int(m)
        self.carried_ages = self.m - 1
        self.context_chunks = self.m - 1
        self.accepts_final_state_grad = self.m >= 2

    @property
    def seed_count(self) -> int:
        return self.m

    def seeds(self, carried: list, num_leaves: int) -> tuple[list, list]:
        seeds = [[1.0] + [None] * num_leaves] + [[None] + list(age) for age in carried]
        return seeds, [True] * len(carried) + [False]

    def context_start(self, count):
        return tf.maximum(count - self.context_chunks, 0) if self.context_chunks else None

    def run(self, segments, carry, variables, linearize, *, loss_dtype, final_carry_grad=None,
            keep_carry_at=None, check_numerics=False, record_carry_grads=False):
        if self.m > 1:
            return super().run(segments, carry, variables, linearize, loss_dtype=loss_dtype,
                               final_carry_grad=final_carry_grad, keep_carry_at=keep_carry_at,
                               check_numerics=check_numerics,
                               record_carry_grads=record_carry_grads)
        if keep_carry_at is not None or record_carry_grads:
            raise ValueError(KEEP_NEEDS_CARRIED_MSG)
        return chain_lib.one_sweep(segments, carry, variables, linearize, self, loss_dtype,
                                   check_numerics)

    def __repr__(self) -> str:
        return f"Truncated({self.m})"


def schedule_for(mode: str, backprop_chunks: int = 1, levels: int = 1) -> Schedule:
    """The schedule of a chain's `mode`, `backprop_chunks` and `levels` (validated before)."""
    if mode == "truncated":
        return Truncated(backprop_chunks)
    return TwoLevel() if levels == 2 else Exact()

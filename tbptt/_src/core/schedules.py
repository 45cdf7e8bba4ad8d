"""Truncation schedules: which cotangents cross a cut, one plain value per schedule.

A schedule answers the questions that the chain's loops (`chain.gradients`), the streaming step
and the checks ask; it runs nothing, so adding a schedule is adding one class:

- `seeds(carried, num_leaves)`: the VJP seeds of one segment from the cotangents it receives
  (by age), and which of them are pulled back to its input (the others are dropped there);
- `live_sets(loss_live, carried_live)`: which of those seed sets may be non-zero, so that a set
  known to be zero (a streaming context's loss, the ages that loss never sent) is skipped;
- `carried_ages`: how many cotangents, kept apart by age, travel across a cut (0: none, so
  each segment's backward runs right after its forward);
- `grouped`: whether the chain keeps a boundary only every ~sqrt(n) segments (two levels);
- `context_chunks`: how many chunks of a batch a streaming step keeps and re-runs in front of
  the next batch, so that gradients reach back across the batch cut;
- `accepts_final_state_grad`: whether a dLoss/d(final state) from outside can be carried in;
- `recomputes`: whether a segment runs twice (its draws must then be replayed).

```
Exact()          every cotangent travels, summed into one: full BPTT
TwoLevel()       the same gradient, keeping a boundary every ~sqrt(n) segments only
Truncated(m)     the cotangent a loss sends back is dropped after m segments: TBPTT(K, mK)
```
"""

import tensorflow as tf


class Schedule:
    """One age of cotangent, every boundary kept."""

    carried_ages = 1
    grouped = False
    context_chunks = 0
    accepts_final_state_grad = True

    @property
    def seed_count(self) -> int:
        """How many VJP seeds a segment is pulled back with (its own loss and each age)."""
        return 1

    @property
    def recomputes(self) -> bool:
        """Whether a segment runs twice (the forward sweep, then again in the backward): not
        when nothing crosses a cut, each backward then right after its own forward."""
        return self.carried_ages > 0

    def seeds(self, carried: list, num_leaves: int) -> tuple[list, list]:
        raise NotImplementedError

    def live_sets(self, loss_live, carried_live: list) -> list:
        """Whether each seed set of `seeds` may be non-zero (bool scalars), given whether the
        segment's own loss counts and whether each carried age may be non-zero."""
        raise NotImplementedError

    def initial_carried(self, final_carry_grad: list) -> list:
        """The cotangents entering the last segment, by age: one from outside counts as having
        crossed one cut already (age 1); the older ages start at zero."""
        zeros = [tf.zeros_like(c) for c in final_carry_grad]
        return [final_carry_grad] + [list(zeros) for _ in range(self.carried_ages - 1)]

    def context_start(self, count):
        """The segment where the context a streaming step keeps starts, or None."""
        return None


class Exact(Schedule):
    """Full BPTT: the own loss and the carried cotangent pulled back together."""

    def seeds(self, carried: list, num_leaves: int) -> tuple[list, list]:
        return [[1.0] + list(carried[0])], [True]

    def live_sets(self, loss_live, carried_live: list) -> list:
        return [tf.logical_or(loss_live, carried_live[0])]

    def __repr__(self) -> str:
        return "Exact()"


class TwoLevel(Exact):
    """The exact gradient keeping only every ~sqrt(n)-th boundary (two-level checkpointing)."""

    grouped = True

    def __repr__(self) -> str:
        return "TwoLevel()"


class Truncated(Schedule):
    """TBPTT(K, mK): the cotangent that a loss sends back is dropped after `m` segments.

    The carried cotangent is kept per age (how many cuts it has crossed): a segment pulls back
    its own loss and each age separately, because their input cotangents must stay apart to be
    aged; the oldest age (m-1) only contributes to dW, its input cotangent is the one dropped.
    With m = 1 nothing crosses a cut. A `final_carry_grad` from outside counts as having
    crossed one cut already (age 1).
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

    def live_sets(self, loss_live, carried_live: list) -> list:
        return [tf.convert_to_tensor(loss_live)] + list(carried_live)

    def context_start(self, count):
        return tf.maximum(count - self.context_chunks, 0) if self.context_chunks else None

    def __repr__(self) -> str:
        return f"Truncated({self.m})"


def schedule_for(mode: str, backprop_chunks: int = 1, levels: int = 1) -> Schedule:
    """The schedule of a chain's `mode`, `backprop_chunks` and `levels` (validated before)."""
    if mode == "truncated":
        return Truncated(backprop_chunks)
    return TwoLevel() if levels == 2 else Exact()

"""Choosing the chunk size: how many time steps a chunk holds, from T and a memory budget.

The memory the chunked backward keeps alive, per batch element, in floats:

```
levels=1:  ceil(T/K) * S           (one boundary state per chunk)
         + K * A                   (the activations of one chunk)
levels=2:  ceil(T/(K*G)) * S + G * S + K * A      (G chunks per group, G = ceil(sqrt(T/K)))
```

with S the floats of one state (all layers) and A ~ F + 10 * S the floats one time step keeps
for its backward (its inputs, and the gates and outputs of each layer). With no budget, K is
about sqrt(T) (levels=1) or T^(1/3) (levels=2), which minimizes the sum up to a constant factor.
With a budget, K is the largest chunk that fits: fewer chunks, less loop overhead.
"""

import math
from typing import NamedTuple

import tensorflow as tf

FLOATS_PER_STATE_VALUE_AND_STEP = 10


class ChunkPlan(NamedTuple):
    """How a sequence of `steps` is cut: chunks of `chunk_size` steps, `group` chunks per coarse
    segment with levels=2 (None with levels=1), and the estimated bytes kept alive."""

    steps: int
    chunk_size: int
    chunks: int
    group: int | None
    estimated_bytes: int


def group_size(chunks: int) -> int:
    """Chunks per coarse segment with levels=2: about sqrt(chunks)."""
    return max(1, math.ceil(math.sqrt(chunks)))


def group_size_tensor(chunks: tf.Tensor) -> tf.Tensor:
    """`group_size` inside the compiled chunk loop, where the chunk count is a tensor."""
    return tf.cast(tf.math.ceil(tf.sqrt(tf.cast(chunks, tf.float64))), tf.int32)


def estimated_bytes(
    steps: int,
    chunk_size: int,
    levels: int,
    batch: int,
    state_floats: int,
    step_floats: int,
    itemsize: int,
) -> int:
    """The memory model of the module docstring, in bytes."""
    chunks = math.ceil(steps / chunk_size)
    if levels == 1:
        kept = chunks * state_floats
    else:
        group = group_size(chunks)
        kept = math.ceil(chunks / group) * state_floats + group * state_floats
    return batch * itemsize * (kept + chunk_size * step_floats)


def plan(
    steps: int,
    *,
    chunk_size,
    levels: int,
    memory_budget,
    batch: int,
    state_floats: int,
    features: int,
    itemsize: int,
) -> ChunkPlan:
    """The chunking of one sequence (see the module docstring).

    Raises:
      ValueError: when no chunk size fits `memory_budget`.
    """
    step_floats = features + FLOATS_PER_STATE_VALUE_AND_STEP * state_floats

    def cost(size):
        return estimated_bytes(steps, size, levels, batch, state_floats, step_floats, itemsize)

    if chunk_size != "auto":
        size = min(chunk_size, steps)
    elif memory_budget is None:
        size = math.ceil(steps ** (1 / 2 if levels == 1 else 1 / 3))
    else:
        size = _evened(steps, _largest_fitting(steps, levels, memory_budget, cost), cost)
    chunks = math.ceil(steps / size)
    return ChunkPlan(steps, size, chunks, group_size(chunks) if levels == 2 else None, cost(size))


def _evened(steps: int, largest: int, cost) -> int:
    """The chunk size of as many chunks as `largest` needs, made as even as can be: a last
    chunk much shorter than the others would be padded to the chunk size by the compiled
    loops (wasted steps). Kept at `largest` where the even size would cost more."""
    even = math.ceil(steps / math.ceil(steps / largest))
    return even if cost(even) <= cost(largest) else largest


def _largest_fitting(steps: int, levels: int, budget: float, cost) -> int:
    """The largest chunk size whose estimated memory is within `budget`."""
    if cost(steps) <= budget:
        return steps
    # The cost falls then rises with the chunk size; its minimum is near sqrt(T) or T^(1/3).
    lowest = min(range(1, math.ceil(math.sqrt(steps)) + 2), key=cost)
    if cost(lowest) > budget:
        hint = ", pass levels=2," if levels == 1 else ""
        raise ValueError(
            f"memory_budget={int(budget)} bytes is too small for T={steps}: the "
            f"least this chunking keeps alive is about {cost(lowest)} bytes "
            f"(chunk_size={lowest}). Raise the budget{hint} or feed a shorter "
            "sequence per call."
        )
    low, high = lowest, steps  # cost(low) fits, cost(high) does not: bisect the rising side
    while high - low > 1:
        middle = (low + high) // 2
        if cost(middle) <= budget:
            low = middle
        else:
            high = middle
    return low

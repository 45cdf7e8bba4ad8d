"""Choosing the chunk size and how many chunks the exact backward keeps, from a memory budget.

The memory the chunked backward keeps alive, per batch element, in floats:

```
levels=1:  ceil(T/K) * S           (one boundary state per chunk)
         + G * K * A               (the activations of the G chunks differentiated as one run)
levels=2:  ceil(T/(K*G2)) * S + G2 * S + K * A      (G2 chunks per group, G2 = ceil(sqrt(T/K)))
```

with S the floats of one state (all layers) and A ~ F + 10 * S + 3 * O the floats one time
step keeps for its backward (its inputs, the gates and outputs of each layer, the head's
outputs and what the loss keeps of them). With no budget, K is about sqrt(T) (levels=1) or
T^(1/3) (levels=2), which minimizes the sum up to a constant factor, and G = 1: every chunk but
the last runs twice (the forward sweep, then the recompute).

A budget buys speed with memory. The default, "auto" (`DEFAULT_MEMORY_BUDGET`, 1 GiB), runs the
whole call as one chunk when its activations fit in it, one forward and one backward as one
tape over the sequence would, and otherwise keeps the least memory (G = 1): a long sequence
costs what it cost without a budget (with chunk_size="auto", K ~ sqrt(T) either way, the
whole call one run when it fits). A budget in bytes runs G chunks as one (a chunk G times
longer, G made as even as can be), so only the runs before the last run twice, and with
chunk_size="auto" takes the largest chunk that fits: fewer chunks, less loop overhead. G is
decided with the call's real batch size (in the compiled call, where it may only be known).
"""

import math
from typing import NamedTuple

import tensorflow as tf

FLOATS_PER_STATE_VALUE_AND_STEP = 10
FLOATS_PER_OUTPUT_VALUE_AND_STEP = 3
# memory_budget="auto": a fixed size (not a share of this machine's memory), so that a call is
# cut the same way, and gives the same floats, on every machine.
DEFAULT_MEMORY_BUDGET = 2**30


class ChunkPlan(NamedTuple):
    """How a sequence of `steps` is cut: chunks of `chunk_size` steps, `group` chunks per coarse
    segment with levels=2 (None with levels=1), the estimated bytes kept alive, and
    `kept_chunks`, how many chunks the exact backward runs as one (`chunks`: the whole call,
    one forward and one backward; 1: every chunk but the last run twice)."""

    steps: int
    chunk_size: int
    chunks: int
    group: int | None
    estimated_bytes: int
    kept_chunks: int = 1


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
    kept_chunks: int = 1,
) -> int:
    """The memory model of the module docstring, in bytes."""
    chunks = math.ceil(steps / chunk_size)
    if levels == 1:
        kept = chunks * state_floats
    else:
        group = group_size(chunks)
        kept = math.ceil(chunks / group) * state_floats + group * state_floats
    run = min(kept_chunks * chunk_size, steps)
    return batch * itemsize * (kept + run * step_floats)


def kept_chunks(
    memory_budget, chunks, chunk_size, batch, state_floats, step_floats, itemsize
) -> tf.Tensor:
    """How many chunks the exact backward runs as one (G of the module docstring): from Python
    numbers, or from tensors inside a compiled call (the batch size and T may be known only
    there). An int32 tensor in [1, chunks]."""
    if memory_budget is None:
        return tf.ones([], tf.int32)
    as_float = lambda x: tf.cast(x, tf.float64)  # noqa: E731
    chunks = tf.cast(chunks, tf.int32)
    row = as_float(batch) * itemsize
    states = row * as_float(chunks) * state_floats
    per_chunk = row * as_float(chunk_size) * step_floats
    if memory_budget == "auto":
        fits = as_float(chunks) * per_chunk <= DEFAULT_MEMORY_BUDGET
        return tf.where(fits, chunks, 1)
    fitting = tf.math.floor((memory_budget - states) / per_chunk)  # clipped before the cast
    fitting = tf.clip_by_value(fitting, 1.0, as_float(tf.maximum(chunks, 1)))
    # As even as can be: runs of `fitting` leave a last one as short as one chunk, which the
    # compiled loops would pad to a run's length.
    runs = tf.math.ceil(as_float(chunks) / fitting)
    return tf.cast(tf.math.ceil(as_float(chunks) / runs), tf.int32)


def plan(
    steps: int,
    *,
    chunk_size,
    levels: int,
    memory_budget,
    batch: int,
    state_floats: int,
    step_floats: int,
    itemsize: int,
    keeps_runs: bool = True,
) -> ChunkPlan:
    """The chunking of one sequence (see the module docstring); `step_floats` is A, and
    `keeps_runs` whether the backward may run chunks as one (exact, one level).

    Raises:
      ValueError: when no chunk size fits `memory_budget`.
    """

    def cost(size, kept=1):
        return estimated_bytes(
            steps, size, levels, batch, state_floats, step_floats, itemsize, kept
        )

    if chunk_size != "auto":
        size = min(chunk_size, steps)
    elif memory_budget in (None, "auto"):  # "auto": the kept chunks below make a call that fits one
        size = math.ceil(steps ** (1 / 2 if levels == 1 else 1 / 3))
    else:
        size = _evened(steps, _largest_fitting(steps, levels, memory_budget, cost), cost)
    chunks = math.ceil(steps / size)
    kept = 1
    if keeps_runs and levels == 1:
        with tf.init_scope():  # Python numbers in, a number out, inside a trace too
            kept = int(
                kept_chunks(memory_budget, chunks, size, batch, state_floats, step_floats, itemsize)
            )
    group = group_size(chunks) if levels == 2 else None
    return ChunkPlan(steps, size, chunks, group, cost(size, kept), kept)


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

"""Window after window of B streams: what one step hands to the next, checked.

```
carry = None
for inputs, targets in windows:             # window j+1 continues window j, row by row
    call = stream_call(config, stack, loss_fn, carry, per_step)   # the context in front
    run = ... value_and_gradients of call ...
    carry = next_carry(call, run)           # the state where the kept context starts
```

With `mode="truncated", backprop_chunks=m` the last m-1 chunks of each window (its per-step
values and the state entering them) are kept and re-run in front of the next window with zero
loss weight, so every loss reaches m chunks back across window cuts too. Both
`RecurrentChain.stream_step` and `tbptt.keras.ChunkedModel(stateful=True)` run this.
"""

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tbptt._src.core import checks
from tbptt._src.core.types import State
from tbptt._src.recurrent import calls
from tbptt._src.recurrent.config import ChainConfig
from tbptt._src.recurrent.stack import CellStack


class StreamCarry(NamedTuple):
    """What one `stream_step` hands to the next: a value, not a variable.

    Attributes:
      state: the state entering `context` (the final state when there is no context).
      context: name -> ``[B, c, ...]``: the last `backprop_chunks - 1` chunks of the previous
        windows ("inputs", "targets" and the flags and weights given), re-run in front of the
        next window so that its gradients reach back into them; empty in exact mode and with
        backprop_chunks=1.
    """

    state: State
    context: dict


def stream_call(
    config: ChainConfig, stack: CellStack, loss_fn, carry: StreamCarry | None, per_step: dict
) -> calls.Prepared:
    """A stream step's call, checked: the carried context (if the schedule keeps one) joined
    in front of the window's per-step values."""
    if per_step.get("targets") is None:
        raise ValueError(
            "stream_step: targets must be given: [batch, time, ...] values that "
            "loss_fn compares with the predictions."
        )
    per_step = {name: value for name, value in per_step.items() if value is not None}
    carry = check_carry(config, carry, per_step)
    context_chunks = config.schedule.context_chunks
    if context_chunks:
        check_window(config, time_steps(per_step["inputs"]))
        per_step = join_context({} if carry is None else carry.context, per_step, stack.dtype)
    return calls.gradient_call(
        config,
        stack,
        per_step.pop("inputs"),
        per_step.pop("targets"),
        loss_fn,
        initial_state=None if carry is None else carry.state,
        context_steps=context_steps(carry) if context_chunks else None,
        state_name="carry.state",
        **per_step,
    )


def next_carry(prepared: calls.Prepared, state: State, kept_from) -> StreamCarry:
    """The carry after a step: `state` (entering step `kept_from` of the joined window) and
    the per-step values from there on (none without a context)."""
    call = prepared.call
    if call.context_steps is None:
        return StreamCarry(state, {})
    return StreamCarry(
        state, {name: value[:, kept_from:] for name, value in call.batch.given().items()}
    )


def check_carry(config: ChainConfig, carry, per_step: dict) -> StreamCarry | None:
    """`carry` as the previous step left it for this chain, or a clear error: a carry of
    another type, of other streams (batch size), of another chunking (a context that is not
    whole chunks of this chain, or longer than it keeps), or of other arguments."""
    if carry is None:
        return None
    if not isinstance(carry, StreamCarry):
        raise TypeError(
            f"carry must be the tbptt.StreamCarry that the previous stream_step "
            f"returned (or None for the first window), got {type(carry).__name__}. "
            "Pass the carry as it came back: result, carry = chain.stream_step(...)."
        )
    if not isinstance(carry.context, dict):
        raise TypeError(
            f"carry.context must be a dict of per-step values, got {type(carry.context).__name__}."
        )
    context = carry.context
    if not context:
        return carry
    if not config.schedule.context_chunks:
        raise ValueError(
            f"carry holds a context of {sorted(context)}, but this chain "
            f"({config.schedule!r}) keeps none: the carry comes from a chain with "
            "mode='truncated' and backprop_chunks > 1. Start the stream again "
            "from carry=None, or use the chain that made it."
        )
    if set(context) != set(per_step):
        raise ValueError(
            f"stream_step: this window gives {sorted(per_step)}, but the carry "
            f"holds the context of {sorted(context)}. Pass the same arguments "
            "(targets, sample_weight, reset, mask) at every step."
        )
    _check_context_shape(config, context, per_step)
    return carry


def _check_context_shape(config: ChainConfig, context: dict, per_step: dict) -> None:
    steps = time_steps(context["inputs"])
    size, most = int(config.chunk_size), config.schedule.context_chunks
    if steps is not None and (steps % size or steps > most * size):
        raise ValueError(
            f"carry.context holds {steps} steps, but this chain (chunk_size={size}, "
            f"backprop_chunks={config.backprop_chunks}) keeps whole chunks, at most {most} of "
            f"them ({most * size} steps): the carry was made by a chain with another chunking. "
            "Start the stream again from carry=None, or use the chain that made it."
        )
    batch = _batch(per_step["inputs"])
    for name, value in context.items():
        got = _batch(value)
        if None not in (batch, got) and got != batch:
            raise ValueError(
                f"carry.context[{name!r}] holds {got} streams, but this window "
                f"has {batch} rows. A carry belongs to the streams it was made "
                "for: start again from carry=None for another batch size."
            )


def join_context(context: dict, per_step: dict, dtype: tf.DType) -> dict:
    """A window's per-step values as tensors, each with its carried context (if any) in front."""
    per_step = {name: checks.as_tensor(name, value, dtype) for name, value in per_step.items()}
    return {
        name: tf.concat([context[name], tf.cast(value, context[name].dtype)], axis=1)
        if name in context
        else value
        for name, value in per_step.items()
    }


def context_steps(carry: StreamCarry | None):
    if carry is None or not carry.context:
        return 0
    return tf.shape(carry.context["inputs"])[1]


def time_steps(value) -> int | None:
    """T of a ``[B, T, ...]`` value where it is known."""
    shape = tf.TensorShape(getattr(value, "shape", None) or np.shape(value))
    return shape[1] if shape.rank is not None and shape.rank >= 2 else None


def _batch(value) -> int | None:
    shape = tf.TensorShape(getattr(value, "shape", None) or np.shape(value))
    return shape[0] if shape.rank else None


def check_window(config: ChainConfig, steps) -> None:
    """A stream with a carried context counts it in chunks: windows must be whole chunks."""
    m = config.backprop_chunks
    if config.chunk_size == "auto":
        raise ValueError(
            "stateful streaming with mode='truncated', backprop_chunks > 1 needs a "
            "fixed int chunk_size (the carried context is counted in chunks), got "
            "'auto'."
        )
    if steps is not None and steps % config.chunk_size:
        raise ValueError(
            f"streaming with mode='truncated', backprop_chunks={m} carries the last {m - 1} "
            f"chunks of each window into the next one, so every window must be a whole number "
            f"of chunks: got a window of T={steps} steps with chunk_size={config.chunk_size}. "
            "Make the window a multiple of chunk_size."
        )

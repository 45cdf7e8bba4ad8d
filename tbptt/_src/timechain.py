"""The time axis as a chain: chunks of a sequence run by a core, as `chain.Segments`.

```
inputs [B, T, F] -> chunks [B, K, F] (the last one shorter when T does not divide)
segment k:  (y_k, s_k) = core(x_k, s_{k-1});   L_k = weight_k * loss_fn(targets_k, y_k[, w_k])
```

A core is anything with the contract `core(x [B, K, F], state, *, training, flags,
with_outputs, max_steps) -> (y [B, K, O] or None, state)` over a flat list of state tensors: a
`CellStack`, or `as_core(fn)` of a plain `fn(x, state) -> (y, state)`.

Per-step values arrive in `args` (a dict of tensors: "inputs", "targets", "sample_weight",
"reset", "mask", "context_steps", "steps") or as `SourceReader`s, which read a window of a chunk
source registered for the call (`sources.py`): the compiled function gets the source's handle as
a value, never an object stored on the chain.
"""

from typing import Callable, NamedTuple, Optional

import tensorflow as tf

from tbptt._src import chain as chain_lib
from tbptt._src import checks
from tbptt._src import layers
from tbptt._src import losses
from tbptt._src import sources as sources_lib

PER_STEP_ARGS = ("inputs", "targets", "sample_weight", "reset", "mask")


class SourceReader(NamedTuple):
    """A chunk source inside the compiled function: its handle, the run reading it (see
    `sources.run_token`) and the spec of a window."""

    handle: tf.Tensor
    run: tf.Tensor
    spec: tf.TensorSpec

    def read(self, start, stop) -> tf.Tensor:
        return sources_lib.read_window(self.handle, self.run, start, stop, self.spec)


def as_core(fn: Callable) -> Callable:
    """A plain `fn(x [B, K, F], state) -> (y [B, K, O], state)` as a core (no flags)."""

    def core(x, state, *, training=True, flags=None, with_outputs=True, max_steps=None):
        del training, max_steps
        if flags is not None:
            raise ValueError("reset and mask need a stack of cells (they act step by step); "
                             "a plain core sees whole chunks.")
        y, state = fn(x, list(state))
        return (y if with_outputs else None), list(state)

    return core


def steps(args: dict):
    """T: static for chunk sources, else read from the inputs."""
    return args["steps"] if "steps" in args else tf.shape(args["inputs"])[1]


def window(value, start, stop):
    """Steps [start, stop) of a per-step value ``[B, T, ...]`` or a `SourceReader`."""
    if isinstance(value, SourceReader):
        return value.read(start, stop)
    return value[:, start:stop]


def chunk_flags(args: dict, start, stop) -> Optional[layers.StepFlags]:
    """The chunk's reset and mask, time-major; None when neither is set."""
    if "reset" not in args and "mask" not in args:
        return None
    return layers.StepFlags(*[layers.time_major(window(args[name], start, stop))
                              if name in args else None for name in ("reset", "mask")])


def masked_weight(sample_weight, mask, dtype):
    """sample_weight ``[B, t, ...]`` times mask ``[B, t]`` (None where both are None).

    The mask is reshaped to broadcast against the weight's trailing axes: ``[B, t, 1]`` times
    ``[B, t]`` would broadcast to ``[B, t, t]``.
    """
    if mask is None:
        return sample_weight
    mask = tf.cast(mask, dtype)
    if sample_weight is None:
        return mask
    sample_weight = tf.cast(sample_weight, dtype)
    return sample_weight * tf.reshape(mask, tf.concat(
        [tf.shape(mask), tf.ones([sample_weight.shape.rank - 2], tf.int32)], 0))


def chunk_weights(args: dict, size, reduction: losses.Reduction, dtype: tf.DType) -> Callable:
    """`weight(k)`, the factor on chunk k's loss (see `losses.Reduction`).

    sum: 1. mean: what chunk k's own loss is divided by, over what the loss of the whole
    sequence is divided by, so that the weighted chunk losses add up to the whole's:

    ```
    steps:    t_k / T                          (with a mask: over the unmasked steps per row)
    kept:     kept_k / kept                    kept labels, as a Keras loss with ignore_class
    weights:  sum(w_k) / sum(w)                the sample weights ("mean_with_sample_weight")
    ```

    Context chunks (streaming) weigh 0 and do not count in the whole.
    """
    total = steps(args)
    context = args.get("context_steps", tf.zeros([], tf.int32))
    zero, one = tf.zeros([], dtype), tf.ones([], dtype)
    if reduction.combine == "sum":
        return lambda k: tf.where(k * size < context, zero, one)
    chunk_count, whole = _share_counts(args, reduction, dtype, context, total)

    def weight(k):
        start, stop = k * size, tf.minimum((k + 1) * size, total)
        share = tf.math.divide_no_nan(chunk_count(start, stop), whole)
        return tf.where(start < context, zero, share)

    return weight


def _share_counts(args: dict, reduction: losses.Reduction, dtype, context, total):
    """``(count(start, stop), whole)``: what a chunk's loss is divided by, and the whole's."""
    share = reduction.share
    if share == "weights" and "sample_weight" not in args and "mask" not in args:
        share = "steps"  # Keras divides by the element count when no weight is given
    if share == "kept":
        kept = tf.cast(losses.kept_labels(args["targets"], reduction.ignore_class), dtype)
        unmasked = kept * tf.cast(args["mask"], dtype) if "mask" in args else kept
        return (lambda a, b: tf.reduce_sum(kept[:, a:b])), tf.reduce_sum(unmasked[:, context:])
    if share == "weights":
        weights = tf.cast(masked_weight(args.get("sample_weight"), args.get("mask"), dtype),
                          dtype)
        return (lambda a, b: tf.reduce_sum(weights[:, a:b])), tf.reduce_sum(weights[:, context:])
    steps_of = lambda a, b: tf.cast(b - a, dtype)  # noqa: E731
    if "mask" not in args:
        return steps_of, tf.cast(total - context, dtype)
    unmasked = tf.reduce_sum(tf.cast(args["mask"][:, context:], dtype))
    return steps_of, unmasked / tf.cast(tf.shape(args["mask"])[0], dtype)


def segments(core, args: dict, loss_fn: Callable, reduction: losses.Reduction,
             loss_dtype: tf.DType) -> chain_lib.Segments:
    """The chunks of one sequence as chain segments over the flat state.

    Args:
      core: see the module docstring.
      args: the per-step values, "chunk_size" (a scalar tensor) and, for streaming,
        "context_steps" (leading steps that add no loss).
      loss_fn: ``loss_fn(y_true [B, t, ...], y_pred [B, t, O][, sample_weight]) -> scalar``.
      reduction: how the chunk losses add up (see `chunk_weights`).
      loss_dtype: the dtype every chunk loss is computed and weighted in.
    """
    size, total = args["chunk_size"], steps(args)
    weight = chunk_weights(args, size, reduction, loss_dtype)

    def bounds(k):
        return k * size, tf.minimum((k + 1) * size, total)

    def advance(k, state):
        start, stop = bounds(k)
        return core(window(args["inputs"], start, stop), state,
                    flags=chunk_flags(args, start, stop), with_outputs=False, max_steps=size)[1]

    def segment(k, state):
        start, stop = bounds(k)
        predictions, state = core(window(args["inputs"], start, stop), state,
                                  flags=chunk_flags(args, start, stop), max_steps=size)
        loss_args = [window(args["targets"], start, stop), predictions]
        losses.check_per_step(reduction, *loss_args)
        sample_weight = masked_weight(
            window(args["sample_weight"], start, stop) if "sample_weight" in args else None,
            window(args["mask"], start, stop) if "mask" in args else None, predictions.dtype)
        if sample_weight is not None:
            loss_args.append(sample_weight)
        loss = tf.cast(checks.scalar_loss(loss_fn(*loss_args)), loss_dtype)
        return loss * weight(k), state

    return chain_lib.Segments((total + size - 1) // size, advance, segment)


def forward(core, args: dict, training: bool, dtype: tf.DType):
    """The plain forward over chunks (inputs read from a source window by window): outputs
    ``[B, T, O]`` of `dtype` gathered chunk by chunk, and the final flat state."""
    size, total = args["chunk_size"], steps(args)

    def output(k, state):
        start, stop = k * size, tf.minimum((k + 1) * size, total)
        predictions, state = core(window(args["inputs"], start, stop), state,
                                  training=training, flags=chunk_flags(args, start, stop),
                                  max_steps=size)
        return layers.time_major(predictions), state

    outputs, state = chain_lib.forward_outputs((total + size - 1) // size, output,
                                               list(args["state"]), dtype)
    return layers.time_major(outputs), state

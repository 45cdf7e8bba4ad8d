"""The time axis as a chain: chunks of a sequence run by a core, as `chain.Segments`.

```
inputs [B, T, F] -> chunks [B, K, F] (the last one shorter when T does not divide)
segment k:  (y_k, s_k) = core(x_k, s_{k-1});   L_k = weight_k * loss_fn(targets_k, y_k[, w_k])
```

A core is anything with the contract `core(x [B, K, F], state, *, training, flags,
with_outputs, loop, draws, chunk) -> (y [B, K, O] or None, state)` over a flat list of state
tensors: a `CellStack`, or a plain function wrapped to it (tests do). `draws` is what the call
drew once (`CellStack.draws`) and `chunk` the chunk's index: a chunk replays its draws in the
recompute (see `randomness.py`).

The compiled bodies of a chain's calls are here (`gradients`, `forward`): they rebuild the
`calls.Call` they are given and run it, reading chunk sources through `SourceReader`s, which
read a window of a source registered for the call (`sources.py`): the compiled function gets
the source's handle as a value, never an object stored on the chain.

```
gradients(config, stack, call):  segments of the call -> chain.gradients -> Run
```
"""

import warnings
from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf

from tbptt._src.core import chain as chain_lib
from tbptt._src.core import checks, chunking, compat
from tbptt._src.core import segments as segments_lib
from tbptt._src.core import sources as sources_lib
from tbptt._src.core import vjp as vjp_lib
from tbptt._src.core.randomness import Draws
from tbptt._src.recurrent import calls, losses
from tbptt._src.recurrent.calls import Batch, Call, Static
from tbptt._src.recurrent.config import ChainConfig
from tbptt._src.recurrent.loops import timeloop


class SourceReader(NamedTuple):
    """A chunk source inside the compiled function: its handle, the run reading it (see
    `sources.run_token`) and the spec of a window."""

    handle: tf.Tensor
    run: tf.Tensor
    spec: tf.TensorSpec

    def read(self, start, stop) -> tf.Tensor:
        return sources_lib.read_window(self.handle, self.run, start, stop, self.spec)


class Run(NamedTuple):
    """What the compiled gradient function returns (flat lists)."""

    loss: tf.Tensor
    grads: list
    final_state: list
    initial_state_grad: list
    kept_state: list  # the state where the next stream step's context starts
    kept_from: tf.Tensor  # ... and that step
    non_finite: tf.Tensor | None
    carry_grad_norms: tf.Tensor | None


def gradients(config: ChainConfig, stack, tensors: dict, static: Static) -> Run:
    """The compiled body of `value_and_gradients` and `stream_step`: the call's chunks as
    segments, run by `chain.gradients` with the config's schedule and backend."""
    call = _rebuilt(tensors, static)
    if calls.keeps_runs(config, static.record):
        call = call._replace(chunk_size=call.chunk_size * _run_length(config, stack, call))
    loss_dtype = segments_lib.loss_dtype_for(stack.dtype)
    draws = stack.draws(calls.batch_size(call.state[0]), training=True)
    segments_ = segments(
        stack,
        call,
        static.loss_fn,
        losses.reduction_of(config.reduction, static.loss_fn),
        loss_dtype,
        xla=static.xla,
        draws=draws,
    )
    keep_at = None if call.context_steps is None else config.schedule.context_start(segments_.count)
    sparse = _sparse_variables(stack) if config.embedding_grads == "sparse" else ()
    result = chain_lib.gradients(
        segments_,
        call.state,
        stack.trainable_variables,
        vjp_lib.get_linearize(config.backend),
        config.schedule,
        loss_dtype=loss_dtype,
        final_carry_grad=call.final_state_grad,
        record=segments_lib.Record(keep_at, config.check_numerics, static.record),
        sparse=sparse,
    )
    total = steps_of(call)
    if keep_at is None or result.kept_carry is None:
        kept, kept_from = result.final_carry, total
    else:
        kept, kept_from = result.kept_carry, tf.minimum(keep_at * call.chunk_size, total)
    return Run(
        result.loss,
        result.grads,
        result.final_carry,
        result.initial_carry_grad,
        kept,
        kept_from,
        result.non_finite,
        result.carry_grad_norms,
    )


def _run_length(config: ChainConfig, stack, call: Call) -> tf.Tensor:
    """How many chunks the backward keeps as one (`chunking.kept_chunks`): the call then runs
    in chunks that many times longer, and only the runs before the last run twice. From
    this call's batch size and T, which may be known only inside the compiled function."""
    size = call.chunk_size
    return chunking.kept_chunks(
        config.memory_budget,
        (steps_of(call) + size - 1) // size,
        size,
        calls.batch_size(call.state[0]),
        stack.state_floats,
        calls.step_floats(stack),
        stack.dtype.size,
    )


_SPARSE_UNDER_XLA = (
    "an Embedding's gradient is summed densely inside an XLA-compiled function "
    "(jit_compile=True): XLA sizes every array statically, and a chunk's rows of lookups "
    "differ in number. Keras's optimizers step otherwise on a dense gradient than on its "
    "IndexedSlices (Adam squares each lookup's row): for Keras's own step, compile with "
    "jit_compile=False."
)


def _sparse_variables(stack) -> tuple:
    """Which variables' gradients are summed as rows of lookups (`segments.Rows`): none
    inside XLA, with a warning when that changes the answer."""
    sparse = stack.sparse_variables()
    if any(sparse) and compat.in_xla_context():
        warnings.warn(_SPARSE_UNDER_XLA, stacklevel=2)
        return ()
    return sparse


def forward(stack, tensors: dict, static: Static) -> tuple:
    """The compiled body of `__call__`: in memory the whole sequence is one chunk; a source is
    read and run chunk by chunk. Returns ``(outputs [B, T, O], final flat state)``."""
    call = _rebuilt(tensors, static)
    draws = stack.draws(calls.batch_size(call.state[0]), training=static.training)
    if not static.source_specs:
        flags = chunk_flags(call.batch, 0, tf.shape(call.batch.inputs)[1])
        return stack(
            call.batch.inputs,
            call.state,
            training=static.training,
            flags=flags,
            loop=timeloop.LoopSettings(xla=static.xla),
            draws=draws,
        )
    size, total = call.chunk_size, steps_of(call)
    loop = timeloop.LoopSettings(size, static.xla)

    def output(k, state):
        start, stop = k * size, tf.minimum((k + 1) * size, total)
        predictions, state = stack(
            window(call.batch.inputs, start, stop),
            state,
            training=static.training,
            flags=chunk_flags(call.batch, start, stop),
            loop=loop,
            draws=draws,
            chunk=k,
        )
        return timeloop.time_major(predictions), state

    outputs, state = chain_lib.forward_outputs(
        (total + size - 1) // size, output, list(call.state), stack.dtype, rank=3
    )
    return timeloop.time_major(outputs), state


def _rebuilt(tensors: dict, static: Static) -> Call:
    """The call inside the compiled function, each chunk source read through its handle."""
    run = sources_lib.run_token() if static.source_specs else None
    readers = {
        name: SourceReader(tensors["sources"][name], run, spec)
        for name, spec in static.source_specs
    }
    return Call.from_tensors({k: v for k, v in tensors.items() if k != "sources"}, readers)


def steps_of(call: Call):
    """T: static for chunk sources, else read from the inputs."""
    return call.steps if call.steps is not None else tf.shape(call.batch.inputs)[1]


def window(value, start, stop):
    """Steps [start, stop) of a per-step value ``[B, T, ...]`` or a `SourceReader`."""
    if isinstance(value, SourceReader):
        return value.read(start, stop)
    return value[:, start:stop]


def chunk_flags(batch: Batch, start, stop) -> timeloop.StepFlags | None:
    """The chunk's reset and mask, time-major; None when neither is set."""
    if batch.reset is None and batch.mask is None:
        return None
    return timeloop.StepFlags(
        *[
            None if flag is None else timeloop.time_major(window(flag, start, stop))
            for flag in (batch.reset, batch.mask)
        ]
    )


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
    return sample_weight * tf.reshape(
        mask, tf.concat([tf.shape(mask), tf.ones([sample_weight.shape.rank - 2], tf.int32)], 0)
    )


def chunk_weights(call: Call, size, reduction: losses.Reduction, dtype: tf.DType) -> Callable:
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
    total = steps_of(call)
    context = tf.zeros([], tf.int32) if call.context_steps is None else call.context_steps
    zero, one = tf.zeros([], dtype), tf.ones([], dtype)
    if reduction.combine == "sum":
        return lambda k: tf.where(k * size < context, zero, one)
    chunk_count, whole = _share_counts(call.batch, reduction, dtype, context, total)

    def weight(k):
        start, stop = k * size, tf.minimum((k + 1) * size, total)
        share = tf.math.divide_no_nan(chunk_count(start, stop), whole)
        return tf.where(start < context, zero, share)

    return weight


def _share_counts(batch: Batch, reduction: losses.Reduction, dtype, context, total):
    """``(count(start, stop), whole)``: what a chunk's loss is divided by, and the whole's."""
    share = reduction.share
    if share == "weights" and batch.sample_weight is None and batch.mask is None:
        share = "steps"  # Keras divides by the element count when no weight is given
    if share == "kept":
        ignored = int(reduction.ignore_class)  # type: ignore[arg-type]  # set with "kept"
        kept = tf.cast(losses.kept_labels(batch.targets, ignored), dtype)
        unmasked = kept if batch.mask is None else kept * tf.cast(batch.mask, dtype)
        return (lambda a, b: tf.reduce_sum(kept[:, a:b])), tf.reduce_sum(unmasked[:, context:])
    if share == "weights":
        weights = tf.cast(masked_weight(batch.sample_weight, batch.mask, dtype), dtype)
        return (lambda a, b: tf.reduce_sum(weights[:, a:b])), tf.reduce_sum(weights[:, context:])
    steps_of = lambda a, b: tf.cast(b - a, dtype)  # noqa: E731
    if batch.mask is None:
        return steps_of, tf.cast(total - context, dtype)
    unmasked = tf.reduce_sum(tf.cast(batch.mask[:, context:], dtype))
    return steps_of, unmasked / tf.cast(tf.shape(batch.mask)[0], dtype)


def segments(
    core,
    call: Call,
    loss_fn: Callable,
    reduction: losses.Reduction,
    loss_dtype: tf.DType,
    xla: bool = True,
    draws: Draws = Draws(),
) -> segments_lib.Segments:
    """The chunks of one sequence as chain segments over the flat state.

    Args:
      core: see the module docstring.
      call: the per-step values, the chunk size (a scalar tensor) and, for streaming, the
        context steps (leading steps that add no loss).
      loss_fn: ``loss_fn(y_true [B, t, ...], y_pred [B, t, O][, sample_weight]) -> scalar``.
      reduction: how the chunk losses add up (see `chunk_weights`).
      loss_dtype: the dtype every chunk loss is computed and weighted in.
      xla: whether the stock cells' loops are compiled with XLA on their own.
      draws: what the call drew once; each chunk replays its own draws from it.
    """
    size, total, batch = call.chunk_size, steps_of(call), call.batch
    loop = timeloop.LoopSettings(size, xla)
    weight = chunk_weights(call, size, reduction, loss_dtype)

    def run(k, state, with_outputs: bool):
        start, stop = k * size, tf.minimum((k + 1) * size, total)
        flags = chunk_flags(batch, start, stop)
        outputs, state = core(
            window(batch.inputs, start, stop),
            state,
            flags=flags,
            with_outputs=with_outputs,
            loop=loop,
            draws=draws,
            chunk=k,
        )
        return outputs, state, (start, stop)

    def segment(k, state):
        predictions, state, (start, stop) = run(k, state, with_outputs=True)
        loss = _chunk_loss(loss_fn, reduction, batch, start, stop, predictions)
        return tf.cast(loss, loss_dtype) * weight(k), state

    live = None if call.context_steps is None else lambda k: k * size >= call.context_steps

    def advance(k, state):
        return run(k, state, with_outputs=False)[1]

    return segments_lib.Segments((total + size - 1) // size, advance, segment, live=live)


def _chunk_loss(loss_fn, reduction: losses.Reduction, batch: Batch, start, stop, predictions):
    """The loss of one chunk: `loss_fn` on its targets and predictions, with its sample
    weights times its mask where either is given."""
    loss_args = [window(batch.targets, start, stop), predictions]
    losses.check_per_step(reduction, *loss_args)
    sample_weight = masked_weight(
        None if batch.sample_weight is None else window(batch.sample_weight, start, stop),
        None if batch.mask is None else window(batch.mask, start, stop),
        predictions.dtype,
    )
    if sample_weight is not None:
        loss_args.append(sample_weight)
    return checks.scalar_loss(loss_fn(*loss_args))

"""One call of a recurrent chain, checked and laid out in Python before anything is traced.

A call becomes `Prepared(args, sources, static)`: `args` is a dict of tensors (the compiled
function's only argument, with batch and time left unknown in its signature), `sources` the
chunk sources to register for the call (`sources.live`), and `static` what keys the compiled
function besides the argument specs (the loss function, the sources' specs).
"""

from typing import NamedTuple, Optional

import tensorflow as tf

from tbptt._src import checks
from tbptt._src import chunking
from tbptt._src import compat
from tbptt._src import losses
from tbptt._src import sources as sources_lib
from tbptt._src.config import ChainConfig
from tbptt._src.stack import CellStack


class Prepared(NamedTuple):
    args: dict
    sources: dict
    static: tuple


def relaxed_spec(spec: tf.TensorSpec) -> tf.TensorSpec:
    """Batch and time unknown: one trace serves sources of any batch size and length."""
    return tf.TensorSpec([None, None] + spec.shape[2:].as_list(), spec.dtype)


def source_spec(source, dtype: tf.DType, sequence: bool = True) -> tf.TensorSpec:
    """What a chunk source stands for: a spec of its whole shape, in the chain's dtype where an
    in-memory array would be cast to it (floats; for the inputs, integers too)."""
    if sequence and len(source.shape) != 3:
        raise ValueError(checks.INPUTS_RANK_MSG.format(shape=list(source.shape)))
    if not (source.dtype.is_floating or source.dtype.is_integer or source.dtype == tf.bool):
        raise TypeError(f"{source.name}: a chunk source must hold numbers, got dtype "
                        f"{source.dtype.name}.")
    cast = source.dtype.is_floating or (sequence and source.dtype.is_integer)
    return tf.TensorSpec(source.shape, dtype if cast else source.dtype)


def batch_size(inputs):
    """The static batch size, or a scalar tensor where it is unknown (inside a tf.function)."""
    return inputs.shape[0] if inputs.shape[0] is not None else tf.shape(inputs)[0]


def chunk_size_for(config: ChainConfig, stack: CellStack, shape: tf.TensorShape) -> tf.Tensor:
    """The chunk size for inputs of `shape`, as a tensor: any T is served by one trace."""
    if config.chunk_size != "auto":
        return tf.constant(config.chunk_size, tf.int32)
    if shape[1] is None:
        raise ValueError(f"chunk_size='auto' picks the chunk size from the sequence length, "
                         f"which is unknown here (inputs of shape {shape.as_list()} inside a "
                         "tf.function). Give the inputs a static time dimension or pass an "
                         "int chunk_size.")
    return tf.constant(plan_for(config, stack, shape[1], shape[0] or 1, shape[-1]).chunk_size,
                       tf.int32)


def plan_for(config: ChainConfig, stack: CellStack, steps: int, batch: int,
             features: Optional[int] = None) -> chunking.ChunkPlan:
    """`chunking.plan` for this chain's configuration and state size."""
    features = stack.features if features is None else features
    return chunking.plan(steps, chunk_size=config.chunk_size, levels=config.levels,
                         memory_budget=config.memory_budget, batch=batch,
                         state_floats=stack.state_floats, features=int(features or 0),
                         itemsize=stack.dtype.size)


def flag_args(inputs, reset, mask) -> dict:
    """reset and mask checked against inputs' [B, T], as bool tensors (absent when None)."""
    return {name: checks.step_flags(name, value, inputs)
            for name, value in [("reset", reset), ("mask", mask)] if value is not None}


def forward_call(config: ChainConfig, stack: CellStack, inputs, initial_state, reset,
                 mask) -> Prepared:
    """`chain(inputs, ...)`: in-memory inputs run as one chunk; a source chunk by chunk."""
    mask = compat.keras_mask(inputs) if mask is None else mask
    source = sources_lib.as_source("inputs", inputs)
    if source is not None:
        _sources_outside_xla()
    if source is None:
        inputs = checks.sequence_inputs(inputs, stack.dtype)
        args = {"inputs": inputs}
        static = None
    else:
        inputs = source_spec(source, stack.dtype)
        args = {"chunk_size": chunk_size_for(config, stack, inputs.shape),
                "steps": tf.constant(inputs.shape[1], tf.int32)}
        static = relaxed_spec(inputs)
    args.update(flag_args(inputs, reset, mask))
    args["state"] = stack.leaves("initial_state", initial_state, batch_size(inputs))
    stack.build(inputs.shape, config.chunk_size)  # last: a refused call leaves the chain unbuilt
    return Prepared(args, {} if source is None else {"inputs": source}, (static,))


def gradient_call(config: ChainConfig, stack: CellStack, inputs, targets, loss_fn, *,
                  initial_state=None, final_state_grad=None, sample_weight=None, reset=None,
                  mask=None, context_steps=None, state_name: str = "initial_state") -> Prepared:
    """`value_and_gradients` and `stream_step`: every argument checked, sources split off."""
    mask = compat.keras_mask(inputs) if mask is None else mask
    loss_fn = checks.loss_function(
        loss_fn, with_weight=sample_weight is not None or mask is not None)
    args, sources = _per_step_args(stack, inputs, targets, sample_weight)
    _check_whole_counts(losses.reduction_of(config.reduction, loss_fn), sources)
    if sources:
        _sources_outside_xla()
    if config.check_numerics:
        checks.outside_xla("check_numerics=True", "its assertions would be left out. Check "
                           "numerics in a call outside jit_compile.")
    args.update(flag_args(args["inputs"], reset, mask))
    batch = batch_size(args["inputs"])
    args["chunk_size"] = chunk_size_for(config, stack, args["inputs"].shape)
    args["state"] = stack.leaves(state_name, initial_state, batch)
    if final_state_grad is not None:
        if not config.schedule.accepts_final_state_grad:
            raise ValueError("final_state_grad would be dropped at the first cut with "
                             "mode='truncated', backprop_chunks=1. Use backprop_chunks >= 2 to "
                             "carry it back, mode='exact', or pass None.")
        args["final_state_grad"] = stack.leaves("final_state_grad", final_state_grad, batch)
    if context_steps is not None:
        args["context_steps"] = tf.convert_to_tensor(context_steps, tf.int32)
    # Sources stay out of the compiled function's tensors: it is traced for their specs and
    # reads the source whose handle it is given, so a new file costs no trace.
    inputs_shape = args["inputs"].shape
    source_specs = tuple((name, relaxed_spec(args.pop(name))) for name in sorted(sources))
    if sources:
        args["steps"] = tf.constant(sources["inputs"].shape[1], tf.int32)
    stack.build(inputs_shape, config.chunk_size)  # last: a refused call leaves the chain unbuilt
    return Prepared(args, sources, (loss_fn, source_specs))


def _check_whole_counts(reduction: losses.Reduction, sources: dict) -> None:
    """A mean over kept labels or over sample weights needs the whole sequence's count before
    the first chunk's gradient: the values it counts must be in memory."""
    needs = {"kept": "targets", "weights": "sample_weight"}.get(reduction.share)
    if needs in sources:
        raise ValueError(
            f"loss_fn averages over the {'kept labels' if needs == 'targets' else 'sample weights'}"
            f" of the whole sequence, which the chain counts before the first chunk: pass "
            f"{needs} in memory (not as a chunk source), or give the loss reduction='sum' and "
            "divide by the count yourself.")


def _sources_outside_xla() -> None:
    checks.outside_xla("a chunk source", "it is read by tf.numpy_function, which XLA cannot "
                       "compile. Pass in-memory tensors, or call the chain outside jit_compile.")


def _per_step_args(stack: CellStack, inputs, targets, sample_weight) -> tuple[dict, dict]:
    """inputs, targets and sample_weight checked: tensors, or the specs of chunk sources."""
    if targets is None:
        raise ValueError("targets must be given: [batch, time, ...] values that loss_fn "
                         "compares with the predictions.")
    sources = {name: source for name, source in [
        ("inputs", sources_lib.as_source("inputs", inputs)),
        ("targets", sources_lib.as_source("targets", targets)),
        ("sample_weight", sources_lib.as_source("sample_weight", sample_weight))]
        if source is not None}
    inputs = source_spec(sources["inputs"], stack.dtype) if "inputs" in sources else (
        checks.sequence_inputs(inputs, stack.dtype))
    args = {"inputs": inputs}
    for name, value in [("targets", targets), ("sample_weight", sample_weight)]:
        if value is not None:
            value = source_spec(sources[name], stack.dtype, False) if name in sources else value
            args[name] = checks.per_step(name, value, inputs, stack.dtype)
    return args, sources


def steps_of(call: Prepared):
    """T of a prepared call: static, or None inside a tf.function with an unknown length."""
    if "steps" in call.args:
        return int(call.args["steps"])
    return call.args["inputs"].shape[1]

"""One call of a recurrent chain, checked and laid out in Python before anything is traced.

A call becomes `Prepared(call, sources, static)`, three typed values:

```
Call(batch: Batch(inputs, targets, sample_weight, reset, mask),   the per-step values
     state, chunk_size, final_state_grad, context_steps, steps)   the rest of the argument
sources: {name: ChunkSource}                                        registered for the call
Static(loss_fn, source_specs, training, record, xla)               what keys a trace
```

A `Call` crosses into the compiled function as the flat dict of its present tensors
(`Call.tensors`, with batch and time left unknown in the signature) and is rebuilt there
(`Call.from_tensors`); a chunk source is then a `SourceReader` in its place in the batch.
"""

from typing import Any, NamedTuple

import keras
import tensorflow as tf

from tbptt._src.core import checks, chunking, compat, schedules
from tbptt._src.core import sources as sources_lib
from tbptt._src.recurrent import losses, parts
from tbptt._src.recurrent.config import ChainConfig
from tbptt._src.recurrent.loops import timeloop
from tbptt._src.recurrent.stack import CellStack

PER_STEP = ("inputs", "targets", "sample_weight", "reset", "mask")


class Batch(NamedTuple):
    """One call's per-step values ``[B, T, ...]`` (flags ``[B, T]`` bool), None where not
    given. Before tracing, a chunk source's entry is its `tf.TensorSpec`."""

    inputs: Any
    targets: Any = None
    sample_weight: Any = None
    reset: tf.Tensor | None = None
    mask: tf.Tensor | None = None

    def given(self) -> dict:
        """name -> value of the fields given."""
        return {name: value for name, value in zip(self._fields, self) if value is not None}


class Call(NamedTuple):
    """What one call computes on.

    Attributes:
      batch: the per-step values.
      state: the flat state entering the first step, in the state dtype.
      chunk_size: steps per chunk, a scalar tensor (one trace serves every chunk size).
      final_state_grad: flat dLoss/d(final state) from outside, or None.
      context_steps: streaming: the leading steps (the carried context) that add no loss.
      steps: T of a chunk source (None: the inputs' own).
    """

    batch: Batch
    state: list
    chunk_size: tf.Tensor | None = None
    final_state_grad: list | None = None
    context_steps: tf.Tensor | None = None
    steps: tf.Tensor | None = None

    def tensors(self) -> dict:
        """The compiled function's argument: name -> tensor (or list), present fields only."""
        fields = {k: v for k, v in self._asdict().items() if k != "batch"}
        flat = {**fields, **self.batch.given()}
        return {name: value for name, value in flat.items() if value is not None}

    @classmethod
    def from_tensors(cls, tensors: dict, readers: dict | None = None) -> "Call":
        """The call rebuilt inside the compiled function; `readers` stand for chunk sources."""
        tensors = {**tensors, **(readers or {})}
        batch = Batch(**{name: tensors.get(name) for name in PER_STEP})
        fields: dict[str, Any] = {name: tensors.get(name) for name in cls._fields[1:]}
        return cls(batch, **fields)

    def static_steps(self) -> int | None:
        """T where it is known in Python (None inside a tf.function with an unknown length)."""
        if self.steps is not None:
            return int(self.steps)
        return self.batch.inputs.shape[1]


class Static(NamedTuple):
    """What keys a compiled function besides its argument's specs."""

    loss_fn: Any = None
    source_specs: tuple = ()  # ((name, relaxed spec), ...) of the chunk sources
    training: bool = True
    record: bool = False  # diagnostics: the carried cotangents' norms
    xla: bool = (
        True  # the stock cells' loops compiled with XLA on their own (`timeloop.LoopSettings`)
    )


class Prepared(NamedTuple):
    call: Call
    sources: dict
    static: Static

    @property
    def short(self) -> bool:
        """A few steps in memory (an online step): traced for their length, loops unrolled."""
        if self.sources:
            return False
        steps = self.call.batch.inputs.shape[1]
        return steps is not None and steps <= timeloop.SHORT_STEPS


def relaxed_spec(spec: tf.TensorSpec) -> tf.TensorSpec:
    """Batch and time unknown: one trace serves sources of any batch size and length."""
    return tf.TensorSpec([None, None] + spec.shape[2:].as_list(), spec.dtype)


def source_spec(source, dtype: tf.DType, sequence: bool = True) -> tf.TensorSpec:
    """What a chunk source stands for: a spec of its whole shape, in the chain's dtype where an
    in-memory array would be cast to it (floats; for the inputs, integers too)."""
    if sequence and len(source.shape) != 3:
        raise ValueError(checks.INPUTS_RANK_MSG.format(shape=list(source.shape)))
    if not (source.dtype.is_floating or source.dtype.is_integer or source.dtype == tf.bool):
        raise TypeError(
            f"{source.name}: a chunk source must hold numbers, got dtype {source.dtype.name}."
        )
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
        raise ValueError(
            f"chunk_size='auto' picks the chunk size from the sequence length, "
            f"which is unknown here (inputs of shape {shape.as_list()} inside a "
            "tf.function). Give the inputs a static time dimension or pass an "
            "int chunk_size."
        )
    return tf.constant(
        plan_for(config, stack, shape[1], shape[0] or 1, shape[-1]).chunk_size, tf.int32
    )


def plan_for(
    config: ChainConfig, stack: CellStack, steps: int, batch: int, features: int | None = None
) -> chunking.ChunkPlan:
    """`chunking.plan` for this chain's configuration and state size."""
    return chunking.plan(
        steps,
        chunk_size=config.chunk_size,
        levels=config.levels,
        memory_budget=config.memory_budget,
        batch=batch,
        state_floats=stack.state_floats,
        step_floats=step_floats(stack, features),
        itemsize=stack.dtype.size,
        keeps_runs=keeps_runs(config),
    )


def step_floats(stack: CellStack, features: int | None = None) -> int:
    """A of `chunking`: the floats one time step keeps for its backward, per row (for inputs
    of `features`; None: the built chain's F)."""
    features = stack.features if features is None else features
    return (
        int(features or 0)
        + chunking.FLOATS_PER_STATE_VALUE_AND_STEP * stack.state_floats
        + chunking.FLOATS_PER_OUTPUT_VALUE_AND_STEP * parts.output_floats(stack.cells, stack.head)
    )


def keeps_runs(config: ChainConfig, record: bool = False) -> bool:
    """Whether the exact backward may keep several chunks as one run (a chunk that many times
    longer, see `chunking`): the exact one-level schedule, with a budget, and no per-chunk
    record (check_numerics names the chunk, diagnostics read every cut)."""
    schedule = config.schedule
    return (
        isinstance(schedule, schedules.Exact)
        and not schedule.grouped
        and config.memory_budget is not None
        and not (config.check_numerics or record)
    )


def inputs_mask(stack: CellStack, inputs):
    """The mask Keras would give the cells: one attached to `inputs` (a Keras mask), else the
    one the inputs layer computes from them (`Embedding(mask_zero=True)`, `Masking`; of a
    Sequential, its first layer's, if every later layer passes it on), else None. Never read
    from a chunk source."""
    attached = compat.keras_mask(inputs)
    layer = stack.inputs_layer
    if attached is not None or layer is None or sources_lib.as_source("inputs", inputs):
        return attached
    layers = _opened(layer)
    if not compat.is_keras_layer(layers[0]):
        return None
    mask = layers[0].compute_mask(tf.convert_to_tensor(inputs), None)
    # Keras drops a mask at a layer that does not support masking.
    if mask is not None and not all(getattr(x, "supports_masking", False) for x in layers[1:]):
        return None
    return mask


def _opened(layer) -> list:
    """A layer, or the layers of a Sequential (nested ones opened), in order."""
    if isinstance(layer, keras.Sequential):
        return [inner for sub in layer.layers for inner in _opened(sub)] or [layer]
    return [layer]


def _flag(name: str, value, inputs) -> tf.Tensor | None:
    """reset or mask checked against inputs' [B, T], as a bool tensor (None when None)."""
    return None if value is None else checks.step_flags(name, value, inputs)


def forward_call(
    config: ChainConfig, stack: CellStack, inputs, initial_state, reset, mask, training: bool
) -> Prepared:
    """`chain(inputs, ...)`: in-memory inputs run as one chunk; a source chunk by chunk."""
    mask = inputs_mask(stack, inputs) if mask is None else mask
    source = sources_lib.as_source("inputs", inputs)
    if source is not None:
        _sources_outside_xla()
        inputs = source_spec(source, stack.dtype)
    else:
        inputs = checks.sequence_inputs(inputs, stack.dtype, stack.inputs_layer is not None)
    batch = Batch(inputs, reset=_flag("reset", reset, inputs), mask=_flag("mask", mask, inputs))
    call = Call(batch, stack.leaves("initial_state", initial_state, batch_size(inputs)))
    specs: tuple = ()
    if source is not None:
        call = call._replace(
            batch=batch._replace(inputs=None),
            chunk_size=chunk_size_for(config, stack, inputs.shape),
            steps=tf.constant(inputs.shape[1], tf.int32),
        )
        specs = (("inputs", relaxed_spec(inputs)),)
    # Last: a refused call leaves the chain unbuilt.
    stack.build(inputs.shape, config.chunk_size, inputs.dtype)
    return Prepared(
        call,
        {} if source is None else {"inputs": source},
        Static(source_specs=specs, training=training, xla=_xla(config)),
    )


def gradient_call(
    config: ChainConfig,
    stack: CellStack,
    inputs,
    targets,
    loss_fn,
    *,
    initial_state=None,
    final_state_grad=None,
    sample_weight=None,
    reset=None,
    mask=None,
    context_steps=None,
    state_name: str = "initial_state",
    record: bool = False,
) -> Prepared:
    """`value_and_gradients` and `stream_step`: every argument checked, sources split off."""
    mask = inputs_mask(stack, inputs) if mask is None else mask
    loss_fn = checks.loss_function(
        loss_fn, with_weight=sample_weight is not None or mask is not None
    )
    batch, sources = _per_step(stack, inputs, targets, sample_weight)
    _check_context(config, losses.reduction_of(config.reduction, loss_fn), sources)
    batch = batch._replace(
        reset=_flag("reset", reset, batch.inputs), mask=_flag("mask", mask, batch.inputs)
    )
    rows = batch_size(batch.inputs)
    call = Call(
        batch,
        stack.leaves(state_name, initial_state, rows),
        chunk_size_for(config, stack, batch.inputs.shape),
        _final_state_grad(config, stack, final_state_grad, rows),
        None if context_steps is None else tf.convert_to_tensor(context_steps, tf.int32),
    )
    call, specs = _sources_apart(call, sources)
    # Last: a refused call leaves the chain unbuilt.
    stack.build(batch.inputs.shape, config.chunk_size, batch.inputs.dtype)
    if config.schedule.recomputes:
        stack.check_replayable()
    return Prepared(
        call, sources, Static(loss_fn, specs, training=True, record=record, xla=_xla(config))
    )


def _check_context(config: ChainConfig, reduction: losses.Reduction, sources: dict) -> None:
    """What this call needs of where it runs: chunk sources and check_numerics outside XLA,
    in-memory counts for a mean over kept labels or sample weights."""
    _check_whole_counts(reduction, sources)
    if sources:
        _sources_outside_xla()
    if config.check_numerics:
        checks.outside_xla(
            "check_numerics=True",
            "its assertions would be left out. Check numerics in a call outside jit_compile.",
        )


def _sources_apart(call: Call, sources: dict) -> tuple:
    """``(the call, the sources' specs)``. Sources stay out of the compiled function's
    tensors: it is traced for their specs and reads the source whose handle it is given, so a
    new file costs no trace."""
    batch = call.batch
    specs = tuple((name, relaxed_spec(getattr(batch, name))) for name in sorted(sources))
    if sources:
        call = call._replace(
            batch=batch._replace(**{name: None for name in sources}),
            steps=tf.constant(sources["inputs"].shape[1], tf.int32),
        )
    return call, specs


def _xla(config: ChainConfig) -> bool:
    """Whether this call's stock-cell loops are compiled with XLA on their own: the config's
    `xla` (None: unless TBPTT_XLA=0 now), never inside a function XLA compiles as a whole (a
    trace made for one context is wrong in the other, so this keys the trace)."""
    return config.compiled_loops() and not compat.in_xla_context()


def _final_state_grad(config: ChainConfig, stack: CellStack, final_state_grad, rows):
    if final_state_grad is None:
        return None
    if not config.schedule.accepts_final_state_grad:
        raise ValueError(
            "final_state_grad would be dropped at the first cut with "
            "mode='truncated', backprop_chunks=1. Use backprop_chunks >= 2 to "
            "carry it back, mode='exact', or pass None."
        )
    return stack.leaves("final_state_grad", final_state_grad, rows)


def _check_whole_counts(reduction: losses.Reduction, sources: dict) -> None:
    """A mean over kept labels or over sample weights needs the whole sequence's count before
    the first chunk's gradient: the values it counts must be in memory."""
    needs = {"kept": "targets", "weights": "sample_weight"}.get(reduction.share or "")
    if needs in sources:
        raise ValueError(
            f"loss_fn averages over the {'kept labels' if needs == 'targets' else 'sample weights'}"
            f" of the whole sequence, which the chain counts before the first chunk: pass "
            f"{needs} in memory (not as a chunk source), or give the loss reduction='sum' and "
            "divide by the count yourself."
        )


def _sources_outside_xla() -> None:
    checks.outside_xla(
        "a chunk source",
        "it is read by tf.numpy_function, which XLA cannot "
        "compile. Pass in-memory tensors, or call the chain outside jit_compile.",
    )


def _per_step(stack: CellStack, inputs, targets, sample_weight) -> tuple[Batch, dict]:
    """inputs, targets and sample_weight checked: tensors, or the specs of chunk sources."""
    if targets is None:
        raise ValueError(
            "targets must be given: [batch, time, ...] values that loss_fn "
            "compares with the predictions."
        )
    sources = {
        name: source
        for name, source in [
            ("inputs", sources_lib.as_source("inputs", inputs)),
            ("targets", sources_lib.as_source("targets", targets)),
            ("sample_weight", sources_lib.as_source("sample_weight", sample_weight)),
        ]
        if source is not None
    }
    inputs = (
        source_spec(sources["inputs"], stack.dtype)
        if "inputs" in sources
        else (checks.sequence_inputs(inputs, stack.dtype, stack.inputs_layer is not None))
    )
    checked = {}
    for name, value in [("targets", targets), ("sample_weight", sample_weight)]:
        if value is not None:
            value = source_spec(sources[name], stack.dtype, False) if name in sources else value
            checked[name] = checks.per_step(name, value, inputs, stack.dtype)
    return Batch(inputs, **checked), sources

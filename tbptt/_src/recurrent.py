"""RecurrentChain and StatefulGRUChain: stacked RNN cells run over time chunks.

The time axis `[B, T, F]` is cut into chunks of `chunk_size` steps (the last one shorter when T
does not divide). Each chunk is a segment of the chain in `chain.py`; the carried value is the
flat list of state tensors of all layers.
"""

import math
from typing import Optional, Sequence, Union

import tensorflow as tf

from tbptt._src import chain as chain_lib
from tbptt._src import checks
from tbptt._src import chunking
from tbptt._src import compat
from tbptt._src import compiling
from tbptt._src import layers
from tbptt._src import sources as sources_lib
from tbptt._src import vjp as vjp_lib
from tbptt._src.types import ChainResult, LossFn, State

keras = compat.keras


def unroll(step, inputs: tf.Tensor, state: list, *, with_outputs: bool = True):
    """Runs `step(x_t, state) -> (y_t, state)` over the time axis of `inputs`.

    Args:
      step: one time step over a flat list of state tensors.
      inputs: ``[B, T, F]``.
      state: flat list of ``[B, ...]`` tensors.
      with_outputs: whether to stack the outputs; a forward that only needs the final state
        skips writing them.

    Returns:
      ``(outputs [B, T, U] or None, final state)``.

    Example, a counter core with a closed form:

    >>> import tensorflow as tf
    >>> outputs, (count,) = unroll(lambda x, s: (x + s[0], [s[0] + 1]), tf.ones([1, 4, 1]),
    ...                            [tf.zeros([1, 1])])
    >>> outputs[0, :, 0].numpy().tolist(), float(count[0, 0])
    ([1.0, 2.0, 3.0, 4.0], 4.0)
    """
    outputs, state = layers.unroll_time_major(step, layers.time_major(inputs), list(state),
                                              with_outputs=with_outputs)
    return (layers.time_major(outputs) if with_outputs else None), state


def _leaf_shapes(state_size) -> list:
    """Per-tensor shapes (without batch) of one cell's state_size."""
    if checks.is_int(state_size) or isinstance(state_size, tf.TensorShape):
        return [tuple(tf.TensorShape(state_size).as_list())]
    return [shape for size in state_size for shape in _leaf_shapes(size)]


def _is_single_tensor(state_size) -> bool:
    return checks.is_int(state_size) or isinstance(state_size, tf.TensorShape)


class RecurrentChain(tf.Module):
    """Stacked RNN cells and a head, trained over time chunks with carried state and gradient.

    ```
    outputs, final_state = chain(inputs, initial_state)          # plain forward, differentiable
    result = chain.value_and_gradients(inputs, targets, loss_fn)   # chunked: memory of one chunk
    opt.apply_gradients(zip(result.grads, chain.trainable_variables))
    ```

    The state is a tuple with one entry per layer: a tensor ``[B, units]``, or a tuple for cells
    with several state tensors (LSTM: ``(h, c)``).

    Example:

    >>> import keras, numpy as np, tbptt
    >>> chain = tbptt.RecurrentChain([keras.layers.LSTMCell(4)], chunk_size=3)
    >>> x = np.ones([2, 7, 5], "float32")
    >>> outputs, state = chain(x)
    >>> outputs.shape, [tuple(s.shape) for s in state[0]]
    (TensorShape([2, 7, 4]), [(2, 4), (2, 4)])
    >>> result = chain.value_and_gradients(x, np.zeros([2, 7, 4]), keras.losses.MeanSquaredError())
    >>> len(result.grads) == len(chain.trainable_variables)
    True
    """

    def __init__(self, cells: Sequence, *, chunk_size: Union[int, str], head=None,
                 mode: str = "exact", backprop_chunks: int = 1, backend: str = "eager",
                 reduction: str = "sum", dtype=None, compiled: bool = True, levels: int = 1,
                 memory_budget: Optional[float] = None, check_numerics: bool = False,
                 name: Optional[str] = None):
        """Creates the chain.

        Args:
          cells: Keras-style RNN cells, bottom layer first (GRUCell, LSTMCell, custom cells
            with `state_size` and `call(inputs, states) -> (output, new_states)`). Stock Keras
            `GRUCell`s and `LSTMCell`s run with their input projection hoisted out of the time
            loop and a hand-written backward for the loop (the same function, faster).
          chunk_size: time steps per chunk (the backward keeps one chunk's activations alive
            plus one state per chunk), or "auto": about sqrt(T) per call (T^(1/3) with
            levels=2), or the largest chunk within `memory_budget` (see `chunk_plan`).
          head: Keras layer or callable mapping the top layer's ``[B, T, U]`` outputs to
            predictions; None uses the top layer's outputs.
          mode: "exact" (full-BPTT gradient) or "truncated" (see `backprop_chunks`).
          backprop_chunks: with mode="truncated", how many chunks a loss term back-propagates
            through: 1 is Keras `stateful=True`, m is TBPTT(k1=chunk_size, k2=m*chunk_size).
          backend: "eager" (`GradientTape`) or "graph" (`tf.gradients` in a graph).
          reduction: "sum" (total = sum of chunk losses) or "mean" (each chunk's loss weighted
            by its share of the T steps: a per-element mean loss gives the whole-sequence mean).
          dtype: dtype of the state and computation; None takes the first cell's.
          compiled: run the chunk loops in a `tf.function` (default); False runs them eagerly
            step by step, for debugging (eager backend only).
          levels: 1 keeps a state at every cut; 2 (exact mode) keeps one every ~sqrt(T/K)
            chunks and recomputes the others group by group in the backward pass: memory of
            about T^(1/3) states for one more forward pass.
          memory_budget: with chunk_size="auto", the bytes the backward may keep alive; the
            largest chunk size that fits is taken (ValueError when none does).
          check_numerics: test every chunk's carried state, loss, carried dLoss/dstate and
            weight gradients for NaN/Inf in `value_and_gradients`, and raise
            `tbptt.NonFiniteError` naming the chunk where one first appeared (inside a
            tf.function: `tf.errors.InvalidArgumentError`). Off by default; on, it costs one
            reduction per tensor per chunk. Off, a non-finite loss is returned as it is.
          name: module name.
        """
        super().__init__(name=name)
        self._mode = checks.choice("mode", mode, checks.MODES)
        self._backend = checks.choice("backend", backend, vjp_lib.BACKENDS)
        self._reduction = checks.choice("reduction", reduction, checks.REDUCTIONS)
        self._chunk_size = checks.chunk_size(chunk_size)
        self._memory_budget = checks.memory_budget(memory_budget, self._chunk_size)
        self._backprop_chunks = checks.positive_int(
            "backprop_chunks", backprop_chunks,
            hint="; it counts the chunks a loss back-propagates through (1 = Keras stateful=True)")
        if mode == "exact" and backprop_chunks != 1:
            raise ValueError(checks.BACKPROP_CHUNKS_EXACT_MSG.format(value=backprop_chunks))
        if levels not in (1, 2) or isinstance(levels, bool):
            raise ValueError(checks.LEVELS_MSG.format(value=levels))
        if levels == 2 and mode != "exact":
            raise ValueError(checks.LEVELS_TRUNCATED_MSG)
        self._levels = levels
        if backend == "graph" and not compiled:
            raise ValueError(checks.COMPILED_GRAPH_MSG)
        self._compiled = bool(compiled)
        if not isinstance(check_numerics, bool):
            raise TypeError(checks.BOOL_MSG.format(name="check_numerics", value=check_numerics))
        self._check_numerics = check_numerics
        self._cells = self._checked_cells(cells)
        self._runners = [layers.runner_for(cell) for cell in self._cells]
        if head is not None and not callable(head):
            raise TypeError(checks.HEAD_MSG.format(value=head))
        self._head = head
        self._dtype = self._resolve_dtype(dtype)
        # Under mixed precision the cells compute in float16/bfloat16, but the state carried
        # across cuts (and dLoss/dstate carried back) stays float32, as Keras keeps variables:
        # a long chain of 16-bit carries would lose the small gradients first.
        self._state_dtype = tf.float32 if self._dtype in (tf.float16, tf.bfloat16) else (
            self._dtype)
        self._state_sizes = [cell.state_size for cell in self._cells]
        self._leaf_shapes = [s for size in self._state_sizes for s in _leaf_shapes(size)]
        self._features = None
        self._functions = compiling.FunctionCache(_unknown_dims)
        self._live_sources = {}

    # -- configuration -------------------------------------------------------------------------

    @property
    def cells(self) -> list:
        return list(self._cells)

    @property
    def head(self):
        return self._head

    @property
    def chunk_size(self) -> Union[int, str]:
        """An int, or "auto" (see `chunk_plan` for what a given length gets)."""
        return self._chunk_size

    @property
    def levels(self) -> int:
        return self._levels

    @property
    def memory_budget(self) -> Optional[float]:
        return self._memory_budget

    def chunk_plan(self, steps: int, batch_size: int = 1,
                   features: Optional[int] = None) -> chunking.ChunkPlan:
        """How a sequence of `steps` time steps is cut, and the memory that is estimated to keep.

        Args:
          steps: T.
          batch_size: B (the estimate scales with it).
          features: F; None takes the built chain's.

        Returns:
          `ChunkPlan(steps, chunk_size, chunks, group, estimated_bytes)`; `group` is the chunks
          per coarse segment with levels=2.

        >>> import tbptt
        >>> chain = tbptt.StatefulGRUChain(64, chunk_size="auto")
        >>> chain.chunk_plan(1_000_000, features=16)[:4]
        (1000000, 1000, 1000, None)
        """
        steps = checks.positive_int("steps", steps)
        features = self._features if features is None else features
        return chunking.plan(
            steps, chunk_size=self._chunk_size, levels=self._levels,
            memory_budget=self._memory_budget, batch=checks.positive_int("batch_size", batch_size),
            state_floats=sum(int(math.prod(shape)) for shape in self._leaf_shapes),
            features=int(features or 0), itemsize=self._dtype.size)

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def check_numerics(self) -> bool:
        return self._check_numerics

    @property
    def backprop_chunks(self) -> int:
        return self._backprop_chunks

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def reduction(self) -> str:
        return self._reduction

    @property
    def dtype(self) -> tf.DType:
        """The dtype the cells compute in."""
        return self._dtype

    @property
    def state_dtype(self) -> tf.DType:
        """The dtype of the carried state and of dLoss/dstate: float32 under mixed precision."""
        return self._state_dtype

    @property
    def built(self) -> bool:
        return self._features is not None

    @property
    def trainable_variables(self) -> list:
        """Cells' variables bottom to top, then the head's; available once built."""
        variables, seen = [], set()
        for layer in list(self._cells) + ([self._head] if self._head is not None else []):
            for v in compat.trainable_variables_of(layer):
                if id(v) not in seen:
                    seen.add(id(v))
                    variables.append(v)
        return variables

    def _checked_cells(self, cells) -> list:
        if isinstance(cells, (str, bytes)) or not isinstance(cells, Sequence) or not cells:
            raise TypeError(checks.CELLS_MSG.format(value=cells))
        for index, cell in enumerate(cells):
            if not hasattr(cell, "state_size") or not callable(cell):
                raise TypeError(checks.CELL_MSG.format(index=index, value=cell))
            for inner in [cell] + list(getattr(cell, "cells", [])):
                dropout = getattr(inner, "dropout", 0) or 0
                recurrent = getattr(inner, "recurrent_dropout", 0) or 0
                if dropout > 0 or recurrent > 0:
                    raise ValueError(checks.DROPOUT_MSG.format(
                        index=index, cell=type(inner).__name__, dropout=dropout,
                        recurrent=recurrent))
        return list(cells)

    def _resolve_dtype(self, dtype) -> tf.DType:
        if dtype is None:
            dtype = compat.compute_dtype(self._cells[0]) or keras.backend.floatx()
        dtype = tf.as_dtype(dtype)
        for what, layer in [(f"cells[{i}]", c) for i, c in enumerate(self._cells)] + [
                ("head", self._head)]:
            if not compat.is_keras_layer(layer) or compat.compute_dtype(layer) == dtype or (
                    compat.is_mixed_precision(layer)):
                continue
            if layer.built:
                raise ValueError(checks.DTYPE_BUILT_MSG.format(
                    what=what, got=compat.compute_dtype(layer).name, expected=dtype.name))
            compat.set_compute_dtype(layer, dtype)
        return dtype

    # -- state ---------------------------------------------------------------------------------

    def initial_state(self, batch_size: int) -> State:
        """Zero state: a tuple with one entry per layer (a tensor, or a tuple of tensors)."""
        batch_size = checks.positive_int("batch_size", batch_size)
        return self._pack([tf.zeros((batch_size,) + shape, self._state_dtype)
                           for shape in self._leaf_shapes])

    def _pack(self, leaves: list) -> State:
        layers, start = [], 0
        for size in self._state_sizes:
            count = len(_leaf_shapes(size))
            part = leaves[start:start + count]
            layers.append(part[0] if _is_single_tensor(size) else tuple(part))
            start += count
        return tuple(layers)

    def _state_leaves(self, name: str, state, batch) -> list:
        if state is None:
            return [tf.zeros([batch, *shape], self._state_dtype) for shape in self._leaf_shapes]
        static_batch = batch if isinstance(batch, int) else None
        leaves = checks.state_leaves(name, state, self._leaf_shapes, static_batch)
        return [tf.cast(leaf, self._state_dtype) for leaf in leaves]

    # -- building ------------------------------------------------------------------------------

    def build(self, input_shape) -> None:
        """Creates the variables for inputs of shape ``[B, T, F]`` (only F matters)."""
        features = tf.TensorShape(input_shape)[-1]
        if self._features is not None:
            if features != self._features:
                raise ValueError(checks.FEATURES_MSG.format(expected=self._features,
                                                            shape=list(input_shape)))
            return
        with tf.init_scope():  # Variables are made eagerly, even from inside a tf.function.
            x = tf.zeros([1, 1, features], self._dtype)
            state = [tf.zeros((1,) + shape, self._dtype) for shape in self._leaf_shapes]
            top, _ = self._step(x[:, 0], state, training=False)
            self._apply_head(top[:, None], training=False)
        self._features = features

    # -- one time step -------------------------------------------------------------------------

    def _step(self, x: tf.Tensor, leaves: list, *, training: bool):
        """One time step of all layers: ``x [B, F]`` -> ``(top output [B, U], new leaves)``."""
        new_leaves = []
        for cell, states in zip(self._cells, self._per_layer(leaves)):
            x, new_states = compat.call_layer(cell, x, states, training=training)
            new_leaves.extend(tf.nest.flatten(new_states))
        return x, new_leaves

    def _per_layer(self, leaves: list) -> list:
        """The flat state as one list of tensors per layer."""
        return [list(s) if isinstance(s, tuple) else [s] for s in self._pack(list(leaves))]

    def _apply_head(self, top: tf.Tensor, *, training: bool) -> tf.Tensor:
        if self._head is None:
            return top
        return compat.call_layer(self._head, top, training=training)

    # -- forward -------------------------------------------------------------------------------

    # The chunk and time loops are explicit tf.while_loops: AutoGraph has nothing to convert, and
    # converting the Keras calls inside would only get in the way inside a user's tf.function.
    @tf.autograph.experimental.do_not_convert
    def __call__(self, inputs, initial_state: State = None, *, training: bool = False,
                 reset=None, mask=None) -> tuple:
        """Plain forward pass over the whole sequence, differentiable by an outer tape.

        Args:
          inputs: ``[B, T, F]``, or a chunk source (`ChunkSource`, a memmap, an h5py/zarr
            array): it is then read one chunk at a time; the outputs are still whole.
          initial_state: a state nest (see `initial_state`); None for zeros.
          training: passed to Keras cells and head.
          reset: ``[B, T]`` bool: row b starts from a zero state at step t (packed episodes).
          mask: ``[B, T]`` bool: False steps keep the state (padding); None takes a Keras mask
            attached to `inputs`, if any.

        Returns:
          ``(outputs [B, T, O], final_state)``: the head's predictions and the last state.
        """
        source = sources_lib.as_source("inputs", inputs)
        mask = _keras_mask(inputs) if mask is None else mask
        if source is not None:
            return self._call_source(source, initial_state, training, reset, mask)
        inputs = checks.sequence_inputs(inputs, self._dtype)
        self.build(inputs.shape)
        args = {"inputs": inputs, **self._flag_args(inputs, reset, mask),
                "state": self._state_leaves("initial_state", initial_state, _batch_size(inputs))}
        fn = self._functions.get("call", self._forward_impl, training, self._compiled)
        outputs, leaves = fn(args)
        return outputs, self._pack(list(leaves))

    def _flag_args(self, inputs, reset, mask) -> dict:
        """reset and mask checked against inputs' [B, T], as bool tensors (absent when None)."""
        return {name: checks.step_flags(name, value, inputs)
                for name, value in [("reset", reset), ("mask", mask)] if value is not None}

    def _forward_impl(self, args: dict, training: bool):
        flags = _chunk_flags(args, lambda value: value)
        top, leaves = self._run_chunk(args["inputs"], args["state"], training=training,
                                      flags=flags)
        return self._apply_head(layers.time_major(top), training=training), leaves

    def _call_source(self, source, initial_state, training: bool, reset, mask):
        spec = self._source_spec(source)
        self.build(spec.shape)
        args = {"state": self._state_leaves("initial_state", initial_state, spec.shape[0]),
                **self._flag_args(spec, reset, mask),
                "chunk_size": self._chunk_size_for(spec.shape),
                "steps": tf.constant(spec.shape[1], tf.int32)}
        fn = self._functions.get("call_source", self._forward_source_impl,
                                 (training, _relaxed_spec(spec)), self._compiled)
        self._live_sources = {"inputs": source}
        try:
            outputs, leaves = fn(args)
        finally:
            self._live_sources = {}
        return outputs, self._pack(list(leaves))

    def _forward_source_impl(self, args: dict, static):
        """The forward over chunks read from the live source, outputs gathered time-major."""
        training, spec = static
        reader = _SourceReader(lambda: self._live_sources["inputs"], spec)
        steps, size = args["steps"], args["chunk_size"]

        def body(k, leaves, outputs):
            start, stop = k * size, tf.minimum((k + 1) * size, steps)
            flags = _chunk_flags(args, lambda value: value[:, start:stop])
            top, leaves = self._run_chunk(reader.read(start, stop), leaves, training=training,
                                          flags=flags)
            predictions = self._apply_head(layers.time_major(top), training=training)
            return k + 1, leaves, outputs.write(k, layers.time_major(predictions))

        outputs = tf.TensorArray(self._dtype, size=(steps + size - 1) // size, infer_shape=False,
                                 element_shape=tf.TensorShape([None, None, None]))
        _, leaves, outputs = tf.while_loop(lambda k, *_: k * size < steps, body,
                                           (tf.constant(0), list(args["state"]), outputs))
        return layers.time_major(outputs.concat()), leaves

    def _run_chunk(self, inputs: tf.Tensor, leaves: list, *, training: bool,
                   with_outputs: bool = True, flags: Optional[layers.StepFlags] = None):
        """All layers over ``inputs [B, K, F]``: (top outputs ``[K, B, U]`` or None, leaves).

        The leaves enter and leave in the state dtype; inside, they are in the compute dtype.
        """
        leaves = [tf.cast(leaf, self._dtype) for leaf in leaves]
        top, per_layer = layers.run_layers(self._runners, self._per_layer(leaves), inputs,
                                           training=training, with_outputs=with_outputs,
                                           flags=flags)
        return top, [tf.cast(leaf, self._state_dtype) for layer in per_layer for leaf in layer]

    # -- chunked value and gradients -----------------------------------------------------------

    @tf.autograph.experimental.do_not_convert
    def value_and_gradients(self, inputs, targets, loss_fn: LossFn, initial_state: State = None,
                            final_state_grad: State = None, sample_weight=None, *,
                            reset=None, mask=None) -> ChainResult:
        """Loss and gradients over the whole sequence, computed one chunk at a time.

        ```
        forward:  s_k = chunk_k(s_{k-1})                               (keep only the s_k)
        backward: for k = n .. 1:  (dW_k, g_{k-1}) = VJP of (L_k, s_k) at s_{k-1} with (1, g_k)
        grads = sum_k dW_k;  initial_state_grad = g_0;  g_n = final_state_grad (or 0)
        ```

        Args:
          inputs: ``[B, T, F]``; T need not divide by `chunk_size`.
          targets: ``[B, T, ...]``, sliced along time like the inputs.
          loss_fn: ``loss_fn(y_true [B, t, ...], y_pred [B, t, O][, sample_weight]) -> scalar``,
            e.g. a Keras loss.
          initial_state: state nest entering the first step; None for zeros.
          final_state_grad: dLoss/d(final state) from outside (the next batch's
            `initial_state_grad`), same structure as the state; None for zero. In truncated
            mode it counts as having crossed one cut already: it is carried back through
            `backprop_chunks - 1` more chunks (refused with `backprop_chunks=1`).
          sample_weight: ``[B, T]`` or ``[B, T, ...]``, passed to `loss_fn` per chunk.
          reset: ``[B, T]`` bool: row b starts from a zero state at step t, so episodes can be
            packed end to end; no gradient crosses a reset.
          mask: ``[B, T]`` bool, False on padding: those steps keep the state and add no loss
            (they get sample weight 0; with reduction="mean" the loss is the mean over the
            unmasked steps). None takes a Keras mask attached to `inputs`, if any.

        Returns:
          `ChainResult(loss, grads, final_state, initial_state_grad)`.

        Raises:
          ValueError, TypeError: on inputs of the wrong rank, dtype or shape, before tracing.
          tbptt.NonFiniteError: with check_numerics=True, a NaN or Inf (see `__init__`).
        """
        return self._chunked_gradients(
            inputs, targets, loss_fn, initial_state=initial_state,
            final_state_grad=final_state_grad, sample_weight=sample_weight, reset=reset,
            mask=mask)[0]

    def _chunked_gradients(self, inputs, targets, loss_fn: LossFn, *, initial_state=None,
                           final_state_grad=None, sample_weight=None, reset=None, mask=None,
                           reduction: Optional[str] = None, context_steps=None,
                           record_state_grads: bool = False):
        """`value_and_gradients`, and what streaming across batches needs.

        Args:
          reduction: overrides the chain's reduction (the Keras wrapper follows its loss).
          context_steps: the first `context_steps` steps (a multiple of chunk_size) are the
            previous batch's last chunks, re-run so that gradients reach back into them: they
            add no loss and do not count in the mean.

          record_state_grads: also return the norms of the carried dLoss/dstate per chunk
            (see `chain.value_and_gradients`' record_carry_grads), for diagnostics.

        Returns:
          ``(ChainResult, kept_state, kept_from)``: with context_steps, the flat state at step
          `kept_from` where the next batch's context starts (the last backprop_chunks - 1
          chunks), else the final state and T. With record_state_grads, a fourth entry: the
          norms ``[chunks, ages]``.
        """
        mask = _keras_mask(inputs) if mask is None else mask
        loss_fn = checks.loss_function(
            loss_fn, with_weight=sample_weight is not None or mask is not None)
        sources = {name: source for name, source in [
            ("inputs", sources_lib.as_source("inputs", inputs)),
            ("targets", sources_lib.as_source("targets", targets)),
            ("sample_weight", sources_lib.as_source("sample_weight", sample_weight))]
            if source is not None}
        inputs = self._source_spec(sources["inputs"]) if "inputs" in sources else (
            checks.sequence_inputs(inputs, self._dtype))
        args = {"inputs": inputs}
        for name, value in [("targets", targets), ("sample_weight", sample_weight)]:
            if value is not None:
                args[name] = checks.per_step(name, self._source_spec(sources[name], False)
                                             if name in sources else value, inputs, self._dtype)
        args.update(self._flag_args(inputs, reset, mask))
        self.build(inputs.shape)
        batch = _batch_size(inputs)
        args["chunk_size"] = self._chunk_size_for(inputs.shape)
        args["state"] = self._state_leaves("initial_state", initial_state, batch)
        if final_state_grad is not None:
            if self._mode == "truncated" and self._backprop_chunks == 1:
                raise ValueError(checks.FINAL_GRAD_DROPPED_MSG)
            args["final_state_grad"] = self._state_leaves("final_state_grad", final_state_grad,
                                                          batch)
        if context_steps is not None:
            args["context_steps"] = tf.convert_to_tensor(context_steps, tf.int32)
        # Sources stay out of the compiled function's arguments: it is traced for their specs
        # and reads whichever source is live when it runs, so a new file costs no trace.
        source_specs = tuple((name, _relaxed_spec(args.pop(name))) for name in sorted(sources))
        if sources:
            args["steps"] = tf.constant(inputs.shape[1], tf.int32)
        reduction = self._reduction if reduction is None else checks.choice(
            "reduction", reduction, checks.REDUCTIONS)
        fn = self._functions.get("value_and_gradients", self._gradients_impl,
                                 (loss_fn, source_specs, reduction, record_state_grads),
                                 self._compiled)
        self._live_sources = sources
        try:
            (loss, grads, final_leaves, initial_grads, kept, kept_from, non_finite,
             norms) = fn(args)
        finally:
            self._live_sources = {}
        if non_finite is not None:
            loss, grads = self._report_non_finite(non_finite, (loss, grads), args["chunk_size"],
                                                  inputs)
        result = ChainResult(loss, list(grads), self._pack(list(final_leaves)),
                             self._pack(list(initial_grads)))
        if record_state_grads:
            return result, list(kept), kept_from, norms
        return result, list(kept), kept_from

    def _report_non_finite(self, found, tensors, chunk_size, inputs):
        """Raises NonFiniteError for what check_numerics found (eagerly), or makes `tensors`
        depend on an assertion (while building a graph)."""
        if not tf.executing_eagerly():
            return checks.assert_finite_in_graph(found, tensors)
        checks.raise_if_non_finite(found.numpy(), chunk_size=int(chunk_size),
                                   steps=inputs.shape[1])
        return tensors

    def _chunk_size_for(self, shape: tf.TensorShape) -> tf.Tensor:
        """The chunk size for inputs of `shape`, as a tensor: any T is served by one trace."""
        if self._chunk_size != "auto":
            return tf.constant(self._chunk_size, tf.int32)
        if shape[1] is None:
            raise ValueError(checks.AUTO_UNKNOWN_TIME_MSG.format(shape=shape.as_list()))
        plan = self.chunk_plan(shape[1], shape[0] or 1)
        return tf.constant(plan.chunk_size, tf.int32)

    def _source_spec(self, source, sequence: bool = True) -> tf.TensorSpec:
        """What a chunk source stands for: a spec of its whole shape, in the chain's dtype."""
        if sequence and len(source.shape) != 3:
            raise ValueError(checks.INPUTS_RANK_MSG.format(shape=list(source.shape)))
        dtype = self._dtype if source.dtype.is_floating else source.dtype
        return tf.TensorSpec(source.shape, dtype)

    def _gradients_impl(self, args: dict, static):
        loss_fn, source_specs, reduction, record = static
        args = dict(args)
        for name, spec in source_specs:  # read chunk by chunk from the live source
            args[name] = _SourceReader(lambda n=name: self._live_sources[n], spec)
        segments = self._segments(args, loss_fn, reduction)
        group = None
        if self._levels == 2:
            group = chunking.group_size_tensor(segments.count)
        keep_at = None
        if "context_steps" in args and self._mode == "truncated" and self._backprop_chunks > 1:
            keep_at = tf.maximum(segments.count - (self._backprop_chunks - 1), 0)
        result = chain_lib.value_and_gradients(
            segments, args["state"], self.trainable_variables, vjp_lib.get_vjp(self._backend),
            loss_dtype=self._loss_dtype(),
            backprop_segments=None if self._mode == "exact" else self._backprop_chunks,
            final_carry_grad=args.get("final_state_grad"), group=group, keep_carry_at=keep_at,
            check_numerics=self._check_numerics, record_carry_grads=record)
        if keep_at is None:
            kept, kept_from = result.final_carry, _steps(args)
        else:
            kept, kept_from = result.kept_carry, tf.minimum(keep_at * args["chunk_size"],
                                                            _steps(args))
        return (result.loss, result.grads, result.final_carry, result.initial_carry_grad, kept,
                kept_from, result.non_finite, result.carry_grad_norms)

    def _loss_dtype(self) -> tf.DType:
        return tf.float64 if self._dtype == tf.float64 else tf.float32

    def _segments(self, args: dict, loss_fn: LossFn, reduction: str) -> chain_lib.Segments:
        """The chunks of one sequence as chain segments over the flat state."""
        inputs = args["inputs"]
        steps = _steps(args)
        size = args["chunk_size"]
        count = (steps + size - 1) // size
        weight = self._chunk_weights(args, size, steps, reduction)

        def window(value, k):
            start, stop = k * size, tf.minimum((k + 1) * size, steps)
            if isinstance(value, _SourceReader):
                return value.read(start, stop)
            return value[:, start:stop]

        def advance(k, state):
            flags = _chunk_flags(args, lambda value: window(value, k))
            return self._run_chunk(window(inputs, k), state, training=True,
                                   with_outputs=False, flags=flags)[1]

        def segment(k, state):
            flags = _chunk_flags(args, lambda value: window(value, k))
            top, state = self._run_chunk(window(inputs, k), state, training=True, flags=flags)
            predictions = self._apply_head(layers.time_major(top), training=True)
            loss_args = [window(args["targets"], k), predictions]
            sample_weight = _masked_weight(
                window(args["sample_weight"], k) if "sample_weight" in args else None,
                window(args["mask"], k) if "mask" in args else None, predictions.dtype)
            if sample_weight is not None:
                loss_args.append(sample_weight)
            loss = tf.cast(checks.scalar_loss(loss_fn(*loss_args)), self._loss_dtype())
            return loss * weight(k), state

        return chain_lib.Segments(count, advance, segment)

    def _chunk_weights(self, args: dict, size, steps, reduction: str):
        """`weight(k)`, the factor on chunk k's loss.

        sum: 1. mean: the chunk's share of the T steps, so that per-element mean losses give the
        whole-sequence mean; with a mask, of the unmasked steps (a per-element mean loss counts
        masked elements with weight 0 in its denominator; this rescales to the masked mean).
        Context chunks (streaming) weigh 0.
        """
        dtype = self._loss_dtype()
        context = args.get("context_steps", tf.zeros([], tf.int32))
        if reduction == "sum":
            denominator = tf.ones([], dtype)
        elif "mask" in args:
            unmasked = tf.reduce_sum(tf.cast(args["mask"][:, context:], dtype))
            denominator = unmasked / tf.cast(tf.shape(args["mask"])[0], dtype)
        else:
            denominator = tf.cast(steps - context, dtype)

        def weight(k):
            share = tf.ones([], dtype) if reduction == "sum" else tf.math.divide_no_nan(
                tf.cast(tf.minimum((k + 1) * size, steps) - k * size, dtype), denominator)
            return tf.where(k * size < context, tf.zeros([], dtype), share)

        return weight

    # -- compiled functions --------------------------------------------------------------------

    @property
    def trace_count(self) -> int:
        """How many times the compiled functions were traced (for tests of retracing)."""
        return self._functions.trace_count


_PER_STEP_ARGS = ("inputs", "targets", "sample_weight", "reset", "mask")


def _steps(args: dict):
    """T: static for chunk sources, else read from the inputs."""
    return args["steps"] if "steps" in args else tf.shape(args["inputs"])[1]


def _chunk_flags(args: dict, window) -> Optional[layers.StepFlags]:
    """The chunk's reset and mask (`window` cuts them), time-major; None when neither is set."""
    if "reset" not in args and "mask" not in args:
        return None
    return layers.StepFlags(*[layers.time_major(window(args[name])) if name in args else None
                              for name in ("reset", "mask")])


def _masked_weight(sample_weight, mask, dtype):
    """sample_weight ``[B, t, ...]`` times mask ``[B, t]`` (None where both are None)."""
    if mask is None:
        return sample_weight
    mask = tf.cast(mask, dtype)
    if sample_weight is None:
        return mask
    sample_weight = tf.cast(sample_weight, dtype)
    return sample_weight * tf.reshape(mask, tf.concat(
        [tf.shape(mask), tf.ones([sample_weight.shape.rank - 2], tf.int32)], 0))


def _keras_mask(inputs):
    """The mask Keras attaches to a layer's outputs (`Masking`, `Embedding(mask_zero=True)`)."""
    return getattr(inputs, "_keras_mask", None)


def _relaxed_spec(spec: tf.TensorSpec) -> tf.TensorSpec:
    """Batch and time unknown: one trace serves sources of any batch size and length."""
    return tf.TensorSpec([None, None] + spec.shape[2:].as_list(), spec.dtype)


class _SourceReader:
    """Inside the compiled function: reads windows of the source live at run time."""

    def __init__(self, source, spec: tf.TensorSpec):
        self._source = source
        self._spec = spec

    def read(self, start, stop) -> tf.Tensor:
        return sources_lib.read_window(self._source, start, stop, self._spec)


def _unknown_dims(name: str) -> int:
    """Batch and time are left unknown in per-step arguments, batch only in states."""
    return 2 if name in _PER_STEP_ARGS else 1


def _batch_size(inputs: tf.Tensor):
    """The static batch size, or a scalar tensor where it is unknown (inside a tf.function)."""
    return inputs.shape[0] if inputs.shape[0] is not None else tf.shape(inputs)[0]


class StatefulGRUChain(RecurrentChain):
    """Stacked Keras `GRUCell`s and a head, trained over time chunks.

    Example:

    >>> import keras, numpy as np, tbptt
    >>> chain = tbptt.StatefulGRUChain((8, 4), head=keras.layers.Dense(3), chunk_size=5)
    >>> state = chain.initial_state(2)
    >>> [tuple(s.shape) for s in state]
    [(2, 8), (2, 4)]
    >>> x, y = np.ones([2, 12, 6], "float32"), np.zeros([2, 12, 3], "float32")
    >>> result = chain.value_and_gradients(x, y, keras.losses.MeanSquaredError(), state)
    >>> [tuple(s.shape) for s in result.initial_state_grad]
    [(2, 8), (2, 4)]
    """

    def __init__(self, units: Union[int, Sequence[int]], *, chunk_size: Union[int, str],
                 head=None, mode: str = "exact", backprop_chunks: int = 1,
                 backend: str = "eager", reduction: str = "sum", dtype=None,
                 compiled: bool = True, levels: int = 1, memory_budget: Optional[float] = None,
                 check_numerics: bool = False, name: Optional[str] = None):
        """Creates one `keras.layers.GRUCell(u)` per entry of `units` (bottom first).

        Args:
          units: an int, or a sequence of ints for stacked layers (seed 001: ``(64, 32)``).
          chunk_size, head, mode, backprop_chunks, backend, reduction, dtype, compiled, levels,
            memory_budget, check_numerics, name: as in `RecurrentChain`.
        """
        self._units = checks.units_tuple(units)
        cells = [keras.layers.GRUCell(u, dtype=None if dtype is None else tf.as_dtype(dtype).name)
                 for u in self._units]
        super().__init__(cells, chunk_size=chunk_size, head=head, mode=mode,
                         backprop_chunks=backprop_chunks, backend=backend, reduction=reduction,
                         dtype=dtype, compiled=compiled, levels=levels,
                         memory_budget=memory_budget, check_numerics=check_numerics, name=name)

    @property
    def units(self) -> tuple:
        return self._units

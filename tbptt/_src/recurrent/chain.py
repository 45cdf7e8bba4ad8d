"""RecurrentChain and StatefulGRUChain: stacked RNN cells run over time chunks.

A chain is three parts with one job each: a `ChainConfig` (how to cut and differentiate), a
`CellStack` (the cells, the head and the state layout: one chunk at a time) and the compiled
functions that run the time chain (`timechain.segments`) with the config's schedule. Nothing
about one call is stored on the chain: what a call needs flows in as arguments and out as values.
"""

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tbptt._src.core import checks, chunking, compat, compiling, serialization
from tbptt._src.core import sources as sources_lib
from tbptt._src.core.types import ChainResult, LossFn, State
from tbptt._src.recurrent import calls, streaming, timechain
from tbptt._src.recurrent import online as online_lib
from tbptt._src.recurrent.config import ChainConfig, config_from
from tbptt._src.recurrent.stack import CellStack
from tbptt._src.recurrent.streaming import StreamCarry

keras = compat.keras


def _stack_field(name: str, doc: str) -> property:
    return property(lambda self: getattr(self._stack, name), doc=doc)


class _RecurrentParts(tf.Module):
    """What a recurrent chain is: its cells, head and inputs layer (a `CellStack`) and its
    `ChainConfig`, made, checked, built and saved; `RecurrentChain` runs it."""

    def __init__(
        self,
        cells: Sequence,
        *,
        chunk_size: int | str,
        head=None,
        inputs_layer=None,
        name: str | None = None,
        **options,
    ):
        """Creates the chain.

        Args:
          cells: Keras-style RNN cells, bottom layer first (GRUCell, LSTMCell, custom cells
            with `state_size` and `call(inputs, states) -> (output, new_states)`); stock GRU
            and LSTM cells run a faster, equal function (see `layers.py`).
          chunk_size: time steps per chunk, or "auto" (see `chunk_plan`).
          head: Keras layer or callable mapping the top layer's ``[B, T, U]`` outputs to
            predictions, step by step; None uses the top layer's outputs.
          inputs_layer: Keras layer or callable mapping the inputs ``[B, T, ...]`` to the
            cells' ``[B, T, F]``, step by step and chunk by chunk like the head, and trained
            with them: ``keras.layers.Embedding(vocabulary, width)`` for token ids ``[B, T]``.
            Its Keras mask (``Embedding(mask_zero=True)``, ``Masking``; see `compute_mask`)
            is the mask of every call not given one. None: the inputs are the cells' inputs.
          name: module name.
          **options: the other fields of the chain's `tbptt.ChainConfig`, documented there
            (mode, backprop_chunks, backend, reduction, dtype, compiled, levels,
            memory_budget, check_numerics, xla); each is also a read-only attribute.
        """
        options = {"chunk_size": chunk_size, **options}
        config = config_from(options)
        super().__init__(name=name)
        self._options = options  # as given: what `with_config` and a saved config repeat
        self._stack = CellStack(cells, head, config.dtype, inputs_layer)
        self._config = config._replace(dtype=self._stack.dtype)
        self._functions = compiling.FunctionCache(
            _unknown_dims,
            variables=lambda: self._stack.trainable_variables,
            state=self._stack.python_state,
        )
        self._online = online_lib.OnlineSteps()

    def _arguments(self) -> dict:
        """The constructor's keywords that make this chain again over the same layers."""
        return {
            "cells": self.cells,
            "head": self.head,
            "inputs_layer": self.inputs_layer,
            "name": self.name,
            **self._options,
        }

    def get_config(self) -> dict:
        """Keras's config of the chain: its constructor's keywords, layers serialized."""
        return serialization.chain_config(self._arguments())

    @classmethod
    def from_config(cls, config: dict) -> "_RecurrentParts":
        return cls(**serialization.chain_arguments(config))

    def with_config(self, **changes) -> "_RecurrentParts":
        """A chain of the same class over the same cells and head (so the same weights), its
        config changed; made by the constructor, so it is checked as a new chain is.

        Examples:
            >>> import tbptt
            >>> chain = tbptt.StatefulGRUChain(4, chunk_size=10)
            >>> chain.with_config(mode="truncated", backprop_chunks=2).config.schedule
            Truncated(2)
        """
        return type(self)(**{**self._arguments(), **changes})

    @property
    def config(self) -> ChainConfig:
        """The chain's configuration, a frozen `ChainConfig` (dtype resolved). Each of its
        fields is also an attribute of the chain (`chain.mode`, `chain.chunk_size`, ...)."""
        return self._config

    state_dtype = _stack_field(
        "state_dtype",
        "The carried state's and dLoss/dstate's dtype: float32 under mixed precision.",
    )
    cells = _stack_field("cells", "The cells, bottom layer first.")
    head = _stack_field("head", "The head, or None.")
    inputs_layer = _stack_field("inputs_layer", "The inputs layer, or None.")
    parts = _stack_field("parts", "The inputs layer (if any), the cells, the head (if any).")
    features = _stack_field("features", "The inputs' feature size F once built, else None.")
    trainable_variables = _stack_field(
        "trainable_variables",
        "The inputs layer's variables, the cells' bottom to top, then the head's; once built.",
    )

    built = property(
        lambda self: self._stack.features is not None,
        doc="Whether the variables exist (after the first call or `build`).",
    )

    @property
    def input_shape(self) -> list | None:
        """``[None, None, ...]``: the inputs' shape the chain was built for (None before)."""
        tail = self._stack.input_tail
        return None if tail is None else [None, None] + list(tail)

    def chunk_plan(
        self, steps: int, batch_size: int = 1, features: int | None = None
    ) -> chunking.ChunkPlan:
        """`ChunkPlan(steps, chunk_size, chunks, group, estimated_bytes, kept_chunks)`: how T =
        `steps` time steps of `batch_size` rows are cut, and the bytes estimated to stay alive;
        `group` is the chunks per coarse segment with levels=2; `kept_chunks` how many chunks
        run as one (see `memory_budget`); `features` None takes the built chain's F.

        Examples:
            >>> import tbptt
            >>> chain = tbptt.StatefulGRUChain(64, chunk_size="auto")
            >>> chain.chunk_plan(1_000_000, features=16)[:4]
            (1000000, 1000, 1000, None)
        """
        return calls.plan_for(
            self._config,
            self._stack,
            checks.positive_int("steps", steps),
            checks.positive_int("batch_size", batch_size),
            features,
        )

    trace_count = property(
        lambda self: self._functions.trace_count,
        doc="How many times the compiled functions were traced (for tests of retracing).",
    )

    def compute_mask(self, inputs):
        """The ``[B, T]`` mask a call on `inputs` takes when given none, as Keras would: a
        Keras mask attached to `inputs`, else the one the inputs layer computes from them
        (``Embedding(mask_zero=True)``: ids != 0; ``Masking``; of a Sequential, its first
        layer's), else None. A chunk source is never read for it: pass ``mask=``."""
        return calls.inputs_mask(self._stack, inputs)

    def initial_state(self, batch_size: int) -> State:
        """Zero state: a tuple with one entry per layer (a tensor, or a tuple of tensors)."""
        return self._stack.pack(self._stack.zeros(checks.positive_int("batch_size", batch_size)))

    def build(self, input_shape, input_dtype=None) -> None:
        """Creates the variables for inputs of shape ``[B, T, F]`` (only F matters; with an
        inputs layer, the shape after [B, T], and `input_dtype`: None for int ids)."""
        self._stack.build(input_shape, self._config.chunk_size, input_dtype)


@serialization.register
class RecurrentChain(_RecurrentParts):
    """Stacked RNN cells and a head, trained over time chunks with carried state and gradient.

    ```
    outputs, final_state = chain(inputs, initial_state)          # plain forward, differentiable
    result = chain.value_and_gradients(inputs, targets, loss_fn)   # chunked: memory of one chunk
    opt.apply_gradients(zip(result.grads, chain.trainable_variables))
    result, carry = chain.stream_step(window, targets, loss_fn, carry)   # window after window
    ```

    The state is a tuple with one entry per layer: a tensor ``[B, units]``, or a tuple for cells
    with several state tensors (LSTM: ``(h, c)``).

    Examples:
        >>> import keras, numpy as np, tbptt
        >>> chain = tbptt.RecurrentChain([keras.layers.LSTMCell(4)], chunk_size=3)
        >>> x = np.ones([2, 7, 5], "float32")
        >>> outputs, state = chain(x)
        >>> outputs.shape, [tuple(s.shape) for s in state[0]]
        (TensorShape([2, 7, 4]), [(2, 4), (2, 4)])
        >>> loss = keras.losses.MeanSquaredError()
        >>> result = chain.value_and_gradients(x, np.zeros([2, 7, 4]), loss)
        >>> len(result.grads) == len(chain.trainable_variables)
        True
    """

    # The chunk and time loops are explicit tf.while_loops: AutoGraph has nothing to convert, and
    # converting the Keras calls inside would only get in the way inside a user's tf.function.
    @tf.autograph.experimental.do_not_convert
    def __call__(
        self, inputs, initial_state: State = None, *, training: bool = False, reset=None, mask=None
    ) -> tuple:
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
        online = reset is None and mask is None and self._config.compiled
        done = self._online.call(self._stack, inputs, initial_state, training) if online else None
        if done is None:
            prepared = calls.forward_call(
                self._config, self._stack, inputs, initial_state, reset, mask, training
            )
            if online:
                self._online.add(self._stack, inputs, initial_state, training, prepared.static.xla)
            done = _run_forward(self._functions, self._config, self._stack, prepared)
        return done[0], self._stack.pack(list(done[1]))

    @tf.autograph.experimental.do_not_convert
    def value_and_gradients(
        self,
        inputs,
        targets,
        loss_fn: LossFn,
        initial_state: State = None,
        final_state_grad: State = None,
        sample_weight=None,
        *,
        reset=None,
        mask=None,
    ) -> ChainResult:
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
            `initial_state_grad`), same structure as the state; None for zero. Truncated, it has
            crossed one cut already (refused with `backprop_chunks=1`); for TBPTT(K, mK)
            across consecutive windows with m > 2, use `stream_step`.
          sample_weight: ``[B, T]`` or ``[B, T, ...]``, passed to `loss_fn` per chunk.
          reset: ``[B, T]`` bool: row b starts from a zero state at step t (episodes packed end
            to end); no gradient crosses a reset.
          mask: ``[B, T]`` bool, False on padding: those steps keep the state and add no loss
            (the mean is over the unmasked steps). None takes a Keras mask of `inputs`, if any.

        Returns:
          `ChainResult(loss, grads, final_state, initial_state_grad)`.

        Raises:
          ValueError, TypeError: on inputs of the wrong rank, dtype or shape, before tracing.
          tbptt.NonFiniteError: with check_numerics=True, a NaN or Inf (see `ChainConfig`).
        """
        per_call = dict(initial_state=initial_state, final_state_grad=final_state_grad)
        per_step = dict(sample_weight=sample_weight, reset=reset, mask=mask)
        call = calls.gradient_call(
            self._config, self._stack, inputs, targets, loss_fn, **per_call, **per_step
        )
        return _result(self._stack, self._run(call))

    @tf.autograph.experimental.do_not_convert
    def stream_step(
        self,
        inputs,
        targets,
        loss_fn: LossFn,
        carry: StreamCarry | None = None,
        *,
        sample_weight=None,
        reset=None,
        mask=None,
    ) -> tuple:
        """`value_and_gradients` on one window of B streams, continuing the previous window.

        ```
        carry = None
        for inputs, targets in windows:           # window j+1 continues window j, row by row
            result, carry = chain.stream_step(inputs, targets, loss_fn, carry)
            opt.apply_gradients(zip(result.grads, chain.trainable_variables))
        ```

        The state crosses from one window to the next; with mode="truncated" and
        backprop_chunks=m >= 2 the last m-1 chunks are kept in the carry and re-run in front of
        the next window (with zero loss weight, from the state that entered them, with the
        weights of that step), so each loss back-propagates exactly m chunks, across window
        cuts too: with fixed weights, the summed gradients of the steps equal one
        `value_and_gradients` over the whole stream, for every m. Windows must then be whole
        chunks; m may exceed the chunks of one window (the context reaches into earlier ones).

        Args:
          inputs, targets, loss_fn, sample_weight, reset, mask: one window, as in
            `value_and_gradients` (the same arguments given at every step).
          carry: the previous step's `StreamCarry`, or None to start from zeros.

        Returns:
          ``(ChainResult, StreamCarry)``; the result's loss covers this window's own steps.
        """
        per_step = {
            "inputs": inputs,
            "targets": targets,
            "sample_weight": sample_weight,
            "reset": reset,
            "mask": mask,
        }
        call = streaming.stream_call(self._config, self._stack, loss_fn, carry, per_step)
        run = self._run(call)
        return _result(self._stack, run), streaming.next_carry(
            call, self._stack.pack(list(run.kept_state)), run.kept_from
        )

    def carried_grad_norms(self, inputs, targets, loss_fn: LossFn, **options) -> np.ndarray:
        """``[chunks, ages]``: the norm of the dLoss/dstate carried into the cut before chunk
        k, per age (what the loss `a` chunks ahead sends back; column a-1), for
        `tbptt.diagnostics.truncation_report`. `options`: those of `value_and_gradients`."""
        prepared = calls.gradient_call(
            self._config, self._stack, inputs, targets, loss_fn, record=True, **options
        )
        return np.asarray(self._run(prepared).carry_grad_norms, "float64")

    def _run(self, prepared: calls.Prepared) -> timechain.Run:
        return _run_gradients(self._functions, self._config, self._stack, prepared)


def _run_gradients(
    functions: compiling.FunctionCache,
    config: ChainConfig,
    stack: CellStack,
    prepared: calls.Prepared,
) -> timechain.Run:
    """Runs the compiled gradient function of `prepared`'s call; a non-finite value found
    inside is reported here, outside the function, by name."""
    fn = functions.get(
        "value_and_gradients",
        functools.partial(timechain.gradients, config, stack),
        prepared.static,
        config.compiled,
        recorded=False,
    )
    with sources_lib.live(prepared.sources) as handles:
        run = fn({**prepared.call.tensors(), "sources": handles})
    if run.non_finite is None:
        return run
    loss, grads = checks.report_non_finite(
        run.non_finite,
        (run.loss, run.grads),
        chunk_size=prepared.call.chunk_size,
        steps=prepared.call.static_steps(),
    )
    return run._replace(loss=loss, grads=grads)


def _run_forward(
    functions: compiling.FunctionCache,
    config: ChainConfig,
    stack: CellStack,
    prepared: calls.Prepared,
) -> tuple:
    """Runs the compiled forward of `prepared`'s call: ``(outputs, flat final state)``."""
    fn = functions.get(
        "call",
        functools.partial(timechain.forward, stack),
        prepared.static,
        config.compiled,
        static_time=prepared.short,
        forward_mode=prepared.short,
    )
    with sources_lib.live(prepared.sources) as handles:
        return fn({**prepared.call.tensors(), "sources": handles})


def _result(stack: CellStack, run: timechain.Run) -> ChainResult:
    return ChainResult(
        run.loss,
        list(run.grads),
        stack.pack(list(run.final_state)),
        stack.pack(list(run.initial_state_grad)),
    )


def _unknown_dims(name: str) -> int:
    """Batch and time are left unknown in per-step arguments, batch only in states."""
    return 2 if name in calls.PER_STEP else 1


@serialization.register
class StatefulGRUChain(RecurrentChain):
    """Stacked Keras `GRUCell`s and a head, trained over time chunks.

    Examples:
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

    def __init__(
        self,
        units: int | Sequence[int],
        *,
        chunk_size: int | str,
        head=None,
        inputs_layer=None,
        name: str | None = None,
        cells: Sequence | None = None,
        **options,
    ):
        """Creates one `keras.layers.GRUCell(u)` per entry of `units` (bottom first).

        Args:
          units: an int, or a sequence of ints for stacked layers (seed 001: ``(64, 32)``).
          chunk_size, head, inputs_layer, name, **options: as in `RecurrentChain`.
          cells: the GRU cells to use, one per entry of `units` (None: new ones); how
            `with_config` makes a chain over the same weights.
        """
        self._units = checks.positive_ints(
            "units", units, example="units=64, or units=(64, 32) for two stacked layers"
        )
        dtype = config_from({"chunk_size": chunk_size, **options}).dtype
        if cells is None:
            cells = [
                keras.layers.GRUCell(u, dtype=None if dtype is None else dtype.name)
                for u in self._units
            ]
        elif [getattr(cell, "units", None) for cell in cells] != list(self._units):
            raise ValueError(f"cells must be GRU cells of units {self._units}, got {cells!r}.")
        super().__init__(
            cells, chunk_size=chunk_size, head=head, inputs_layer=inputs_layer, name=name, **options
        )

    @property
    def units(self) -> tuple:
        return self._units

    def _arguments(self) -> dict:
        return {"units": self.units, **super()._arguments()}


def _config_property(name: str) -> property:
    return property(
        lambda self: getattr(self.config, name),
        doc=f"The config's `{name}` (see `tbptt.ChainConfig`).",
    )


# Each config field is an attribute of the chain: an option is said once, in ChainConfig.
for _field in dataclasses.fields(ChainConfig):
    setattr(_RecurrentParts, _field.name, _config_property(_field.name))
del _field

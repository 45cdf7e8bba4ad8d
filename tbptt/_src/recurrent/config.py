"""A recurrent chain's configuration: one frozen value, validated where it is made."""

import dataclasses
import difflib
import numbers
import os

import tensorflow as tf

from tbptt._src.core import checks, schedules
from tbptt._src.core import vjp as vjp_lib
from tbptt._src.recurrent import losses

MODES = ("exact", "truncated")
# The environment variable an `xla=None` config reads at each call ("0": loops without XLA).
XLA_VARIABLE = "TBPTT_XLA"
REDUCTIONS = ("auto", "sum", "mean")


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    """How a `RecurrentChain` cuts, differentiates and reports.

    Attributes:
      chunk_size: time steps per chunk (with the least memory the backward keeps one chunk's
        activations alive plus one state per chunk; see `memory_budget`), or "auto": about
        sqrt(T) per call (T^(1/3) with levels=2), or with a budget in bytes the largest chunk
        within it (see `RecurrentChain.chunk_plan`).
      mode: "exact" (full-BPTT gradient) or "truncated" (see `backprop_chunks`).
      backprop_chunks: with mode="truncated", how many chunks a loss term back-propagates
        through: 1 is Keras `stateful=True`, m is TBPTT(k1=chunk_size, k2=m*chunk_size).
      backend: "eager" (`GradientTape`) or "graph" (`tf.gradients` in a graph).
      reduction: "sum" (total = sum of chunk losses), "mean" (each chunk's loss weighted by
        its share of the T steps: a per-element mean loss gives the whole-sequence mean) or
        "auto" (the default): the loss's own, so that a Keras loss's scale does not depend on
        the chunk size (see `reduction_for`; a plain function is summed, so it should return
        its chunk's total, not a mean).
      dtype: dtype of the state and computation; None takes the first cell's.
      compiled: run the chunk loops in a `tf.function` (default); False runs them eagerly step
        by step, for debugging (eager backend only).
      levels: 1 keeps a state at every cut; 2 (exact mode) keeps one every ~sqrt(T/K) chunks
        and recomputes the others group by group in the backward pass: memory of about T^(1/3)
        states for one more forward pass.
      memory_budget: what the exact backward may keep alive, for speed. "auto" (the default,
        1 GiB): when a call's activations fit in it, the call runs as one chunk (one forward
        and one backward, as one tape over the sequence; with chunk_size="auto" too), else
        chunk by chunk with the least memory (every chunk but the last runs twice, whatever
        T). Bytes: as many chunks as fit run as one (`ChunkPlan.kept_chunks` times longer), so
        only the runs before the last run twice; with chunk_size="auto" the largest chunk
        that fits is taken in every mode (ValueError when none does). None: the least memory
        always. Runs are kept in exact mode with levels=1 only, and not with check_numerics
        (which names the chunk); elsewhere the chunks run as cut.
      check_numerics: test every chunk's carried state, loss, carried dLoss/dstate and weight
        gradients for NaN/Inf in `value_and_gradients`, and raise `tbptt.NonFiniteError`
        naming the chunk where one first appeared (inside a tf.function:
        `tf.errors.InvalidArgumentError`). Off, a non-finite loss is returned as it is.
      xla: compile the time loops of stock GRU/LSTM cells with XLA, each on its own (True),
        or run them as TensorFlow ops (False: a device without an XLA compiler); None (the
        default) reads ``TBPTT_XLA`` from the environment at each call (``0``: False). Inside
        a function that XLA compiles as a whole they are compiled as part of it either way.
      embedding_grads: "sparse" (the default): an `Embedding` table's gradient is
        `IndexedSlices`, one row per lookup, as one Keras tape gives it (Keras's optimizers
        step on it as on Keras's own model; B*T rows of the table's width are kept until the
        chunks are summed); "dense": one table-sized sum, whatever T (long sequences over a
        small vocabulary; Adam then steps otherwise than Keras on the same model).

    Every field is checked when the value is made, `_replace` included, so a config that exists
    is valid:

    >>> config = ChainConfig(chunk_size=100)
    >>> config._replace(mode="truncated", backprop_chunks=2).schedule
    Truncated(2)
    """

    chunk_size: int | str
    mode: str = "exact"
    backprop_chunks: int = 1
    backend: str = "eager"
    reduction: str = "auto"
    dtype: tf.DType | None = None
    compiled: bool = True
    levels: int = 1
    memory_budget: float | str | None = "auto"
    check_numerics: bool = False
    xla: bool | None = None
    embedding_grads: str = "sparse"

    def __post_init__(self):
        checks.choice("mode", self.mode, MODES)
        checks.choice("embedding_grads", self.embedding_grads, ("sparse", "dense"))
        checks.choice("backend", self.backend, vjp_lib.BACKENDS)
        checks.choice("reduction", self.reduction, REDUCTIONS)
        self._set("chunk_size", _chunk_size(self.chunk_size))
        self._set("memory_budget", _memory_budget(self.memory_budget))
        self._set(
            "backprop_chunks",
            checks.positive_int(
                "backprop_chunks",
                self.backprop_chunks,
                hint="; it counts the chunks a loss back-propagates through (1 = Keras "
                "stateful=True)",
            ),
        )
        if self.mode == "exact" and self.backprop_chunks != 1:
            raise ValueError(
                f"backprop_chunks={self.backprop_chunks} only applies to mode='truncated'; "
                "mode='exact' back-propagates through every chunk. Pass mode='truncated' or "
                "leave backprop_chunks at 1."
            )
        if self.levels not in (1, 2) or isinstance(self.levels, bool):
            raise ValueError(f"levels must be 1 or 2, got {self.levels!r}.")
        if self.levels == 2 and self.mode != "exact":
            raise ValueError(
                "levels=2 only applies to mode='exact'; mode='truncated' keeps at "
                "most backprop_chunks chunks alive already. Leave levels at 1."
            )
        if self.backend == "graph" and not self.compiled:
            raise ValueError(checks.COMPILED_GRAPH_MSG)
        self._set("compiled", bool(self.compiled))
        checks.boolean("check_numerics", self.check_numerics)
        if self.xla is not None:
            checks.boolean("xla", self.xla)
        self._set("dtype", None if self.dtype is None else tf.as_dtype(self.dtype))

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # normalizing a frozen field once, when made

    def _replace(self, **changes) -> "ChainConfig":
        """A copy with `changes`, validated again."""
        return dataclasses.replace(self, **changes)

    def reduction_for(self, loss_fn) -> str:
        """How a call with `loss_fn` adds its chunk losses: `reduction` when it is "sum" or
        "mean"; with "auto", "mean" for a Keras loss that averages (the total is then the
        whole-sequence mean, over the kept labels with ignore_class, over the sample weights
        with "mean_with_sample_weight") and "sum" for any other (a plain function returns its
        chunk's total: the total is the sum). See `tbptt._src.recurrent.losses`.

        >>> import keras
        >>> config = ChainConfig(chunk_size=10)
        >>> config.reduction_for(keras.losses.MeanSquaredError())
        'mean'
        >>> config.reduction_for(keras.losses.MeanSquaredError(reduction="sum"))
        'sum'
        >>> config.reduction_for(lambda y_true, y_pred: tf.reduce_sum(y_pred - y_true))
        'sum'
        """
        return losses.reduction_of(self.reduction, loss_fn).combine

    def compiled_loops(self) -> bool:
        """`xla`, with None read from ``TBPTT_XLA`` now."""
        if self.xla is not None:
            return self.xla
        return os.environ.get(XLA_VARIABLE, "1") != "0"

    @property
    def schedule(self) -> schedules.Schedule:
        """The truncation schedule of `mode`, `backprop_chunks` and `levels`."""
        return schedules.schedule_for(self.mode, self.backprop_chunks, self.levels)


def config_from(options: dict) -> ChainConfig:
    """`ChainConfig(**options)`, an unknown keyword named with the ones there are."""
    known = [field.name for field in dataclasses.fields(ChainConfig)]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"unexpected keyword argument {name!r}: a chain takes cells (or "
                f"units), head, inputs_layer, name and the ChainConfig fields "
                f"{known}.{hint}"
            )
    return ChainConfig(**options)


def _chunk_size(value):
    """A positive int or "auto"."""
    if value == "auto":
        return value
    if checks.is_int(value) and value >= 1:
        return int(value)
    raise (ValueError if checks.is_int(value) or isinstance(value, str) else TypeError)(
        f"chunk_size must be a positive int (time steps per chunk) or 'auto', got {value!r}. "
        "For example chunk_size=100, or 'auto' for about sqrt(T)."
    )


def _memory_budget(value):
    """A positive number of bytes, "auto" or None."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise (
            ValueError
            if isinstance(value, numbers.Real | str) and not isinstance(value, bool)
            else TypeError
        )(
            f"memory_budget must be a positive number of bytes, 'auto' or None, got "
            f"{value!r}. For example memory_budget=4e9 keeps up to 4 GB of activations."
        )
    return float(value)

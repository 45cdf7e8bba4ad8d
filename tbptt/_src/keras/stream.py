"""What a stateful `ChunkedModel` carries from one batch to the next: one value with methods,
and the step loops that carry it (`train_function`, `test_function`, `predict_function`).

```
stream.reset()                      # epoch start (unless resumed mid-epoch), reset_state()
stream.check_batch(data)            # the window fits the context, the batch the state
carry = stream.carry                # -> the next training step -> new carry, final state
stream.stepped(carry, final_state)  # one batch further
```

`evaluate` and `predict` carry a state the same way across the batches of one call
(`Carried`), from zeros at the call's start, and leave the training stream alone.

It is checkpointed with the model (`tf.train.Checkpoint(model=model)`): on restore the next
stateful fit goes on from the restored state instead of resetting at its first epoch's start.
The chain's chunking is saved beside it: a context of chunks means nothing to another chunking.
"""

import io
import json
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tbptt._src.core import compat
from tbptt._src.recurrent.streaming import StreamCarry, check_window


class StreamPosition(NamedTuple):
    """Where a stateful fit stands: `batch` batches into epoch `epoch` (both 0-based)."""

    epoch: int
    batch: int


class Stream(tf.train.experimental.PythonState):
    """The carry (state and kept context), the state the last batch ended with, and the
    position in the stream.

    Attributes:
      carry: the `StreamCarry` the next training step continues from, or None.
      final_state: the state after the last batch (per-replica values under a strategy).
      position: a `StreamPosition`.
    """

    def __init__(self, chain, strategy: Callable):
        """`chain`: the model's chain; `strategy()`: the model's distribution strategy."""
        self._chain, self._strategy = chain, strategy
        self.carry: StreamCarry | None = None
        self.final_state = None
        self.position = StreamPosition(0, 0)
        self._resumed = False  # restored mid-epoch: the next epoch start goes on from it

    def reset(self) -> None:
        """Forgets the carried state: the next batch starts from zeros."""
        self.carry = self.final_state = None

    def begin_epoch(self, epoch: int) -> None:
        """An epoch starts: from zeros, unless it goes on from a restored checkpoint."""
        if self._resumed:
            self._resumed = False
            self.position = StreamPosition(epoch, self.position.batch)
            return
        self.reset()
        self.position = StreamPosition(epoch, 0)

    def check_batch(self, data) -> None:
        """Before a step: the window must fit the carried context; a batch of another size
        than the carried streams resets the state, with a warning."""
        first = _local(self._strategy(), tf.nest.flatten(data)[0])
        if self._chain.config.schedule.context_chunks:
            check_window(self._chain.config, first.shape[1])
        if self.carry is not None and _other_size(first, self._strategy(), self.carry.state):
            self.reset()

    def stepped(self, carry: StreamCarry, final_state) -> None:
        """One batch further: its carry and final state (as the user sees it)."""
        strategy = self._strategy()
        self.carry = carry
        self.final_state = (
            final_state
            if strategy.num_replicas_in_sync > 1
            else (tf.nest.map_structure(lambda v: _local(strategy, v), final_state))
        )
        self.position = StreamPosition(self.position.epoch, self.position.batch + 1)

    # -- checkpointing -------------------------------------------------------------------------

    def _chunking(self) -> list:
        config = self._chain.config
        return [config.chunk_size, config.mode, config.backprop_chunks]

    def serialize(self) -> bytes:
        layout = {"position": list(self.position), "chunking": self._chunking(), "context": None}
        arrays = {}
        if self.carry is not None:
            strategy = self._strategy()
            if strategy.num_replicas_in_sync > 1:
                raise ValueError(
                    "the carried state of a tf.distribute replica cannot be "
                    "checkpointed as one value; checkpoint at an epoch end (after "
                    "reset_state())."
                )
            carry, final = tf.nest.map_structure(
                lambda v: _local(strategy, v), (self.carry, self.final_state)
            )
            layout["context"] = sorted(carry.context)
            for name, value in [
                ("state", carry.state),
                ("final", final),
                ("context", carry.context),
            ]:
                arrays.update(
                    {f"{name}_{i}": leaf.numpy() for i, leaf in enumerate(tf.nest.flatten(value))}
                )
        buffer = io.BytesIO()
        np.savez(buffer, layout=np.array(json.dumps(layout)), **arrays)
        return buffer.getvalue()

    def deserialize(self, string_value) -> None:
        stored = np.load(io.BytesIO(string_value))
        layout = json.loads(str(stored["layout"]))
        saved = layout.get("chunking")
        if saved is not None and saved != self._chunking():
            raise ValueError(
                f"this checkpoint's carried stream state was saved by a chain with "
                f"(chunk_size, mode, backprop_chunks) = {tuple(saved)}, but this "
                f"model's chain has {tuple(self._chunking())}. Restore it into a "
                "model with the same chunking, or call model.reset_state() and "
                "restore without the stream state."
            )
        self.position = StreamPosition(*layout["position"])
        if layout["context"] is None:
            self.reset()
            return

        def leaves(name):
            return [
                tf.constant(stored[key])
                for key in sorted(
                    (k for k in stored.files if k.startswith(name + "_")),
                    key=lambda k: int(k.rsplit("_", 1)[1]),
                )
            ]

        structure = self._chain.initial_state(1)
        self.carry = StreamCarry(
            tf.nest.pack_sequence_as(structure, leaves("state")),
            dict(zip(layout["context"], leaves("context"))),
        )
        self.final_state = tf.nest.pack_sequence_as(structure, leaves("final"))
        self._resumed = True


class Carried:
    """The state a stateful `evaluate` or `predict` carries across the batches of one call."""

    def __init__(self, strategy: Callable):
        self._strategy = strategy
        self.state = None

    def reset(self) -> None:
        self.state = None

    def step(self, step, data):
        """`step(data, state) -> (result, state)` from the carried state, which it carries on;
        returns the result."""
        self.check_batch(data)
        result, self.state = step(data, self.state)
        return result

    def check_batch(self, data) -> None:
        """A batch of another size than the carried streams resets the state, with a warning."""
        if self.state is None:
            return
        strategy = self._strategy()
        if _other_size(_local(strategy, tf.nest.flatten(data)[0]), strategy, self.state):
            self.reset()


def _other_size(first: tf.Tensor, strategy, state) -> bool:
    """Whether a batch's rows differ from the carried streams' (warned: the state is reset)."""
    carried = _local(strategy, tf.nest.flatten(state)[0])
    if first.shape[0] == carried.shape[0]:
        return False
    warnings.warn(
        f"ChunkedModel(stateful=True): a batch of {first.shape[0]} rows follows "
        f"{carried.shape[0]} carried streams; the carried state is reset. Use batches of one "
        "size (drop_remainder=True) to carry the state through.",
        stacklevel=5,
    )
    return True


# -- the step loops of a stateful model: Keras's own run one batch from nothing -------------------


def train_function(step, stream: Stream, steps_per_execution: int):
    """`fit`'s function over batches: `step(data, carry) -> (logs, carry, final state)` on up
    to `steps_per_execution` batches, the training stream carried from one to the next."""

    def one(data):
        stream.check_batch(data)
        logs, carry, final_state = step(data, stream.carry)
        stream.stepped(carry, final_state)
        return logs

    return lambda iterator: _each_batch(iterator, steps_per_execution, one)


def test_function(step, carried: Carried, steps_per_execution: int):
    """`evaluate`'s: `step(data, state) -> (logs, state)`, the state carried across the batches
    of the call (from zeros at its start)."""
    return lambda iterator: _each_batch(
        iterator, steps_per_execution, lambda data: carried.step(step, data)
    )


def predict_function(step, carried: Carried):
    """`predict`'s: `step(data, state) -> (outputs, state)` over the batches it is given, the
    state carried; the outputs joined."""

    def run(batches):
        outputs = [carried.step(step, data) for data in batches]
        return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *outputs)

    return run


def distributed(strategy, replica_step, kind: str, *, run_eagerly: bool, jit_compile: bool):
    """`replica_step(data, carried) -> (result, *carried)` run on every replica of `strategy`
    (compiled unless `run_eagerly`; each replica's step with XLA with `jit_compile`, as Keras
    compiles its own): logs are the first replica's, outputs all replicas' in order."""
    if jit_compile and not run_eagerly:
        replica_step = compat.quiet_function(replica_step, jit_compile=True, reduce_retracing=True)

    def gather(value):
        if kind == "logs":
            return _local(strategy, value)
        return tf.concat(strategy.experimental_local_results(value), axis=0)

    def step(data, carried):
        result, *carried = strategy.run(replica_step, args=(data, carried))
        return (tf.nest.map_structure(gather, result), *carried)

    # Traced once per carry structure (none, then a carry) and per kind of step, by design.
    return step if run_eagerly else compat.quiet_function(step, reduce_retracing=True)


def _each_batch(iterator, count: int, one):
    """`one(data)` on up to `count` batches of `iterator`; the last result."""
    result = None
    for _ in range(count):
        try:
            data = next(iterator)
        except (StopIteration, tf.errors.OutOfRangeError):
            if result is None:
                raise
            break
        result = one(data)
    return result


def _local(strategy, value):
    """One replica's part of a (possibly per-replica) value."""
    return strategy.experimental_local_results(value)[0]

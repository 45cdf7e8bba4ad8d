"""What a stateful `ChunkedModel` carries from one batch to the next: one value with methods,
and the step loops that carry it (`StreamingSteps`).

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
from typing import Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf

from tbptt._src.recurrent.streaming import StreamCarry
from tbptt._src.recurrent.streaming import check_window


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
        self.carry: Optional[StreamCarry] = None
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
        if self.carry is None:
            return
        carried = _local(self._strategy(), tf.nest.flatten(self.carry.state)[0])
        if first.shape[0] != carried.shape[0]:
            warnings.warn(f"ChunkedModel(stateful=True): a batch of {first.shape[0]} rows "
                          f"follows {carried.shape[0]} carried streams; the carried state is "
                          "reset. Use batches of one size (drop_remainder=True) to carry the "
                          "state through.", stacklevel=4)
            self.reset()

    def stepped(self, carry: StreamCarry, final_state) -> None:
        """One batch further: its carry and final state (as the user sees it)."""
        strategy = self._strategy()
        self.carry = carry
        self.final_state = final_state if strategy.num_replicas_in_sync > 1 else (
            tf.nest.map_structure(lambda v: _local(strategy, v), final_state))
        self.position = StreamPosition(self.position.epoch, self.position.batch + 1)

    # -- checkpointing -------------------------------------------------------------------------

    def _chunking(self) -> list:
        config = self._chain.config
        return [config.chunk_size, config.mode, config.backprop_chunks]

    def serialize(self) -> bytes:
        layout = {"position": list(self.position), "chunking": self._chunking(),
                  "context": None}
        arrays = {}
        if self.carry is not None:
            strategy = self._strategy()
            if strategy.num_replicas_in_sync > 1:
                raise ValueError("the carried state of a tf.distribute replica cannot be "
                                 "checkpointed as one value; checkpoint at an epoch end (after "
                                 "reset_state()).")
            carry, final = tf.nest.map_structure(lambda v: _local(strategy, v),
                                                 (self.carry, self.final_state))
            layout["context"] = sorted(carry.context)
            for name, value in [("state", carry.state), ("final", final),
                                ("context", carry.context)]:
                arrays.update({f"{name}_{i}": leaf.numpy()
                               for i, leaf in enumerate(tf.nest.flatten(value))})
        buffer = io.BytesIO()
        np.savez(buffer, layout=np.array(json.dumps(layout)), **arrays)
        return buffer.getvalue()

    def deserialize(self, string_value) -> None:
        stored = np.load(io.BytesIO(string_value))
        layout = json.loads(str(stored["layout"]))
        saved = layout.get("chunking")
        if saved is not None and saved != self._chunking():
            raise ValueError(f"this checkpoint's carried stream state was saved by a chain with "
                             f"(chunk_size, mode, backprop_chunks) = {tuple(saved)}, but this "
                             f"model's chain has {tuple(self._chunking())}. Restore it into a "
                             "model with the same chunking, or call model.reset_state() and "
                             "restore without the stream state.")
        self.position = StreamPosition(*layout["position"])
        if layout["context"] is None:
            self.reset()
            return

        def leaves(name):
            return [tf.constant(stored[key]) for key in sorted(
                (k for k in stored.files if k.startswith(name + "_")),
                key=lambda k: int(k.rsplit("_", 1)[1]))]

        structure = self._chain.initial_state(1)
        self.carry = StreamCarry(tf.nest.pack_sequence_as(structure, leaves("state")),
                                 dict(zip(layout["context"], leaves("context"))))
        self.final_state = tf.nest.pack_sequence_as(structure, leaves("final"))
        self._resumed = True


class Carried:
    """The state a stateful `evaluate` or `predict` carries across the batches of one call."""

    def __init__(self, strategy: Callable):
        self._strategy = strategy
        self.state = None

    def reset(self) -> None:
        self.state = None

    def check_batch(self, data) -> None:
        """A batch of another size than the carried streams resets the state, with a warning."""
        if self.state is None:
            return
        first = _local(self._strategy(), tf.nest.flatten(data)[0])
        carried = _local(self._strategy(), tf.nest.flatten(self.state)[0])
        if first.shape[0] != carried.shape[0]:
            warnings.warn(f"ChunkedModel(stateful=True): a batch of {first.shape[0]} rows "
                          f"follows {carried.shape[0]} carried streams; the carried state is "
                          "reset. Use batches of one size (drop_remainder=True) to carry the "
                          "state through.", stacklevel=4)
            self.reset()


class StreamingSteps:
    """The step loops of a stateful `ChunkedModel` (a mixin: a model without `stateful` runs
    Keras's own): `fit` continues its training stream, `evaluate` and `predict` the state
    carried across the batches of their call. Each step runs under the model's strategy; the
    carried values stay tensors between steps (per-replica values under a strategy)."""

    def make_train_function(self, force: bool = False):
        if not self.stateful:
            return super().make_train_function(force)
        if self.train_function is None or force:
            step = self._distributed(self._train_step, "logs")

            def train_function(iterator):
                return _each_batch(iterator, self.steps_per_execution, self._train_one, step)

            self.train_function = train_function
        return self.train_function

    def _train_one(self, data, step):
        self._stream.check_batch(data)
        logs, carry, final_state = step(data, self._stream.carry)
        self._stream.stepped(carry, final_state)
        return logs

    def make_test_function(self, force: bool = False):
        if not self.stateful:
            return super().make_test_function(force)
        if self.test_function is None or force:
            step = self._distributed(self._test_step, "logs")

            def test_function(iterator):
                return _each_batch(iterator, self.steps_per_execution, self._carry_one, step)

            self.test_function = test_function
        return self.test_function

    def make_predict_function(self, force: bool = False):
        if not self.stateful:
            return super().make_predict_function(force)
        if self.predict_function is None or force:
            step = self._distributed(self._predict_step, "outputs")

            def predict_function(batches):
                outputs = [self._carry_one(data, step) for data in batches]
                return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0),
                                             *outputs)

            self.predict_function = predict_function
        return self.predict_function

    def _carry_one(self, data, step):
        self._evaluation.check_batch(data)
        result, self._evaluation.state = step(data, self._evaluation.state)
        return result

    def _distributed(self, replica_step, kind: str):
        """`replica_step(data, carried) -> (result, *carried)` run on every replica (compiled
        unless run_eagerly): logs are the first replica's, outputs all replicas' in order."""
        strategy = self.distribute_strategy

        def gather(value):
            if kind == "logs":
                return _local(strategy, value)
            return tf.concat(strategy.experimental_local_results(value), axis=0)

        def step(data, carried):
            result, *carried = strategy.run(replica_step, args=(data, carried))
            return (tf.nest.map_structure(gather, result), *carried)

        return step if self.run_eagerly else tf.function(step, reduce_retracing=True)


def _each_batch(iterator, count: int, one, step):
    """`one(data, step)` on up to `count` batches of `iterator`; the last result."""
    result = None
    for _ in range(count):
        try:
            data = next(iterator)
        except (StopIteration, tf.errors.OutOfRangeError):
            if result is None:
                raise
            break
        result = one(data, step)
    return result


def _local(strategy, value):
    """One replica's part of a (possibly per-replica) value."""
    return strategy.experimental_local_results(value)[0]

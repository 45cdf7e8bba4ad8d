"""The online step: `chain(x_t, state)` on a few steps, as fast as a compiled Keras step.

A model serving a live stream, an RL actor or a sampler calls the chain one step (or a few) at a
time with the state carried:

```
state = chain.initial_state(batch_size)
for x_t in stream:                                  # x_t [B, 1, F]
    y_t, state = chain(x_t, state)
```

Such a call is checked once per shape, like any other, and then runs a concrete function of
that shape directly, its time loop unrolled into plain ops (no loop, no XLA launch): what is
left per call is TensorFlow's own dispatch. Any other call (longer inputs, flags, sources,
inside a graph) takes the general path; both compute the same function.
"""

import collections
import threading

import numpy as np
import tensorflow as tf

from tbptt._src.core import compat
from tbptt._src.recurrent import timechain
from tbptt._src.recurrent.calls import Static
from tbptt._src.recurrent.loops import timeloop

# The shapes (batch size, steps) whose concrete functions a chain keeps.
MAX_SHAPES = 8


class OnlineSteps:
    """A chain's concrete functions for short in-memory calls, one per shape."""

    def __init__(self):
        self._functions = collections.OrderedDict()
        self._lock = threading.Lock()

    def call(self, stack, inputs, state, training: bool):
        """``(outputs, flat final state)``, or None when the call is not an online step of a
        shape checked before (it then takes the general path, which checks it)."""
        key = self._key(stack, inputs, state, training)
        if key is None:
            return None
        with self._lock:
            function = self._functions.get(key)
            if function is not None:
                self._functions.move_to_end(key)
        if function is None:
            return None
        return function(tf.convert_to_tensor(inputs), *_leaves(state))

    def add(self, stack, inputs, state, training: bool, xla: bool) -> None:
        """After the general path has checked a call: the concrete function of its shape."""
        key = self._key(stack, inputs, state, training)
        if key is None:
            return
        static = Static(training=training, xla=xla)

        def run(x, *leaves):
            leaves = list(leaves) or stack.zeros(tf.shape(x)[0])
            return timechain.forward(stack, {"inputs": x, "state": leaves}, static)

        specs = [tf.TensorSpec(inputs.shape, key[1])] + [
            tf.TensorSpec(shape, dtype) for shape, dtype in key[2]
        ]
        function = tf.function(run, autograph=False).get_concrete_function(*specs)
        with self._lock:
            self._functions[key] = function
            if len(self._functions) > MAX_SHAPES:
                self._functions.popitem(last=False)

    @staticmethod
    def _key(stack, inputs, state, training: bool) -> tuple | None:
        """The shape of an online step, or None for any other call."""
        if not tf.executing_eagerly() or stack.features is None or tf.distribute.has_strategy():
            return None
        if not isinstance(inputs, (tf.Tensor, np.ndarray)) or isinstance(inputs, np.memmap):
            return None
        if compat.keras_mask(inputs) is not None or len(inputs.shape) < 2:
            return None
        steps = inputs.shape[1]
        if steps is None or not 1 <= steps <= timeloop.SHORT_STEPS:
            return None
        dtype = tf.as_dtype(inputs.dtype)
        if dtype != stack.dtype and not (stack.inputs_layer is not None and dtype.is_integer):
            return None
        structure = _structure(state)
        leaves = _leaves(state)
        if structure is None or any(
            getattr(leaf, "dtype", None) != stack.state_dtype for leaf in leaves
        ):
            return None
        return (
            tuple(inputs.shape),
            dtype,
            tuple((tuple(leaf.shape), leaf.dtype) for leaf in leaves),
            bool(training),
            structure,
            stack.python_state(),
        )


def _leaves(state) -> list:
    return [] if state is None else tf.nest.flatten(state)


def _structure(state):
    """The nest's shape as a hashable value; None for anything but tensors in tuples/lists."""
    if state is None:
        return "zeros"
    if isinstance(state, (tuple, list)):
        parts = tuple(_structure(s) for s in state)
        return None if "zeros" in parts or None in parts else (type(state).__name__, parts)
    return "tensor" if isinstance(state, tf.Tensor) else None

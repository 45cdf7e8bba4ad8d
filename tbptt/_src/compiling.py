"""Compiling a chain's entry points once per argument structure, with relaxed shapes."""

import warnings
from typing import Callable

import tensorflow as tf

# After this many distinct compiled functions on one object, something is retracing per call.
MANY_COMPILES = 16
MANY_COMPILES_MSG = ("this chain has compiled {count} functions: each new loss_fn object (a "
                     "lambda made inside a loop, say), new dtype or new feature size costs a "
                     "trace. Create loss_fn once and pass the same object every call.")


def signature(args: dict, unknown_dims: Callable[[str], int]) -> dict:
    """TensorSpecs of `args` (a dict of tensor nests) with the leading `unknown_dims(name)` dims
    unknown: batch, and time for per-step arguments."""
    def spec(tensor, unknown):
        dims = tensor.shape.as_list()
        unknown = min(unknown, len(dims))
        return tf.TensorSpec([None] * unknown + dims[unknown:], tensor.dtype)

    return {name: tf.nest.map_structure(lambda t, u=unknown_dims(name): spec(t, u), value)
            for name, value in args.items()}


class FunctionCache:
    """`impl(args, static)` compiled once per (kind, static, argument specs).

    Batch (and time) dims are unknown in the signature, so one trace serves every batch size and
    sequence length.
    """

    def __init__(self, unknown_dims: Callable[[str], int]):
        self._unknown_dims = unknown_dims
        self._functions = {}

    def get(self, kind: str, impl, static, compiled: bool = True):
        if not compiled:
            return lambda args: impl(args, static)

        def call(args: dict):
            specs = signature(args, self._unknown_dims)
            key = (kind, static, tuple((name, tuple(tf.nest.flatten(s)))
                                       for name, s in sorted(specs.items())))
            function = self._functions.get(key)
            if function is None:
                # The loops are explicit tf.while_loops: AutoGraph has nothing to convert, and
                # converting the Keras layers and user functions inside only gets in the way.
                function = tf.function(lambda a: impl(a, static), input_signature=[specs],
                                       autograph=False)
                self._functions[key] = function
                if len(self._functions) == MANY_COMPILES:
                    warnings.warn(MANY_COMPILES_MSG.format(count=MANY_COMPILES), stacklevel=4)
            return function(args)

        return call

    @property
    def trace_count(self) -> int:
        return sum(f.experimental_get_tracing_count() for f in self._functions.values())

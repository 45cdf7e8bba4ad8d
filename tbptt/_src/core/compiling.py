"""Compiling a chain's entry points once per argument structure, with relaxed shapes.

The compiled functions are kept in a bounded cache, least recently used first out, keyed by the
call's kind, its static values, its argument specs and the Python state its layers hold
(`static_key`, `attributes_key`). What a trace reads from Python is frozen into it, so the key
holds all of it by value: a loss or head whose Python attributes change between calls (an
array changed in place, a list a lambda closes over) traces again and is seen. A Keras loss is
keyed by its class and attribute values, so a new `keras.losses.MeanSquaredError()` per call
(an everyday pattern) shares one trace with the last one. What changes often belongs in a
`tf.Variable`, which a trace reads anew at each call.
"""

import collections
import functools
import hashlib
import threading
import types
import warnings
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from tbptt._src.core import compat

# Held while variables are built (a chain's first call), so that threads build them once.
BUILD_LOCK = threading.RLock()
# After this many compiled functions on one object, something is retracing per call.
MANY_COMPILES = 16
# The compiled functions kept per object; older ones are dropped (and retraced if called again).
MAX_FUNCTIONS = 32


def signature(args: dict, unknown_dims: Callable[[str], int]) -> dict:
    """TensorSpecs of `args` (a dict of tensor nests) with the leading `unknown_dims(name)` dims
    unknown: batch, and time for per-step arguments."""

    def spec(tensor, unknown):
        dims = tensor.shape.as_list()
        unknown = min(unknown, len(dims))
        return tf.TensorSpec([None] * unknown + dims[unknown:], tensor.dtype)

    return {
        name: tf.nest.map_structure(lambda t, u=unknown_dims(name): spec(t, u), value)
        for name, value in args.items()
    }


def static_key(value, seen: frozenset = frozenset()):
    """A hashable key of everything a trace reads from a Python value, so that a call whose
    Python state changed traces again rather than answering with the old values:

    - plain values, lists, tuples and dicts by value; NumPy arrays and eager tensors by
      content (a change in place is seen); variables by identity (a trace reads them anew);
    - a function by its code, the values it closes over and its defaults (a lambda made anew
      in a loop is one trace), a bound method by its function and its object;
    - a Keras loss by its class and attribute values (equal losses share a trace);
    - a layer or module by identity (its variables are read anew; a head's and cells' own
      attributes are keyed apart, see `attributes_key`);
    - any other object by its class and attribute values (two objects alike compute
      alike): never by its own `__eq__` or `__hash__`, which may call two different losses
      equal; an object without attributes (a builtin, a C function) by identity.
    """
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, (tf.DType, tf.TensorSpec, tf.TensorShape, tf.dtypes.DType)):
        return value
    if id(value) in seen:
        return ("cycle", id(value))
    seen = seen | {id(value)}
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(static_key(v, seen) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), static_key(v, seen)) for k, v in value.items())))
    content = _content_key(value)
    return content if content is not None else _object_key(value, seen)


def _object_key(value, seen: frozenset):
    """`static_key` of a function, a method, a partial, a Keras loss or another object."""
    if isinstance(value, types.FunctionType):
        closure = tuple(c.cell_contents for c in value.__closure__ or ())
        values = (closure, value.__defaults__ or (), value.__kwdefaults__ or {})
        return ("function", value.__code__, id(value.__globals__), static_key(values, seen))
    if isinstance(value, types.MethodType):
        return ("method", static_key((value.__func__, value.__self__), seen))
    if isinstance(value, functools.partial):
        return ("partial", static_key((value.func, value.args, value.keywords), seen))
    if isinstance(value, compat.keras.losses.Loss):
        return ("keras loss", type(value), static_key(vars(value), seen))
    opaque = (tf.Module, types.ModuleType, type)
    if isinstance(value, opaque) or compat.is_keras_layer(value) or not hasattr(value, "__dict__"):
        return ("object", id(value))  # builtins, C functions, modules, layers
    return ("object", type(value), static_key(vars(value), seen))


def _content_key(value):
    """An array, an eager tensor or a variable as a key (None for anything else)."""
    if isinstance(value, (tf.Variable, getattr(compat.keras, "Variable", tf.Variable))):
        return ("variable", id(value))
    if isinstance(value, tf.Tensor):
        if not hasattr(value, "numpy"):  # symbolic: its value is not known here
            return ("tensor", id(value))
        value = value.numpy()
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.ascontiguousarray(value)
        digest = (
            hashlib.blake2b(array.tobytes(), digest_size=16).digest()
            if (array.dtype != object)
            else id(value)
        )
        return ("array", array.dtype.str, array.shape, digest)
    return None


_PLAIN = (type(None), bool, int, float, str)


def attributes_key(layer) -> tuple:
    """The public attributes of a layer (the head, a cell, the inputs layer, and the layers
    inside them) that a trace may read from Python, by value: plain values and lists of them,
    arrays and eager tensors by content, functions by identity. Its other objects are Keras's
    own (initializers, specs) or read anew (variables). Made at every call, so kept cheap."""
    keyed: list = []
    for name, value in vars(layer).items():
        if name[0] == "_":
            continue
        if isinstance(value, _PLAIN):
            keyed.append((name, value))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value):
            keyed.append((name, tuple(value)))
        elif isinstance(value, types.FunctionType):
            keyed.append((name, id(value)))
        elif isinstance(value, (np.ndarray, np.generic, tf.Tensor)):
            keyed.append((name, _content_key(value)))
        elif isinstance(value, dict):
            keyed.append((name, static_key(value)))
    return tuple(keyed)


def kind_of(value):
    """What a loss is apart from its values: a Keras loss's class, a function's code; None
    for anything else. Two losses of one kind with other values trace twice."""
    if isinstance(value, compat.keras.losses.Loss):
        return type(value)
    if isinstance(value, types.FunctionType):
        return value.__code__
    return None


def _kinds(static):
    """`static` with each loss replaced by its kind (see `kind_of`)."""
    if isinstance(static, tuple):
        return tuple(_kinds(v) for v in static)
    kind = kind_of(static)
    return static_key(static) if kind is None else ("kind", kind)


class FunctionCache:
    """`impl(args, static)` compiled once per (kind, static, argument specs), LRU-bounded.

    Batch (and time) dims are unknown in the signature, so one trace serves every batch size and
    sequence length. Safe to call from several threads.
    """

    def __init__(
        self,
        unknown_dims: Callable[[str], int],
        variables: Callable[[], list] = list,
        state: Callable[[], tuple] = tuple,
    ):
        """`unknown_dims(name)`: the leading dims of argument `name` left unknown;
        `variables()`: the variables the functions read (for `compat.second_order_recording`);
        `state()`: the Python state of the layers the functions run (see `attributes_key`),
        a part of each key."""
        self._unknown_dims = unknown_dims
        self._variables = variables
        self._state = state
        self._functions: collections.OrderedDict = collections.OrderedDict()
        # key -> the concrete function of a call made unrecorded: one per key, since the
        # signature is fixed; looking it up anew would cost about as much as a small call.
        self._concretes: dict = {}
        self._lock = threading.Lock()
        self._compiled = 0
        self._dropped_traces = 0
        self._variants: dict = {}  # the key apart from loss values -> the last full key
        self._warned = False

    def get(
        self,
        kind: str,
        impl,
        static,
        compiled: bool = True,
        recorded: bool = True,
        static_time: bool = False,
        forward_mode: bool = False,
    ):
        """`impl(args, static)`, compiled unless `compiled` is False; with `static_time`, the
        time dims are kept in the signature (one trace per short length). With `recorded` False
        the call is a value to the caller's tapes (a chunked gradient): no tape around it records
        it, so TensorFlow does not prepare the gradient of the whole compiled chain (minutes
        of tracing under a persistent tape) that nobody takes. It is traced first, outside
        that pause, since the chain's own tapes must record inside.

        A recorded call made eagerly under tapes that may take a second derivative (a
        persistent tape, a tape inside a tape) runs op by op: a tape outside a compiled function
        cannot differentiate twice through the custom gradients inside it (TensorFlow loses the
        tensors they close over), and the loops inside are compiled functions of their own
        anyway. Under one plain tape the call stays compiled.

        A call that a `tf.autodiff.ForwardAccumulator` watches is refused by name unless
        `forward_mode` (no compiled loop inside, the short unrolled forward): TensorFlow has no
        forward-mode rule for the compiled loops (an internal error) or for the tapes of a
        chunked gradient (a tangent of None)."""
        if not compiled:
            return lambda args: impl(self._refuse_forward_mode(kind, args, forward_mode), static)

        unknown = (lambda name: 1) if static_time else self._unknown_dims

        def call(args: dict):
            self._refuse_forward_mode(kind, args, forward_mode)
            specs = signature(args, unknown)
            shapes = tuple((name, tuple(tf.nest.flatten(s))) for name, s in sorted(specs.items()))
            context = (kind, shapes, self._state())
            key = (static_key(static),) + context
            self._note_variant((_kinds(static),) + context, key, static)
            function = self._function(key, impl, static, specs)
            if recorded:
                return impl(args, static) if self._op_by_op(args) else function(args)
            concrete = self._concrete(key, function, args)
            with compat.unrecorded():
                return _as_value(concrete(args))

        return call

    def _op_by_op(self, args: dict) -> bool:
        """Whether a recorded call runs op by op: eagerly, under a tape that may take a
        second derivative (see `get`)."""
        return tf.executing_eagerly() and compat.second_order_recording(
            tf.nest.flatten(args), self._variables()
        )

    def _refuse_forward_mode(self, kind: str, args: dict, allowed: bool) -> dict:
        """`args`, unless a ForwardAccumulator watches them and forward mode is not `allowed`."""
        if not allowed and compat.forward_accumulating(tf.nest.flatten(args), self._variables()):
            raise NotImplementedError(
                f"forward-mode differentiation (tf.autodiff.ForwardAccumulator) through the "
                f"chain's {kind} is not supported: its compiled time loops and chunk loops have "
                "no forward-mode rule. Use reverse mode (tf.GradientTape); a Jacobian-vector "
                "product is the gradient of a gradient, taken with two nested tapes."
            )
        return args

    def _function(self, key, impl, static, specs):
        with self._lock:
            function = self._functions.get(key)
            if function is not None:
                self._functions.move_to_end(key)
                return function
            # The loops are explicit tf.while_loops: AutoGraph has nothing to convert, and
            # converting the Keras layers and user functions inside only gets in the way.
            function = tf.function(
                lambda a: impl(a, static), input_signature=[specs], autograph=False
            )
            self._functions[key] = function
            self._compiled += 1
            if len(self._functions) > MAX_FUNCTIONS:
                dropped_key, dropped = self._functions.popitem(last=False)
                self._concretes.pop(dropped_key, None)
                self._dropped_traces += dropped.experimental_get_tracing_count()
        if self._compiled == MANY_COMPILES:
            warnings.warn(
                f"this chain has compiled {MANY_COMPILES} functions: each new loss_fn "
                "that is not an equal Keras loss (a lambda made inside a loop, say), "
                "new dtype or new feature size costs a trace. Create loss_fn once and "
                "pass the same object every call.",
                stacklevel=5,
            )
        return function

    def _concrete(self, key, function, args):
        """The concrete function of `function` for `args`, kept per key where it is one per
        key: eagerly, outside a tf.distribute strategy (whose replicas trace one each, on
        their own devices and variables)."""
        keep = tf.executing_eagerly() and not tf.distribute.has_strategy()
        concrete = self._concretes.get(key) if keep else None
        if concrete is None:
            concrete = compat.traced_off_tape(lambda: function.get_concrete_function(args))
            with self._lock:  # not for a function the LRU dropped meanwhile
                if keep and self._functions.get(key) is function:
                    self._concretes[key] = concrete
        return concrete

    def _note_variant(self, variant, key, static) -> None:
        """Warns, once, when a static value of a kind traced before comes with other values:
        a loss made anew with another setting each call retraces every call."""
        with self._lock:
            last = self._variants.get(variant)
            self._variants[variant] = key
            if last is None or last == key or self._warned:
                return
            self._warned = True
        names = [
            getattr(v, "__name__", type(v).__name__)
            for v in tf.nest.flatten(static)
            if kind_of(v) is not None
        ]
        warnings.warn(
            f"loss_fn ({', '.join(names)}) is of the kind traced before but with "
            "other values (another setting, or another value it closes over): each "
            "new value traces the chain again (about a second) and keeps memory "
            "that TensorFlow does not give back. Put what changes in a tf.Variable "
            "that loss_fn reads, and pass the same loss_fn every call.",
            stacklevel=5,
        )

    @property
    def trace_count(self) -> int:
        with self._lock:
            return self._dropped_traces + sum(
                f.experimental_get_tracing_count() for f in self._functions.values()
            )


def _as_value(result):
    """An unrecorded call's result. In a user's graph the call is an op that a backward of the
    whole function would walk into (and fail on the branches that take gradients inside),
    so there its outputs are cut off as values, as tapes do not see the call eagerly."""
    if tf.executing_eagerly():
        return result
    return tf.nest.map_structure(lambda t: t if t is None else tf.stop_gradient(t), result)

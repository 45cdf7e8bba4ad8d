"""Input checks run in Python before anything is traced, with messages that say
what was expected, what arrived and how to fix it. A message lives here as a constant only when
more than one module raises it."""

import difflib
import functools
import inspect
import numbers

import tensorflow as tf

from tbptt._src.core import compat

INPUTS_RANK_MSG = (
    "inputs must have shape [batch, time, features] (rank 3), got shape {shape}. "
    "One sequence [time, features] needs a batch axis: x[None]; a batch of "
    "one-feature sequences [batch, time] needs a feature axis: x[..., None]."
)
CHAIN_MSG = "chain must be a tbptt.RecurrentChain (or StatefulGRUChain), got {value!r}."
COMPILED_GRAPH_MSG = (
    "backend='graph' runs tf.gradients, which needs a graph: leave "
    "compiled=True, or use backend='eager' with compiled=False to debug."
)


def outside_xla(what: str, fix: str) -> None:
    """Refuses `what` inside a function that XLA compiles as a whole (`jit_compile=True`),
    which cannot run it and would leave it out (an assertion) or fail deep inside XLA."""
    if compat.in_xla_context():
        raise ValueError(
            f"{what} cannot run inside a function compiled with XLA "
            f"(jit_compile=True): {fix} The chain's own time loops are compiled "
            "with XLA already, so jit_compile=False costs little."
        )


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value, hint: str = "") -> int:
    if not is_int(value) or value < 1:
        raise (TypeError if not is_int(value) else ValueError)(
            f"{name} must be a positive int, got {value!r}{hint}."
        )
    return int(value)


def positive_ints(name: str, value, example: str = "") -> tuple:
    """A positive int or a non-empty sequence of them, as a tuple."""
    message = f"{name} must be a positive int or a non-empty sequence of them, got {value!r}."
    if example:
        message += f" For example {example}."
    values = (value,) if is_int(value) else value
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(message) from None
    if not values or not all(is_int(v) and v > 0 for v in values):
        raise ValueError(message)
    return tuple(int(v) for v in values)


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.{hint}")
    return value


def as_tensor(name: str, value, dtype=None) -> tf.Tensor:
    """`value` as a tensor; floating values are cast to `dtype` (when given)."""
    if isinstance(value, (tf.RaggedTensor, tf.SparseTensor)):
        raise TypeError(
            f"{name} is a {type(value).__name__}: pad it to a dense [batch, time, "
            "...] tensor (value.to_tensor()) and pass mask=... ([B, T], False on "
            "the padding)."
        )
    try:
        tensor = tf.convert_to_tensor(value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name} must be a tensor or array, got {type(value).__name__}: {error}"
        ) from None
    if dtype is not None and tensor.dtype.is_floating and tensor.dtype != dtype:
        tensor = tf.cast(tensor, dtype)
    return tensor


def _shape(value):
    return value.shape.as_list() if value.shape.rank is not None else None


def _leading_dims_differ(expected: list, got) -> bool:
    """Whether `got` lacks `expected`'s leading dims (unknown dims match anything)."""
    return (
        got is None
        or len(got) < len(expected)
        or any(e is not None and g is not None and e != g for e, g in zip(expected, got))
    )


def sequence_inputs(inputs, dtype, embedded: bool = False) -> tf.Tensor:
    """inputs as a [B, T, F] tensor of `dtype`; with an inputs layer (`embedded`), [B, T, ...]
    as given (token ids stay integers; floats are cast to `dtype`)."""
    inputs = as_tensor("inputs", inputs)
    if embedded:
        if inputs.shape.rank is None or inputs.shape.rank < 2:
            raise ValueError(
                f"inputs must have shape [batch, time, ...] (the inputs layer maps "
                f"each step), got shape {_shape(inputs)}."
            )
    elif inputs.shape.rank == 2 and inputs.dtype.is_integer:
        raise ValueError(
            f"inputs of shape {_shape(inputs)} and dtype {inputs.dtype.name} look "
            "like token ids [batch, time]: give the chain an inputs layer that "
            "embeds them, RecurrentChain(cells, inputs_layer=keras.layers."
            "Embedding(vocabulary, width), ...), rather than x[..., None] (which "
            "would train on the ids as numbers)."
        )
    elif inputs.shape.rank != 3:
        raise ValueError(INPUTS_RANK_MSG.format(shape=_shape(inputs)))
    if inputs.shape[1] == 0:
        raise ValueError(
            f"inputs must have at least one time step, got shape {_shape(inputs)}. "
            "Skip empty sequences before the call (there is nothing to train on)."
        )
    if not (inputs.dtype.is_floating or inputs.dtype.is_integer):
        raise TypeError(
            f"inputs must hold numbers (a float or int dtype), got dtype "
            f"{inputs.dtype.name}. Encode text or categories as numbers first (ids "
            "into a keras.layers.Embedding, say)."
        )
    if embedded and inputs.dtype.is_integer:
        return inputs
    return tf.cast(inputs, dtype) if inputs.dtype != dtype else inputs


def per_step(name: str, value, inputs: tf.Tensor, dtype) -> tf.Tensor:
    """targets or sample_weight: a tensor (or the TensorSpec of a chunk source) whose leading
    dims are inputs' [B, T]."""
    if not isinstance(value, tf.TensorSpec):
        value = as_tensor(name, value, dtype)
    if value.dtype.is_complex or not (
        value.dtype.is_floating or value.dtype.is_integer or value.dtype == tf.bool
    ):
        raise TypeError(
            f"{name} must hold real numbers, got dtype {value.dtype.name}. Split "
            "complex values into real and imaginary features (tf.math.real, "
            "tf.math.imag) or encode them as numbers first."
        )
    expected = inputs.shape[:2].as_list()
    if _leading_dims_differ(expected, _shape(value)):
        raise ValueError(
            f"{name} must share [batch, time] = {expected} with inputs (one entry "
            f"per row and step), got shape {_shape(value)}. Slice or pad {name} to "
            "the inputs' batch and steps."
        )
    return value


_FLAG_MEANING = {
    "reset": "start from a zero state before this step",
    "mask": "a real step, False = padding",
}


def step_flags(name: str, value, inputs) -> tf.Tensor:
    """reset or mask: a ``[B, T]`` bool tensor matching inputs' [B, T]."""
    value = as_tensor(name, value)
    if not (value.dtype == tf.bool or value.dtype.is_integer):
        raise TypeError(f"{name} must be bool (or 0/1 integers), got dtype {value.dtype.name}.")
    expected, got = inputs.shape[:2].as_list(), _shape(value)
    if got is None or len(got) != 2 or _leading_dims_differ(expected, got):
        raise ValueError(
            f"{name} must have shape [batch, time] = {expected} (one flag per row "
            f"and step, True = {_FLAG_MEANING[name]}), got shape {got}."
        )
    return value if value.dtype == tf.bool else tf.not_equal(value, 0)


def state_leaves(name: str, state, leaf_shapes, batch) -> list:
    """The flat tensors of a state nest, checked against the chain's state shapes."""
    leaves = tf.nest.flatten(state)
    if len(leaves) != len(leaf_shapes):
        raise ValueError(
            f"{name} must be a nest of {len(leaf_shapes)} tensors (one entry per "
            "layer, a tuple for multi-part states such as LSTM's (h, c)), got "
            f"{len(leaves)} tensors. Use chain.initial_state(batch_size) for the "
            "structure."
        )
    checked = []
    for index, (leaf, shape) in enumerate(zip(leaves, leaf_shapes)):
        leaf = as_tensor(f"{name}[{index}]", leaf)
        expected, got = [batch] + list(shape), _shape(leaf)
        if _leading_dims_differ(expected, got) or len(got) != len(expected):
            raise ValueError(
                f"{name}: entry {index} must have shape {expected} (batch size of "
                f"the inputs, state width of its cell), got {got}."
            )
        checked.append(leaf)
    return checked


def batch_like(name: str, value, x: tf.Tensor) -> tf.Tensor:
    """`value` as a tensor whose leading (batch) dim is x's."""
    value = as_tensor(name, value)
    if value.shape.rank == 0 or (
        value.shape.rank is not None
        and None not in (value.shape[0], x.shape[0])
        and value.shape[0] != x.shape[0]
    ):
        raise ValueError(
            f"{name} must have x's batch size {x.shape[0]} first (shape "
            f"[{x.shape[0]}, ...]), got shape {_shape(value)}. Pass the rows that "
            "go with x."
        )
    return value


def loss_function(loss_fn, with_weight: bool = False):
    """`loss_fn` if it is callable with (y_true, y_pred), and a sample weight when `with_weight`
    (when its signature can be read: Keras losses, functions, lambdas)."""
    if not callable(loss_fn):
        raise TypeError(
            "loss_fn must be callable as loss_fn(y_true_chunk, y_pred_chunk[, "
            f"sample_weight_chunk]) -> scalar, got {loss_fn!r}."
        )
    args = (None, None, None) if with_weight else (None, None)
    # A Keras loss's signature is its class's: read once per class (reading it costs a
    # small share of a small call); any other callable's (a function, a partial, a
    # tf.function, an object) each time, as it is.
    signature = (
        _call_signature(type(loss_fn))  # type: ignore[arg-type]  # a class is hashable
        if isinstance(loss_fn, compat.keras.losses.Loss)
        else _signature(loss_fn)
    )
    if signature is None:  # some builtins and C callables have none
        return loss_fn
    try:
        signature.bind(*args)
    except TypeError:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        fix = (
            "A sample_weight or mask is passed as the third argument: take it, or leave them out."
            if with_weight
            else "Give it the signature loss_fn(y_true, y_pred[, sample_weight])."
        )
        weight = ", sample_weight" if with_weight else ""
        raise TypeError(
            f"loss_fn must accept {len(args)} positional arguments (y_true, "
            f"y_pred{weight}), but {name}{signature} does not. {fix}"
        ) from None
    return loss_fn


@functools.lru_cache(maxsize=64)
def _call_signature(kind: type):
    """The signature of calling an instance of `kind` (its `__call__` without self)."""
    signature = _signature(kind.__call__)
    if signature is None or not signature.parameters:
        return signature
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def _signature(fn):
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def scalar_loss(loss: tf.Tensor) -> tf.Tensor:
    if loss is None or isinstance(loss, dict):
        raise TypeError(
            f"loss_fn must return a scalar tensor per chunk, got "
            f"{type(loss).__name__}. Return the total, e.g. tf.reduce_sum of the "
            "per-step losses."
        )
    loss = tf.convert_to_tensor(loss)
    if not loss.dtype.is_floating:
        raise TypeError(
            f"loss_fn must return a float scalar (the value to differentiate), got "
            f"dtype {loss.dtype.name}: an integer loss has no gradient. Compute it "
            "in floats, e.g. tf.cast(..., tf.float32)."
        )
    if loss.shape.rank != 0:
        raise ValueError(
            f"loss_fn must return a scalar per chunk, got shape {_shape(loss)}. "
            "Reduce it, e.g. with tf.reduce_sum or a Keras loss with its default "
            "reduction."
        )
    return loss


# -- non-finite values (check_numerics) ------------------------------------------------------------


class NonFiniteError(FloatingPointError):
    """A NaN or Inf found by `check_numerics=True`.

    Attributes:
      kind: what first went non-finite: "state", "loss", "state_grad" (the carried
        dLoss/dstate) or "grads" (a chunk's weight gradients).
      index: the chunk (or stage) where it appeared.
      findings: every kind found, mapped to the chunk where it first appeared.
    """

    def __init__(self, message: str, kind: str, index: int, findings: dict):
        super().__init__(message)
        self.kind, self.index, self.findings = kind, index, findings


# What check_numerics watches, in the order of a chain's findings: the carried value (a state,
# or a stage's activation), a loss, the carried dLoss/d(value), the weight gradients. A
# non-finite state poisons everything after it and a non-finite loss everything it feeds, so
# the first kind found is the cause to report.
NUMERICS_KINDS = ("state", "loss", "state_grad", "grads")
_NUMERICS_WHAT = {
    "state": "the {carried} carried out of {unit} {index}{steps}",
    "loss": "the loss of {unit} {index}{steps}",
    "state_grad": "dLoss/d{carried} carried back out of {unit} {index}{steps}",
    "grads": "the weight gradients of {unit} {index}{steps}",
}
_NUMERICS_HINT = {
    "state": (
        "The {unit}s before it were finite: look at its inputs (np.isfinite), and at the "
        "weights (a learning rate too high makes them diverge)."
    ),
    "loss": (
        "The {carried} entering it is finite: look at the targets and the loss function there "
        "(log of 0, division by 0, a sample_weight with NaN)."
    ),
    "state_grad": (
        "Every {carried} and loss is finite, so the gradient overflowed: a derivative "
        "that is infinite at a finite point (sqrt at 0, say), or gradients that "
        "explode going back (clip them, or truncate with fewer backprop_chunks)."
    ),
    "grads": (
        "Every {carried}, loss and carried gradient is finite: a weight gradient of this "
        "{unit} overflowed (a derivative that is infinite at a finite point)."
    ),
}


def raise_if_non_finite(
    found, *, unit: str = "chunk", carried: str = "state", chunk_size=None, steps=None
) -> None:
    """Raises NonFiniteError for the findings `found` ([4] ints, -1 = none) of a chain.

    Args:
      found: per kind of NUMERICS_KINDS, the first chunk (or stage) with a non-finite value.
      unit, carried: "chunk" and "state", or "stage" and "activation", for the message.
      chunk_size: steps per chunk, to name the steps of the chunk (None: not named).
      steps: T, where the last chunk ends.
    """
    findings = {
        name: int(index) for name, index in zip(NUMERICS_KINDS, list(found)) if int(index) >= 0
    }
    if not findings:
        return
    kind = next(name for name in NUMERICS_KINDS if name in findings)
    index = findings[kind]
    last = None if chunk_size is None else (index + 1) * chunk_size - 1
    if last is not None and steps is not None:
        last = min(last, steps - 1)
    steps = "" if last is None else f" (steps {index * chunk_size} to {last})"
    what = _NUMERICS_WHAT[kind].format(unit=unit, carried=carried, index=index, steps=steps)
    hint = _NUMERICS_HINT[kind].format(unit=unit, carried=carried)
    first = ", ".join(f"{name} at {unit} {i}" for name, i in findings.items())
    message = f"check_numerics: NaN or Inf in {what}. {hint} First appearance of each: {first}."
    raise NonFiniteError(message, kind, index, findings)


def assert_finite_in_graph(found, tensors, *, unit: str = "chunk"):
    """Inside a graph: `tensors` made to depend on an assertion that `found` holds no finding
    (tf.errors.InvalidArgumentError naming the indices when the graph runs)."""
    message = (
        f"check_numerics: NaN or Inf found. The {unit} index where each first appeared "
        "(-1 = none) for (state, loss, dLoss/dstate, weight gradients):"
    )
    check = tf.debugging.Assert(
        tf.reduce_all(found < 0), [message, found], summarize=len(NUMERICS_KINDS)
    )
    with tf.control_dependencies([check]):
        return tf.nest.map_structure(tf.identity, tensors)


def report_non_finite(
    found, tensors, *, unit: str = "chunk", carried: str = "state", chunk_size=None, steps=None
):
    """What check_numerics found, reported: executing eagerly, NonFiniteError; while building a
    graph, `tensors` made to depend on an assertion. Returns `tensors`."""
    if not tf.executing_eagerly():
        return assert_finite_in_graph(found, tensors, unit=unit)
    raise_if_non_finite(
        found.numpy(),
        unit=unit,
        carried=carried,
        chunk_size=None if chunk_size is None else int(chunk_size),
        steps=steps,
    )
    return tensors

"""Input checks run in Python before anything is traced, with messages that say
what was expected, what arrived and how to fix it."""

import difflib
import inspect
import numbers

import tensorflow as tf

MODES = ("exact", "truncated")
REDUCTIONS = ("sum", "mean")

BOOL_MSG = "{name} must be True or False, got {value!r}."
CHOICE_MSG = "{name} must be one of {choices}, got {value!r}.{hint}"
POSITIVE_INT_MSG = "{name} must be a positive int, got {value!r}{hint}."
INPUTS_RANK_MSG = ("inputs must have shape [batch, time, features] (rank 3), got shape {shape}. "
                   "Add a time axis with x[:, None, :] or a feature axis with x[..., None].")
EMPTY_TIME_MSG = ("inputs must have at least one time step, got shape {shape}. Skip empty "
                  "sequences before the call (there is nothing to train on).")
INPUTS_DTYPE_MSG = ("inputs must hold numbers (a float or int dtype), got dtype {dtype}. Encode "
                    "text or categories as numbers first (ids into a keras.layers.Embedding, "
                    "say).")
LEADING_DIMS_MSG = ("{name} must share [batch, time] = {expected} with inputs (one entry per "
                    "row and step), got shape {shape}. Slice or pad {name} to the inputs' batch "
                    "and steps.")
STEP_FLAGS_MSG = ("{name} must have shape [batch, time] = {expected} (one flag per row and step, "
                  "True = {meaning}), got shape {shape}.")
STEP_FLAGS_DTYPE_MSG = ("{name} must be bool (or 0/1 integers), got dtype {dtype}.")
FEATURES_MSG = ("inputs must have {expected} features (the chain was built for that), got shape "
                "{shape}. Make a new chain for a different feature size.")
STATE_LEAVES_MSG = ("{name} must be a nest of {expected} tensors (one entry per layer, a tuple "
                    "for multi-part states such as LSTM's (h, c)), got {got} tensors. Use "
                    "chain.initial_state(batch_size) for the structure.")
STATE_SHAPE_MSG = ("{name}: entry {index} must have shape {expected} (batch size of the inputs, "
                   "state width of its cell), got {shape}.")
LOSS_FN_MSG = ("loss_fn must be callable as loss_fn(y_true_chunk, y_pred_chunk[, "
               "sample_weight_chunk]) -> scalar, got {value!r}.")
STAGE_INPUT_MSG = ("x must have a batch axis first (shape [batch, ...]), got a scalar (shape "
                   "{shape}).")
BATCH_MSG = ("{name} must have x's batch size {batch} first (shape [{batch}, ...]), got shape "
             "{shape}. Pass the rows that go with x.")
LOSS_ARITY_MSG = ("loss_fn must accept {expected} positional arguments (y_true, y_pred{weight}), "
                  "but {name}{signature} does not. {fix}")
LOSS_SCALAR_MSG = ("loss_fn must return a scalar per chunk, got shape {shape}. Reduce it, e.g. "
                   "with tf.reduce_sum or a Keras loss with its default reduction.")
BACKPROP_CHUNKS_EXACT_MSG = ("backprop_chunks={value} only applies to mode='truncated'; "
                             "mode='exact' back-propagates through every chunk. Pass "
                             "mode='truncated' or leave backprop_chunks at 1.")
FINAL_GRAD_DROPPED_MSG = ("final_state_grad would be dropped at the first cut with "
                          "mode='truncated', backprop_chunks=1. Use backprop_chunks >= 2 to carry "
                          "it back, mode='exact', or pass None.")
DROPOUT_MSG = ("cell {index} ({cell}) has dropout={dropout} / recurrent_dropout={recurrent}: "
               "the backward pass recomputes each chunk, and Keras would draw new dropout masks "
               "there, so the gradient would belong to a different function. Use cells without "
               "dropout and put dropout in the head, which runs once per chunk.")
DTYPE_BUILT_MSG = ("{what} is already built in {got}, but the chain computes in {expected}. "
                   "Pass an unbuilt layer, or leave dtype=None to use the layer's dtype.")
UNITS_MSG = ("units must be a positive int or a non-empty sequence of them, got {value!r}. "
             "For example units=64, or units=(64, 32) for two stacked layers.")
CELLS_MSG = ("cells must be a non-empty sequence of RNN cells (each with `state_size` and "
             "call(inputs, states) -> (output, new_states)), got {value!r}.")
CELL_MSG = ("cells[{index}] must be an RNN cell with `state_size` that is callable as "
            "cell(inputs, states) -> (output, new_states), got {value!r}.")
HEAD_MSG = "head must be a Keras layer or a callable, got {value!r}."
COMPILED_GRAPH_MSG = ("backend='graph' runs tf.gradients, which needs a graph: leave "
                      "compiled=True, or use backend='eager' with compiled=False to debug.")
CHUNK_SIZE_MSG = ("chunk_size must be a positive int (time steps per chunk) or 'auto', got "
                  "{value!r}. For example chunk_size=100, or 'auto' for about sqrt(T).")
LEVELS_MSG = "levels must be 1 or 2, got {value!r}."
LEVELS_TRUNCATED_MSG = ("levels=2 only applies to mode='exact'; mode='truncated' keeps at most "
                        "backprop_chunks chunks alive already. Leave levels at 1.")
MEMORY_BUDGET_MSG = ("memory_budget={budget} bytes is too small for T={steps}: the least this "
                     "chunking keeps alive is about {least} bytes (chunk_size={size}). Raise "
                     "the budget{hint} or feed a shorter sequence per call.")
MEMORY_BUDGET_TYPE_MSG = ("memory_budget must be a positive number of bytes (or None), got "
                          "{value!r}.")
BUDGET_NEEDS_AUTO_MSG = ("memory_budget only applies with chunk_size='auto'; got chunk_size="
                         "{value!r}. Pass chunk_size='auto' or drop memory_budget.")
AUTO_UNKNOWN_TIME_MSG = ("chunk_size='auto' picks the chunk size from the sequence length, which "
                         "is unknown here (inputs of shape {shape} inside a tf.function). Give "
                         "the inputs a static time dimension or pass an int chunk_size.")


def chunk_size(value):
    """A positive int or "auto"."""
    if value == "auto":
        return value
    if is_int(value) and value >= 1:
        return int(value)
    raise (ValueError if is_int(value) or isinstance(value, str) else TypeError)(
        CHUNK_SIZE_MSG.format(value=value))


def memory_budget(value, chunk):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise (ValueError if isinstance(value, numbers.Real) and not isinstance(value, bool)
               else TypeError)(MEMORY_BUDGET_TYPE_MSG.format(value=value))
    if chunk != "auto":
        raise ValueError(BUDGET_NEEDS_AUTO_MSG.format(value=chunk))
    return float(value)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value, hint: str = "") -> int:
    if not is_int(value) or value < 1:
        raise (TypeError if not is_int(value) else ValueError)(
            POSITIVE_INT_MSG.format(name=name, value=value, hint=hint))
    return int(value)


def choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(CHOICE_MSG.format(name=name, choices=choices, value=value, hint=hint))
    return value


def as_tensor(name: str, value, dtype=None) -> tf.Tensor:
    """`value` as a tensor; floating values are cast to `dtype` (when given)."""
    try:
        tensor = tf.convert_to_tensor(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a tensor or array, got {type(value).__name__}: "
                        f"{error}") from None
    if dtype is not None and tensor.dtype.is_floating and tensor.dtype != dtype:
        tensor = tf.cast(tensor, dtype)
    return tensor


def sequence_inputs(inputs, dtype) -> tf.Tensor:
    """inputs as a [B, T, F] tensor of `dtype`."""
    inputs = as_tensor("inputs", inputs)
    if inputs.shape.rank != 3:
        raise ValueError(INPUTS_RANK_MSG.format(shape=inputs.shape.as_list()
                                                if inputs.shape.rank is not None else None))
    if inputs.shape[1] == 0:
        raise ValueError(EMPTY_TIME_MSG.format(shape=inputs.shape.as_list()))
    if not (inputs.dtype.is_floating or inputs.dtype.is_integer):
        raise TypeError(INPUTS_DTYPE_MSG.format(dtype=inputs.dtype.name))
    return tf.cast(inputs, dtype) if inputs.dtype != dtype else inputs


def per_step(name: str, value, inputs: tf.Tensor, dtype) -> tf.Tensor:
    """targets or sample_weight: a tensor (or the TensorSpec of a chunk source) whose leading
    dims are inputs' [B, T]."""
    if not isinstance(value, tf.TensorSpec):
        value = as_tensor(name, value, dtype)
    expected = inputs.shape[:2].as_list()
    if value.shape.rank is None or value.shape.rank < 2 or any(
            e is not None and g is not None and e != g
            for e, g in zip(expected, value.shape[:2].as_list())):
        raise ValueError(LEADING_DIMS_MSG.format(name=name, expected=expected,
                                                 shape=value.shape.as_list()))
    return value


_FLAG_MEANING = {"reset": "start from a zero state before this step",
                 "mask": "a real step, False = padding"}


def step_flags(name: str, value, inputs) -> tf.Tensor:
    """reset or mask: a ``[B, T]`` bool tensor matching inputs' [B, T]."""
    value = as_tensor(name, value)
    if not (value.dtype == tf.bool or value.dtype.is_integer):
        raise TypeError(STEP_FLAGS_DTYPE_MSG.format(name=name, dtype=value.dtype.name))
    expected = inputs.shape[:2].as_list()
    got = value.shape.as_list() if value.shape.rank is not None else None
    if got is None or len(got) != 2 or any(
            e is not None and g is not None and e != g for e, g in zip(expected, got)):
        raise ValueError(STEP_FLAGS_MSG.format(name=name, expected=expected, shape=got,
                                               meaning=_FLAG_MEANING[name]))
    return value if value.dtype == tf.bool else tf.not_equal(value, 0)


def state_leaves(name: str, state, leaf_shapes, batch) -> list:
    """The flat tensors of a state nest, checked against the chain's state shapes."""
    leaves = tf.nest.flatten(state)
    if len(leaves) != len(leaf_shapes):
        raise ValueError(STATE_LEAVES_MSG.format(name=name, expected=len(leaf_shapes),
                                                 got=len(leaves)))
    checked = []
    for index, (leaf, shape) in enumerate(zip(leaves, leaf_shapes)):
        leaf = as_tensor(f"{name}[{index}]", leaf)
        expected = [batch] + list(shape)
        got = leaf.shape.as_list() if leaf.shape.rank is not None else None
        if got is None or len(got) != len(expected) or any(
                e is not None and g is not None and e != g for e, g in zip(expected, got)):
            raise ValueError(STATE_SHAPE_MSG.format(name=name, index=index, expected=expected,
                                                    shape=got))
        checked.append(leaf)
    return checked


def batch_like(name: str, value, x: tf.Tensor) -> tf.Tensor:
    """`value` as a tensor whose leading (batch) dim is x's."""
    value = as_tensor(name, value)
    if value.shape.rank == 0 or (value.shape.rank is not None and None not in (
            value.shape[0], x.shape[0]) and value.shape[0] != x.shape[0]):
        raise ValueError(BATCH_MSG.format(name=name, batch=x.shape[0],
                                          shape=value.shape.as_list()))
    return value


def loss_function(loss_fn, with_weight: bool = False):
    """`loss_fn` if it is callable with (y_true, y_pred), and a sample weight when `with_weight`
    (when its signature can be read: Keras losses, functions, lambdas)."""
    if not callable(loss_fn):
        raise TypeError(LOSS_FN_MSG.format(value=loss_fn))
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # some builtins and C callables have none
        return loss_fn
    args = (None, None, None) if with_weight else (None, None)
    try:
        signature.bind(*args)
    except TypeError:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        fix = ("A sample_weight or mask is passed as the third argument: take it, or leave "
               "them out." if with_weight else "Give it the signature "
               "loss_fn(y_true, y_pred[, sample_weight]).")
        raise TypeError(LOSS_ARITY_MSG.format(
            expected=len(args), weight=", sample_weight" if with_weight else "", name=name,
            signature=signature, fix=fix)) from None
    return loss_fn


def scalar_loss(loss: tf.Tensor) -> tf.Tensor:
    loss = tf.convert_to_tensor(loss)
    if loss.shape.rank != 0:
        raise ValueError(LOSS_SCALAR_MSG.format(shape=loss.shape.as_list()
                                                if loss.shape.rank is not None else None))
    return loss


def units_tuple(units) -> tuple:
    values = (units,) if is_int(units) else units
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(UNITS_MSG.format(value=units)) from None
    if not values or not all(is_int(u) and u > 0 for u in values):
        raise ValueError(UNITS_MSG.format(value=units))
    return tuple(int(u) for u in values)




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


# In the order of chain.NUMERICS_KINDS. A non-finite state poisons everything after it and a
# non-finite loss everything it feeds, so the first kind found is the cause to report.
NUMERICS_NAMES = ("state", "loss", "state_grad", "grads")
_NUMERICS_WHAT = {
    "state": "the {carried} carried out of {unit} {index}{steps}",
    "loss": "the loss of {unit} {index}{steps}",
    "state_grad": "dLoss/d{carried} carried back out of {unit} {index}{steps}",
    "grads": "the weight gradients of {unit} {index}{steps}",
}
_NUMERICS_HINT = {
    "state": ("The {unit}s before it were finite: look at its inputs (np.isfinite), and at the "
              "weights (a learning rate too high makes them diverge)."),
    "loss": ("The {carried} entering it is finite: look at the targets and the loss function there "
             "(log of 0, division by 0, a sample_weight with NaN)."),
    "state_grad": ("Every {carried} and loss is finite, so the gradient overflowed: a derivative "
                   "that is infinite at a finite point (sqrt at 0, say), or gradients that "
                   "explode going back (clip them, or truncate with fewer backprop_chunks)."),
    "grads": ("Every {carried}, loss and carried gradient is finite: a weight gradient of this "
              "{unit} overflowed (a derivative that is infinite at a finite point)."),
}
NON_FINITE_MSG = ("check_numerics: NaN or Inf in {what}. {hint} First appearance of each: "
                  "{findings}.")
NON_FINITE_GRAPH_MSG = ("check_numerics: NaN or Inf found. The {unit} index where each first "
                        "appeared (-1 = none) for (state, loss, dLoss/dstate, weight gradients):")


def raise_if_non_finite(found, *, unit: str = "chunk", carried: str = "state", chunk_size=None,
                        steps=None) -> None:
    """Raises NonFiniteError for the findings `found` ([4] ints, -1 = none) of a chain.

    Args:
      found: per kind of NUMERICS_NAMES, the first chunk (or stage) with a non-finite value.
      unit, carried: "chunk" and "state", or "stage" and "activation", for the message.
      chunk_size: steps per chunk, to name the steps of the chunk (None: not named).
      steps: T, where the last chunk ends.
    """
    findings = {name: int(index) for name, index in zip(NUMERICS_NAMES, list(found))
                if int(index) >= 0}
    if not findings:
        return
    kind = next(name for name in NUMERICS_NAMES if name in findings)
    index = findings[kind]
    last = None if chunk_size is None else (index + 1) * chunk_size - 1
    if last is not None and steps is not None:
        last = min(last, steps - 1)
    steps = "" if last is None else f" (steps {index * chunk_size} to {last})"
    message = NON_FINITE_MSG.format(
        what=_NUMERICS_WHAT[kind].format(unit=unit, carried=carried, index=index, steps=steps),
        hint=_NUMERICS_HINT[kind].format(unit=unit, carried=carried),
        findings=", ".join(f"{name} at {unit} {i}" for name, i in findings.items()))
    raise NonFiniteError(message, kind, index, findings)


def assert_finite_in_graph(found, tensors, *, unit: str = "chunk"):
    """Inside a graph: `tensors` made to depend on an assertion that `found` holds no finding
    (tf.errors.InvalidArgumentError naming the indices when the graph runs)."""
    check = tf.debugging.Assert(tf.reduce_all(found < 0),
                                [NON_FINITE_GRAPH_MSG.format(unit=unit), found],
                                summarize=len(NUMERICS_NAMES))
    with tf.control_dependencies([check]):
        return tf.nest.map_structure(tf.identity, tensors)

"""What the library needs of TensorFlow and Keras beyond their public, stable API, in one
place: the switches between Keras 3 (TF >= 2.16) and Keras 2 (TF 2.15), and every private name
(each with the reason no public one serves)."""

import contextlib
import inspect
import os
import threading

import tensorflow as tf

# The device an eager call is placed on (`tf.device` in eager mode keeps no public stack).
from tensorflow.python.eager import context as _context

# Whether a ForwardAccumulator watches a tensor (the public API only gives a tensor's JVP).
from tensorflow.python.eager import forwardprop_util as _forwardprop_util

# Pauses every tape of the thread; the public `GradientTape.stop_recording` pauses one tape,
# and the chain does not hold the user's.
from tensorflow.python.eager import record as _record

# Whether the tapes recording now may take a second derivative (what tf.function asks itself
# before a call), and the marking of variables as read that comes before that question.
from tensorflow.python.eager import tape as _tape

# TensorFlow's own test for an XLA cluster being built (what tf.while_loop asks); no public API
# says whether the graph being traced is compiled by XLA as a whole.
# A concrete function with its variables as constants: what TensorFlow Lite's converter does to
# the functions it is given, except that it keeps variables its analysis cannot prove constant
# (those read inside the chain's nested functions), which a device would read uninitialized.
from tensorflow.python.framework import convert_to_constants as _convert_to_constants
from tensorflow.python.ops import control_flow_util as _control_flow_util
from tensorflow.python.ops import gradients_util as _gradients_util

_BACKEND_MSG = (
    "tbptt runs on TensorFlow, but Keras is set to the {backend!r} backend (the "
    "KERAS_BACKEND environment variable or ~/.keras/keras.json). Set "
    "KERAS_BACKEND=tensorflow before importing keras and tbptt."
)

try:  # Keras 3, or Keras 2 as the standalone package that TF 2.15 ships.
    import keras
except ImportError as error:  # pragma: no cover - every supported TF install has one.
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        raise ImportError(_BACKEND_MSG.format(backend=os.environ["KERAS_BACKEND"])) from error
    keras = tf.keras

KERAS_MAJOR = int(keras.__version__.split(".")[0])

if KERAS_MAJOR >= 3 and keras.backend.backend() != "tensorflow":
    raise ImportError(_BACKEND_MSG.format(backend=keras.backend.backend()))


def is_keras_layer(obj) -> bool:
    """True for a Keras layer of either Keras version (tf.keras included)."""
    return isinstance(obj, keras.layers.Layer) or isinstance(obj, tf.keras.layers.Layer)


def stateless_step(cell, training: bool):
    """``step(x, states, weights) -> (output, new states)``: a Keras 3 cell run on its weights
    given as tensors (`Layer.stateless_call`, in the order of `cell.trainable_variables`), or
    None for a cell that cannot be run so, step after step and again: Keras 2 and tf.keras
    cells, plain callables, cells with non-trainable state (moving statistics; a seed
    generator, unless it only serves a dropout that is off), and cells whose variables are kept
    in another dtype than they compute in (mixed precision: `stateless_call` skips the cast
    that `__call__` makes)."""
    if KERAS_MAJOR < 3 or not isinstance(cell, keras.layers.Layer) or not cell.built:
        return None
    if not cell.trainable_variables or not _only_idle_seeds(cell):
        return None
    if any(tf.as_dtype(v.dtype) != compute_dtype(cell) for v in cell.trainable_variables):
        return None
    keywords = {"training": training} if "training" in _parameters(cell.call) else {}

    def step(x, states, weights):
        seeds = [tf.convert_to_tensor(v) for v in cell.non_trainable_variables]  # unchanged
        (output, new_states), _ = cell.stateless_call(
            list(weights), seeds, x, list(states), **keywords
        )
        return output, tf.nest.flatten(new_states)

    return step


def _only_idle_seeds(cell) -> bool:
    """Whether the cell's only non-trainable variables are the states of its seed generators,
    and those serve only dropouts that are off (Keras's cells keep one for their dropout)."""
    states = {id(g.state) for g in vars(cell).values() if isinstance(g, keras.random.SeedGenerator)}
    if any(id(v) not in states for v in cell.non_trainable_variables):
        return False
    return not states or (
        getattr(cell, "dropout", None) == 0 and getattr(cell, "recurrent_dropout", None) == 0
    )


def _parameters(fn) -> tuple:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()


def tf_variable(variable):
    """The `tf.Variable` behind a Keras 3 variable; any other variable as it is.

    `tf.gradients` differentiates with respect to `tf.Variable` handles only, while Keras 3
    wraps each one in its own `keras.Variable`.
    """
    inner = getattr(variable, "value", None)
    return inner if isinstance(inner, tf.Variable) else variable


def trainable_variables_of(obj) -> list:
    """The trainable variables of a Keras layer, a `tf.Module` or a plain callable."""
    variables = getattr(obj, "trainable_variables", None)
    if variables is None:
        variables = getattr(obj, "trainable_weights", None)
    return list(variables or [])


def compute_dtype(layer):
    """The dtype a Keras layer computes in, or None where it does not say."""
    dtype = getattr(layer, "compute_dtype", None) or getattr(layer, "dtype", None)
    return tf.as_dtype(dtype) if dtype is not None else None


def set_compute_dtype(layer, dtype: tf.DType) -> None:
    """Makes an unbuilt Keras layer compute and keep its variables in `dtype`."""
    if KERAS_MAJOR >= 3:
        layer.dtype_policy = dtype.name
    else:  # pragma: no cover - Keras 2 only.
        layer._set_dtype_policy(dtype.name)


def call_layer(layer, *args, training: bool):
    """Calls a Keras layer with `training`, any other callable without it."""
    if is_keras_layer(layer):
        return layer(*args, training=training)
    return layer(*args)


def check_owns_its_variables(what: str, part, run):
    """Runs `run()` (a first call of `part`) and refuses a part that reads trainable variables
    it does not list: the chain trains `part.trainable_variables`, so those would never train.
    Returns what `run()` returned. The part's non-trainable variables (moving statistics,
    Keras 3 seed generators) are restored afterwards: the check leaves the model as it was.

    What this proves: the variables this one run reads are listed. What it cannot see: a
    variable read only on other inputs or in a branch that Python takes on other values."""
    if tf.distribute.has_strategy():
        # Under a strategy a tape sees per-device copies of the variables; the check is made
        # where it can be exact, outside one.
        with left_as_it_was(part):
            return run()
    with left_as_it_was(part), tf.GradientTape(watch_accessed_variables=True) as tape:
        result = run()
    # Its own variables, frozen ones too (`layer.trainable = False`: held back on purpose).
    own = list(getattr(part, "variables", None) or []) + trainable_variables_of(part)
    listed = {id(c) for v in own for c in _components(v)}
    hidden = [
        v for v in tape.watched_variables() if v.trainable and id(tf_variable(v)) not in listed
    ]
    if hidden:
        names = ", ".join(sorted({v.name for v in hidden}))
        raise TypeError(
            f"{what} reads trainable variables that it does not list as its own ({names}): the "
            "chain trains the variables its parts list, so these would never be trained. Pass "
            "the Keras layer or tf.Module that owns them (the layer itself rather than "
            "lambda h: layer(h); several layers as keras.Sequential([...]))."
        )
    return result


def seed_states(part) -> list:
    """The states of a Keras 3 part's random seed generators: its `variables` that are not
    its `weights` (Keras lists a layer's seed generators' states in the one, not the other);
    [] for Keras 2 layers, modules and plain callables."""
    if KERAS_MAJOR < 3 or not isinstance(part, keras.layers.Layer):
        return []
    weights = {id(w) for w in part.weights}
    return [v for v in part.variables if id(v) not in weights]


def stateless_scope(mapping: list):
    """Keras 3's `StatelessScope`: inside, the variables of `mapping` read as its values and
    assignments to any variable are held in the scope, not made."""
    return keras.StatelessScope(state_mapping=mapping)


def _components(variable) -> list:
    """The `tf.Variable`s a tape may see for `variable`: itself, or for a variable made under a
    tf.distribute strategy, its copy on each device (a tape outside the strategy's scope
    watches the copy it reads)."""
    variable = tf_variable(variable)
    if isinstance(variable, tf.distribute.DistributedValues):
        return [variable] + list(variable.values)
    return [variable]


@contextlib.contextmanager
def left_as_it_was(part):
    """A context in which `part` may be probed: on leaving, its non-trainable variables
    (moving statistics, seed generators' states) are restored, and the dropout masks a Keras
    RNN cell caches on itself while it runs (Keras's RNN layer clears them after its loop) are
    cleared, so a probe leaves the user's layers as they were."""
    state = unique(_non_trainable(part) + seed_states(part))
    saved = [tf.identity(v) for v in state]
    try:
        yield
    finally:
        for variable, value in zip(state, saved):
            variable.assign(value)
        for layer in sublayers(part):
            for clear in ("reset_dropout_mask", "reset_recurrent_dropout_mask"):
                getattr(layer, clear, lambda: None)()


def _non_trainable(part) -> list:
    try:
        return list(getattr(part, "non_trainable_variables", None) or [])
    except (TypeError, ValueError):  # Keras 2: an unbuilt Sequential asks to be built first
        return []


def sublayers(layer) -> list:
    """`layer` and the layers inside it (Keras models, wrappers such as TimeDistributed,
    StackedRNNCells)."""
    found = [layer]
    for inner in (
        list(getattr(layer, "layers", None) or [])
        + [getattr(layer, "layer", None)]
        + (list(getattr(layer, "cells", None) or []))
    ):
        if inner is not None and inner is not layer:
            found.extend(sublayers(inner))
    return found


def unique(variables) -> list:
    """`variables` in order, each once (a layer shared by two parts is listed once)."""
    seen, result = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            result.append(v)
    return result


def has_own_dtype(layer) -> bool:
    """Whether a Keras layer was given a dtype policy other than the global one."""
    policy = getattr(layer, "dtype_policy", None)
    name = getattr(policy, "name", policy)
    if KERAS_MAJOR >= 3:
        default = keras.config.dtype_policy().name
    else:  # pragma: no cover - Keras 2 only.
        default = tf.keras.mixed_precision.global_policy().name
    return isinstance(name, str) and name != default


def in_xla_context() -> bool:
    """Whether the graph being built is compiled by XLA as a whole (a user's
    `tf.function(jit_compile=True)`, Keras's `jit_compile=True`)."""
    if tf.executing_eagerly():
        return False
    return bool(_control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def inbound_nodes(layer) -> list:
    """The nodes a functional model's layer is called at (which layers feed it): no public
    name lists them."""
    return list(getattr(layer, "_inbound_nodes", []))


def keras_mask(x):
    """The mask Keras attaches to a tensor (`Masking`, `Embedding(mask_zero=True)`, a loss's
    own values with `ignore_class`), or None."""
    return getattr(x, "_keras_mask", None)


def second_order_recording(tensors: list, variables: list) -> bool:
    """Whether a tape of this thread records `tensors` or `variables` so that a second
    derivative may be taken (a persistent tape, a tape inside a tape)."""
    if not _record.could_possibly_record():
        return False
    try:
        handles = [tf_variable(v) for v in variables]
        _tape.variables_accessed(handles)
        watched = [t for t in tensors if isinstance(t, tf.Tensor)] + [v.handle for v in handles]
    except ValueError:  # a distributed variable has no one handle outside a replica
        return True  # the op-by-op call is right at any order
    return (
        _gradients_util.PossibleTapeGradientTypes(watched)
        == _gradients_util.POSSIBLE_GRADIENT_TYPES_HIGHER_ORDER
    )


def forward_accumulating(tensors: list, variables: list) -> bool:
    """Whether a `tf.autodiff.ForwardAccumulator` of this thread watches any of `tensors` or
    `variables` (a tangent would have to go through what runs on them)."""
    if not _record.could_possibly_record():  # no tape and no accumulator at all
        return False
    try:
        handles = [tf_variable(v).handle for v in variables]
    except (ValueError, AttributeError):  # a distributed variable has no one handle here
        handles = []
    watched = [t for t in tensors if isinstance(t, tf.Tensor)] + handles
    return bool(watched) and bool(_forwardprop_util.pack_tangents(watched).tangents)


def quiet_function(fn, **options):
    """`tf.function(fn, **options)` without TensorFlow's warning that a function of the same
    code traces often: for what traces a few times by design (a probe per layer checked, a
    stateful model's step per carry structure and per fit/evaluate/predict); no public option
    turns that warning off."""
    function = tf.function(fn, **options)
    function._omit_frequent_tracing_warning = True
    return function


def traced_off_tape(trace):
    """`trace()` (a tf.function traced), in a thread of its own when tapes of this thread
    may record eagerly: a tape that watches the variables the trace reads records every op
    traced too, and then TensorFlow builds the gradient of every loop inside at trace time
    (minutes for a two-level chain). Tapes belong to their thread; the device scope and
    Keras's dtype policy are carried over. Inside a tf.distribute strategy, whose replica
    contexts belong to the thread, it traces here."""
    if not (tf.executing_eagerly() and _record.could_possibly_record()):
        return trace()
    if tf.distribute.has_strategy():
        return trace()
    device, outcome = _context.context().device_name, {}
    policy = keras.config.dtype_policy() if KERAS_MAJOR >= 3 else None  # Keras 2's is global

    def run():
        try:
            if policy is not None:
                keras.config.set_dtype_policy(policy)
            with tf.device(device):
                outcome["value"] = trace()
        except BaseException as error:  # raised again in the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="tbptt-trace")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def frozen(concrete_function):
    """`concrete_function` with every variable it reads as a constant (its flat outputs)."""
    return _convert_to_constants.convert_variables_to_constants_v2(concrete_function)


def unrecorded():
    """A context in which no tape of this thread records, new tapes included (so nothing may
    be traced in it that differentiates with a tape of its own)."""
    return _record.stop_recording()


# -- Keras 3 private names a Keras model of tbptt's needs (ChunkedModel), each said why ---------


def loss_tracker(model):
    """The `keras.metrics.Mean` that `fit` logs as "loss": a train_step that computes its own
    loss feeds it as Keras's own train_step does (no public name reaches it)."""
    return model._loss_tracker


def log_loss_in(model, dtype: str) -> None:
    """Logs the model's loss in `dtype`: Keras makes its loss tracker in float32, which would
    halve a float64 chain's digits. Set untracked, as Keras sets its own in `compile`."""
    object.__setattr__(model, "_loss_tracker", keras.metrics.Mean(name="loss", dtype=dtype))


def has_compiled_metrics(model) -> bool:
    """Whether `compile` was given metrics (the train step then needs the predictions)."""
    return model._compile_metrics is not None


def with_keras_mask(tensor, mask):
    """A copy of `tensor` carrying `mask` as its Keras mask (what Keras's losses and metrics
    read; Keras sets it as this attribute on TensorFlow tensors)."""
    tensor = tf.identity(tensor)
    tensor._keras_mask = mask
    return tensor


class LocalSymbolicBuild:
    """A mixin for a `keras.Model` trained under a `tf.distribute` strategy: Keras builds
    metrics from one batch, which under a strategy it first averages across replicas, a
    collective op that MultiWorkerMirroredStrategy cannot run eagerly there. Only the shapes
    matter, so one local replica's part serves. No public hook: this overrides Keras's
    private `_maybe_symbolic_build`."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0], next(batches)
                )
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

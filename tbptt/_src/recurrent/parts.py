"""The parts a cell stack runs (the inputs layer, the cells, the head): built and checked
before the first trace, and their dtypes.

A chain runs its head and inputs layer on one chunk at a time and its cells one step at a time,
and runs each chunk again in the backward pass; what that needs of a part is checked here on
probes, each check saying what it proves and what it cannot see: a part acts step by step, in
inference and in training, and traced as the chain traces it; it lists the variables it reads;
a cell returns the states its `state_size` says; what a part draws, a recompute can replay
(or the calls that recompute refuse it, see `core/randomness.py`).
"""

import functools
from collections.abc import Sequence

import tensorflow as tf

from tbptt._src.core import compat, randomness
from tbptt._src.recurrent.loops import runners

keras = compat.keras


def build_inputs_layer(layer, input_shape: tf.TensorShape, dtype, compute_dtype, reach: int):
    """Builds and checks the inputs layer on zeros of the inputs' shape: ``(its output's F,
    [why a recompute could not replay its draws, or None])``."""
    shape = [1, 1] + input_shape[2:].as_list()
    with tf.init_scope():  # variables are made eagerly, even from inside a tf.function
        features = compat.call_layer(layer, tf.zeros(shape, dtype), training=False).shape[-1]
        steps = [2, 2 * max(int(reach), 3)] + input_shape[2:].as_list()
        ids = tf.random.stateless_uniform(steps, [5, 9], maxval=2, dtype=tf.int32)
        problem = check_part(layer, "inputs_layer", tf.cast(ids, dtype), compute_dtype)
    run = functools.partial(compat.call_layer, layer, tf.zeros(shape, dtype), training=True)
    compat.check_owns_its_variables("inputs_layer", layer, run)
    return features, [problem]


def build_cells_and_head(cells, head, features, input_shape, zeros, dtype, reach: int) -> list:
    """Builds and checks the cells and the head for inputs of F `features` (`zeros()`: the
    zero state of each layer, ``[1, ...]``): why a recompute could not replay each part's
    draws (or None)."""
    if features is None:
        raise ValueError(
            f"inputs must have a known feature size (the last axis) to build the chain's "
            f"variables, got shape {list(input_shape)}. Call chain.build([None, None, "
            "features]) first, or give the inputs a static last dimension."
        )
    with tf.init_scope():  # Variables are made eagerly, even from inside a tf.function.
        top, problems = _run_parts(cells, head, features, zeros, dtype, owned=False)
        if head is not None:
            x = tf.random.stateless_normal([2, 2 * max(int(reach), 3), top.shape[-1]], [7, 11])
            problems.append(check_part(head, "head", tf.cast(x, dtype), dtype))
    # Again outside init_scope, which pauses tapes: which variables does each part read?
    _run_parts(cells, head, features, zeros, dtype, owned=True)
    return problems


def output_floats(cells: list, head) -> int:
    """The floats the stack puts out per step and row, for the memory estimate: the head's
    output width (the top cell's without a head), read without building anything (0 where
    neither says)."""
    top = getattr(cells[-1], "output_size", None)
    units = top if isinstance(top, int) else 0
    if head is None:
        return units
    if getattr(head, "built", False):
        try:
            width = head.compute_output_shape((2, 2, units))[-1]
            return int(width) if width is not None else units
        except Exception:  # a layer without compute_output_shape
            return units
    layers = getattr(head, "layers", None) or [head]
    widths = [getattr(layer, "units", None) for layer in reversed(layers)]
    return next((w for w in widths if isinstance(w, int)), units)


def _run_parts(cells, head, features, zeros, dtype, *, owned: bool) -> tuple:
    """One step through each cell itself (the fast runners read built weights) and the head,
    on zeros: ``(the top output [1, U], problems)``. `owned`: refuse a part that reads
    variables it does not list, run as the gradient runs it (training=True; moving statistics
    and seeds are restored after); else check the states each cell returns and whether a cell
    run as itself draws at each step."""
    x, problems = tf.zeros([1, features], dtype), []
    for index, (cell, states) in enumerate(zip(cells, zeros())):
        nested = runners.cell_states(cell, states)
        run = functools.partial(compat.call_layer, cell, x, nested, training=owned)
        if owned:
            x, _ = compat.check_owns_its_variables(f"cells[{index}]", cell, run)
            continue
        with compat.left_as_it_was(cell):
            inputs, (x, new_states) = x, run()
        check_new_states(index, cell, states, new_states)
        if runners.runs_cell_itself(cell):
            with compat.left_as_it_was(cell):
                problems.append(randomness.cell_problem(index, cell, inputs, nested))
    if head is not None:
        run = functools.partial(compat.call_layer, head, x[:, None], training=owned)
        if owned:
            compat.check_owns_its_variables("head", head, run)
        else:
            with compat.left_as_it_was(head):
                run()
    return x, problems


def check_new_states(index: int, cell, states: list, new_states) -> None:
    """A cell must return states shaped as its `state_size` says (the chain lays them out)."""
    got = [tuple(t.shape.as_list()) for t in tf.nest.flatten(new_states)]
    expected = [tuple(t.shape.as_list()) for t in states]
    if got != expected:
        raise ValueError(
            f"cells[{index}] ({type(cell).__name__}) returned states of shapes "
            f"{got}, but its state_size {cell.state_size!r} says {expected}. "
            "Make state_size describe the states call() returns."
        )


# The chunk length a head is checked on when the chain's is not fixed ("auto").
HEAD_PROBE_STEPS = 64

HEAD_RULE = (
    "The head and the inputs layer run on one chunk at a time, so they must act step "
    "by step: a Dense, an MLP, an Embedding, an activation, LayerNormalization. Put "
    "layers that look across time steps (Conv1D, an RNN with return_sequences, "
    "attention, BatchNormalization) in a cell or outside the chain, outside the "
    "chunked gradient."
)


def _check_acts_step_by_step(part, what: str, x: tf.Tensor, dtype: tf.DType) -> None:
    """The head (or the inputs layer) must map each step on its own: on `x`, two chunks of
    the chain's length, the part of the whole must equal the parts of the pieces cut as the
    chain cuts (and one step), or the chunked gradient would belong to another function.

    What this proves: on these inputs, with training=False, no output depends on a step more
    than one cut away within the probe. What it cannot see: a part that mixes steps only in
    training (BatchNormalization is refused by name), or only further back than the probe's
    two chunks, or only on other inputs."""
    for layer in compat.sublayers(part):
        if "BatchNormalization" in type(layer).__name__:
            raise ValueError(
                f"the {what} contains {type(layer).__name__}, which in training "
                f"normalizes over the chunk's steps. {HEAD_RULE}"
            )
    steps = x.shape[1]
    whole = compat.call_layer(part, x, training=False)
    if (
        not isinstance(whole, tf.Tensor)
        or whole.shape.rank is None
        or whole.shape.rank < 2
        or (whole.shape[:2] != x.shape[:2])
    ):
        raise ValueError(
            f"the {what} must return one tensor [batch, steps, ...] with the steps "
            f"of its input: for {x.shape.as_list()} it returned "
            f"{getattr(whole, 'shape', type(whole).__name__)}. {HEAD_RULE}"
        )
    _check_traced_like_eager(part, what, x, whole)
    cuts = [0, 1, steps // 2, steps]
    pieces = tf.concat(
        [compat.call_layer(part, x[:, a:b], training=False) for a, b in zip(cuts[:-1], cuts[1:])],
        axis=1,
    )
    error = float(tf.reduce_max(tf.abs(tf.cast(whole - pieces, tf.float64))))
    scale = 1.0 + float(tf.reduce_max(tf.abs(tf.cast(whole, tf.float64))))
    tolerance = {tf.float64: 1e-9, tf.float32: 1e-4}.get(dtype, 1e-2)  # 16-bit: coarse
    if error > tolerance * scale:
        raise ValueError(
            f"the {what} looks across time steps: on two chunks of {steps // 2} "
            f"steps it gives another result than on the pieces the chain cuts "
            f"(max difference {error:.3g}). {HEAD_RULE}"
        )


def check_part(part, what: str, x: tf.Tensor, dtype: tf.DType) -> str | None:
    """The head or the inputs layer must act step by step, in inference and in training
    (dropout and all); returns why a call that recomputes chunks could not replay its draws,
    or None."""
    _check_acts_step_by_step(part, what, x, dtype)
    problem = randomness.part_problem(what, part, lambda: compat.call_layer(part, x, training=True))
    if problem is None:  # draws that cannot be replayed would hide a mixing of steps
        _check_training_acts_step_by_step(part, what, x, dtype)
    return problem


def _check_traced_like_eager(part, what: str, x: tf.Tensor, whole: tf.Tensor) -> None:
    """The part traced as the chain traces it, batch and steps unknown, must compute what it
    computes eagerly (Keras's TimeDistributed maps over the batch axis when the steps are
    unknown, and returns [B, B, ...])."""
    spec = tf.TensorSpec([None, None] + x.shape[2:].as_list(), x.dtype)
    traced = compat.quiet_function(
        lambda v: compat.call_layer(part, v, training=False),
        input_signature=[spec],
        autograph=False,
    )
    try:
        got = traced(x)
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as failure:
        got = failure
    if isinstance(got, tf.Tensor) and got.shape == whole.shape:
        difference = tf.abs(tf.cast(got, tf.float64) - tf.cast(whole, tf.float64))
        if bool(tf.reduce_all(difference <= 1e-6 * (1 + tf.abs(tf.cast(whole, tf.float64))))):
            return
    result = f"shape {got.shape.as_list()}" if isinstance(got, tf.Tensor) else repr(got)[:200]
    raise ValueError(
        f"the {what} computes otherwise when traced with the number of steps "
        f"unknown, as the chain runs it: for inputs {x.shape.as_list()} it gave "
        f"{result}, eagerly shape {whole.shape.as_list()}. Keras's "
        "TimeDistributed does so (it maps over the batch axis then): pass the "
        "layer it wraps directly; a Dense acts on each step already."
    )


def _check_training_acts_step_by_step(part, what: str, x: tf.Tensor, dtype: tf.DType) -> None:
    """Under training=True, as the chunked gradient runs the part: changing the input at one
    step must change no other step's output. Both runs draw the same numbers (the part's seed
    generators restored in between), so dropout passes and only a mixing of steps shows.

    What this proves: on these inputs, in training, no step's output reads another step's
    input. What it cannot see: a mixing only on other inputs, or only beyond the probe."""
    steps = x.shape[1]
    at = tf.reshape(tf.range(steps) == steps // 2, [1, steps] + [1] * (x.shape.rank - 2))
    bumped = tf.where(at, 1 - x, x) if x.dtype.is_integer else tf.where(at, x + 1, x)
    outputs = []
    for value in (x, bumped):
        with compat.left_as_it_was(part):
            outputs.append(tf.cast(compat.call_layer(part, value, training=True), tf.float64))
    others = tf.boolean_mask(outputs[0] - outputs[1], tf.range(steps) != steps // 2, axis=1)
    error = float(tf.reduce_max(tf.abs(others)))
    scale = 1.0 + float(tf.reduce_max(tf.abs(outputs[0])))
    if error > {tf.float64: 1e-9, tf.float32: 1e-4}.get(dtype, 1e-2) * scale:
        raise ValueError(
            f"the {what} looks across time steps when training: changing the "
            f"input at one step of {steps} changed the outputs at other steps "
            f"(max difference {error:.3g}). {HEAD_RULE}"
        )


def checked_cells(cells) -> list:
    if isinstance(cells, (str, bytes)) or not isinstance(cells, Sequence) or not cells:
        raise TypeError(
            f"cells must be a non-empty sequence of RNN cells (each with "
            f"`state_size` and call(inputs, states) -> (output, new_states)), got "
            f"{cells!r}."
        )
    for index, cell in enumerate(cells):
        if hasattr(cell, "cell") and hasattr(cell, "return_sequences"):
            raise TypeError(
                f"cells[{index}] is a whole RNN layer ({type(cell).__name__}), not a "
                "cell: pass its cell, e.g. keras.layers.GRUCell(units) instead of "
                "keras.layers.GRU(units); the chain runs the time loop itself."
            )
        if not hasattr(cell, "state_size") or not callable(cell):
            raise TypeError(
                f"cells[{index}] must be an RNN cell with `state_size` that is "
                f"callable as cell(inputs, states) -> (output, new_states), got "
                f"{cell!r}."
            )
        for inner in [cell] + list(getattr(cell, "cells", [])):
            dropout = getattr(inner, "dropout", 0) or 0
            recurrent = getattr(inner, "recurrent_dropout", 0) or 0
            if (dropout > 0 or recurrent > 0) and (
                inner is not cell or runners.runs_cell_itself(cell)
            ):
                raise ValueError(
                    f"cell {index} ({type(inner).__name__}) has dropout={dropout} / "
                    f"recurrent_dropout={recurrent}: the chain draws Keras's dropout masks once "
                    "per sequence and replays them in each chunk's recompute for Keras's own "
                    "GRUCell, LSTMCell and SimpleRNNCell, given to the chain directly (not "
                    "inside StackedRNNCells, not a subclass). Pass those, or put dropout in the "
                    "head or the inputs layer."
                )
    return list(cells)


def resolve_dtype(cells: list, head, dtype, inputs_layer=None) -> tf.DType:
    """The compute dtype; unbuilt Keras cells are set to it, built ones must have it. An unbuilt
    head or inputs layer follows too, unless it was given a dtype of its own (a float32 output
    layer under mixed precision, as Keras advises); a built one keeps its dtype (Keras casts
    its inputs) unless `dtype` was given, which it must then have."""
    given = dtype is not None
    if dtype is None:
        dtype = compat.compute_dtype(cells[0]) or keras.backend.floatx()
    dtype = tf.as_dtype(dtype)
    parts = [("cells", c) for c in cells]
    for what, layer in [("head", head), ("inputs_layer", inputs_layer)]:
        if not (compat.is_keras_layer(layer) and compat.has_own_dtype(layer)):
            parts.append((what, layer))
    for what, layer in parts:
        # A layer under the global mixed policy computes in its 16-bit dtype: it follows a
        # chain computing in another dtype (float32 given explicitly) like any other layer.
        if not compat.is_keras_layer(layer) or compat.compute_dtype(layer) == dtype:
            continue
        if layer.built and what != "cells":
            beside = _float32_beside_16_bits(layer, dtype)
            if _holds_no_variables_of_its_own(layer) and not beside:
                compat.set_compute_dtype(layer, dtype)  # a loaded Sequential: how it casts inputs
                continue
            # Else, unless the chain's dtype was given, it computes in its own dtype, as in a
            # Keras model of layers of several dtypes (a Masking layer of the global policy in
            # a float64 model, a float32 output layer under mixed precision): Keras casts its
            # inputs, the chain its outputs.
            if beside or not given:
                continue
        if layer.built:
            name = f"a cell ({type(layer).__name__})" if what == "cells" else f"the {what}"
            raise ValueError(
                f"{name} is already built in {compat.compute_dtype(layer).name}, "
                f"but the chain computes in {dtype.name}. Pass an unbuilt layer, "
                "or leave dtype=None to use the layer's dtype."
            )
        compat.set_compute_dtype(layer, dtype)
    return dtype


def _holds_no_variables_of_its_own(layer) -> bool:
    """A container (Sequential, Functional): its dtype says only how it casts its inputs, so it
    may follow the chain after it was built (Keras does not save a Sequential's dtype)."""
    inner = compat.sublayers(layer)[1:]
    own = {id(v) for v in layer.weights} - {id(v) for sub in inner for v in sub.weights}
    return bool(inner) and not own


def _float32_beside_16_bits(layer, dtype: tf.DType) -> bool:
    """A float32 head or inputs layer of a chain computing in 16 bits: Keras's advice under
    mixed precision (the layer casts its inputs), kept as it is."""
    return dtype in (tf.float16, tf.bfloat16) and compat.compute_dtype(layer) == tf.float32

"""StageChain: a model split into depth stages, trained with one tape per stage.

A stage is a "chunk" in depth: the carried value is the activation between two stages, and
dLoss/d(activation) crosses each cut as the output gradient of the stage before it (a VJP per
stage, never a Jacobian). The result equals one tape over the joined model.
"""

import contextlib
import functools
from collections.abc import Sequence
from typing import NamedTuple

import tensorflow as tf

from tbptt._src.core import chain as chain_lib
from tbptt._src.core import checks, compat, compiling, numerics, schedules, segments, serialization
from tbptt._src.core import vjp as vjp_lib
from tbptt._src.core.types import LossFn

keras = compat.keras

SPLIT_LINEAR_MSG = (
    "the model is not a linear chain: layer {index} ({name}) {why}. Only a model "
    "whose layers each take the previous layer's single output can be cut; "
    "build the stages yourself and pass them to tbptt.StageChain."
)


class StageResult(NamedTuple):
    """What `StageChain.value_and_gradients` returns.

    Attributes:
      loss: the scalar loss of the last stage's output.
      grads: one gradient per entry of `chain.trainable_variables` (stage order).
      boundary_grads: dLoss/d(output of stage k) for every stage but the last.
      input_grad: dLoss/dx.
    """

    loss: tf.Tensor
    grads: list
    boundary_grads: list
    input_grad: tf.Tensor


@serialization.register
class StageChain(tf.Module):
    """Stages run in order, each differentiated with its own tape (or tf.gradients).

    ```
    forward:  a_k = stage_k(a_{k-1})                  (a_0 = x; keep each stage's tape, or with
                                                       recompute=True only a_k)
    backward: g = dL/da_n;  for k = n .. 1:  (dW_k, g) = VJP of stage_k at a_{k-1} with g
    ```

    Example:

    >>> import keras, numpy as np, tbptt
    >>> chain = tbptt.StageChain([keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    >>> result = chain.value_and_gradients(np.ones([2, 3], "float32"), np.zeros([2, 1], "float32"),
    ...                                    keras.losses.MeanSquaredError())
    >>> [tuple(g.shape) for g in result.boundary_grads], tuple(result.input_grad.shape)
    ([(2, 4)], (2, 3))
    """

    def __init__(
        self,
        stages: Sequence,
        *,
        backend: str = "eager",
        recompute: bool = False,
        devices: Sequence[str | None] | None = None,
        compiled: bool = True,
        check_numerics: bool = False,
        name: str | None = None,
    ):
        """Creates the chain.

        Args:
          stages: Keras layers/models or callables, in order; the last one feeds the loss.
          backend: "eager" (`GradientTape`) or "graph" (`tf.gradients` in a graph).
          recompute: keep only the activations between stages and re-run each stage in the
            backward pass (Chen et al.'s sqrt(n) memory). Dropout draws the same mask in the
            re-run and BatchNormalization updates its moving statistics once (Keras 3: the
            stage's non-trainable variables, seed generators included, are restored before it).
          devices: one device name (or None) per stage, e.g. ["/GPU:0", "/GPU:1"].
          compiled: run in a `tf.function` (default); False runs eagerly (eager backend only).
          check_numerics: test each stage's output, the loss, each carried dLoss/d(activation)
            and each stage's weight gradients for NaN/Inf, and raise `tbptt.NonFiniteError`
            naming the stage where one first appeared (inside a tf.function:
            `tf.errors.InvalidArgumentError`). Off, a non-finite loss is returned as it is.
          name: module name.
        """
        super().__init__(name=name)
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages:
            raise TypeError(
                "stages must be a non-empty sequence of Keras layers/models or "
                f"callables, got {stages!r}."
            )
        for index, stage in enumerate(stages):
            if not callable(stage):
                raise TypeError(
                    f"stages[{index}] must be a Keras layer/model or a callable, got {stage!r}."
                )
        devices = _checked_devices(devices, len(stages))
        self._stages = list(stages)
        self._backend = checks.choice("backend", backend, vjp_lib.BACKENDS)
        if backend == "graph" and not compiled:
            raise ValueError(checks.COMPILED_GRAPH_MSG)
        self._recompute = bool(recompute)
        self._devices = devices
        self._compiled = bool(compiled)
        self._check_numerics = checks.boolean("check_numerics", check_numerics)
        self._built = False
        self._functions = compiling.FunctionCache(lambda name: 1)

    @property
    def stages(self) -> list:
        return list(self._stages)

    def get_config(self) -> dict:
        """Keras's config of a chain of Keras layers: the architecture and the options."""
        options = {
            "backend": self._backend,
            "recompute": self._recompute,
            "devices": self._devices,
            "compiled": self._compiled,
            "check_numerics": self._check_numerics,
        }
        return serialization.stages_config(self._stages, options, self.name)

    @classmethod
    def from_config(cls, config: dict) -> "StageChain":
        return cls(**serialization.stages_arguments(config))

    @property
    def stage_variables(self) -> list:
        """One list of trainable variables per stage: for one optimizer per stage."""
        return [compat.trainable_variables_of(stage) for stage in self._stages]

    @property
    def trainable_variables(self) -> list:
        """All stages' trainable variables in stage order (a shared one listed once)."""
        return compat.unique([v for variables in self.stage_variables for v in variables])

    def split_grads(self, grads: Sequence) -> list:
        """`grads` (aligned with `trainable_variables`) as one list per stage, aligned with
        `stage_variables`: `for opt, g, v in zip(optimizers, chain.split_grads(result.grads),
        chain.stage_variables): opt.apply_gradients(zip(g, v))`."""
        by_id = {id(v): g for v, g in zip(self.trainable_variables, grads)}
        return [[by_id[id(v)] for v in stage_variables] for stage_variables in self.stage_variables]

    def build(self, input_shape, dtype=None) -> None:
        """Creates the stages' variables with one eager forward pass on zeros of `input_shape`
        (the batch size does not matter)."""
        self._build_for(tf.zeros([1] + list(input_shape)[1:], dtype or keras.backend.floatx()))

    def _run_stage(self, index: int, value, training: bool):
        device = self._devices[index]
        with tf.device(device) if device else contextlib.nullcontext():
            return compat.call_layer(self._stages[index], value, training=training)

    @tf.autograph.experimental.do_not_convert
    def __call__(self, x, *, training: bool = False):
        """The joined forward pass: stage_n(...stage_1(x)); differentiable by an outer tape."""
        x = tf.convert_to_tensor(x)
        self._build_for(x)
        return self._forward(x, training)

    def _forward(self, x, training: bool):
        for index in range(len(self._stages)):
            x = self._run_stage(index, x, training)
        return x

    def _build_for(self, x: tf.Tensor) -> None:
        with compiling.BUILD_LOCK:  # threads making the first call build the variables once
            if self._built:
                return
            zeros = tf.zeros([1] + x.shape.as_list()[1:], x.dtype)
            with tf.init_scope():  # variables are made eagerly, even inside a tf.function
                value = zeros
                for index in range(len(self._stages)):
                    output = self._run_stage(index, value, training=False)  # builds it
                    if self._recompute:
                        run = functools.partial(self._run_stage, index, training=True)
                        _check_reruns_alike(self._stages[index], index, value, run)
                    value = output
            # Again outside init_scope, which pauses tapes: which variables does a stage read?
            value = zeros
            for index, stage in enumerate(self._stages):
                value = compat.check_owns_its_variables(
                    f"stages[{index}]",
                    stage,
                    functools.partial(self._run_stage, index, value, training=False),
                )
            self._built = True

    @tf.autograph.experimental.do_not_convert
    def value_and_gradients(self, x, y, loss_fn: LossFn, sample_weight=None) -> StageResult:
        """Loss and gradients of `loss_fn(y, stage_n(...stage_1(x)))`, one stage at a time.

        Args:
          x: the first stage's input ``[B, ...]``.
          y: targets ``[B, ...]``.
          loss_fn: ``loss_fn(y_true, y_pred[, sample_weight]) -> scalar``, e.g. a Keras loss.
          sample_weight: optional ``[B, ...]``, passed to `loss_fn`.

        Returns:
          `StageResult(loss, grads, boundary_grads, input_grad)`.
        """
        loss_fn = checks.loss_function(loss_fn, with_weight=sample_weight is not None)
        if self._check_numerics:
            checks.outside_xla(
                "check_numerics=True",
                "its assertions would be left out. Check numerics in a call outside jit_compile.",
            )
        x = checks.as_tensor("x", x)
        if x.shape.rank == 0:
            raise ValueError(
                "x must have a batch axis first (shape [batch, ...]), got a scalar (shape [])."
            )
        args = {"x": x, "y": checks.batch_like("y", y, x)}
        if sample_weight is not None:
            args["sample_weight"] = checks.batch_like("sample_weight", sample_weight, x)
        self._build_for(x)
        fn = self._functions.get(
            "value_and_gradients", self._gradients_impl, loss_fn, self._compiled, recorded=False
        )
        loss, grads, boundary_grads, input_grad, non_finite = fn(args)
        if non_finite is not None:
            loss, grads = checks.report_non_finite(
                non_finite, (loss, grads), unit="stage", carried="activation"
            )
        return StageResult(loss, grads, boundary_grads, input_grad)

    def _gradients_impl(self, args: dict, loss_fn: LossFn):
        structures: dict = {}  # nest structure of each stage's input, recorded in the forward pass
        saved: dict = {}  # non-trainable values of each stage before its first run (recompute)

        def stage_fn(index):
            last = index == len(self._stages) - 1

            def run(flat):
                value = tf.nest.pack_sequence_as(structures[index], flat)
                if self._recompute:
                    _snapshot_or_restore(self._stages[index], index, saved)
                out = self._run_stage(index, value, training=True)
                if not last:
                    structures[index + 1] = out
                    return None, tf.nest.flatten(out)
                loss_args = [args["y"], out] + (
                    [args["sample_weight"]] if "sample_weight" in args else []
                )
                return checks.scalar_loss(loss_fn(*loss_args)), []

            return run

        structures[0] = args["x"]
        linearized, found = chain_lib.static_forward(
            [stage_fn(i) for i in range(len(self._stages))],
            tf.nest.flatten(args["x"]),
            self.stage_variables,
            vjp_lib.get_linearize(self._backend),
            recompute=self._recompute,
            check=self._check_numerics,
        )
        result = chain_lib.static_backward(
            linearized, schedules.Exact(), segments.loss_dtype_for(args["x"].dtype)
        )
        if self._check_numerics:
            for k, (carry_grad, grads) in enumerate(zip(result.carry_grads, result.grads)):
                found = numerics.note_non_finite(found, k, state_grad=carry_grad, grads=grads)
        carried = [
            tf.nest.pack_sequence_as(structures[k], g) for k, g in enumerate(result.carry_grads)
        ]
        return (
            result.loss,
            _merge(self.stage_variables, self.trainable_variables, result.grads),
            carried[1:],
            carried[0],
            found if self._check_numerics else None,
        )

    @property
    def trace_count(self) -> int:
        return self._functions.trace_count


def _check_reruns_alike(stage, index: int, value, run) -> None:
    """With recompute, a stage runs twice per step: the re-run must compute what the first
    run did. Keras layers' random seeds and statistics are restored before it; randomness
    from elsewhere (a tf.random.Generator, tf.random.uniform) would be drawn again.
    `run(value)` runs the stage as the chain runs it (training, on its device)."""
    value = tf.nest.map_structure(
        lambda v: (
            tf.cast(tf.random.stateless_normal(tf.shape(v), [3, 5]), v.dtype)
            if v.dtype.is_floating
            else v
        ),
        value,
    )
    saved: dict = {}
    runs = []
    for _ in range(2):
        _snapshot_or_restore(stage, index, saved)
        runs.append(tf.nest.flatten(run(value)))
    _snapshot_or_restore(stage, index, saved)
    if any(a.dtype.is_floating and not bool(tf.reduce_all(tf.equal(a, b))) for a, b in zip(*runs)):
        raise ValueError(
            f"stages[{index}] gives another result when run again on the same input, so "
            "recompute=True (which re-runs it in the backward pass) would differentiate "
            "another function. Draw its randomness from Keras layers (Dropout, "
            "GaussianNoise), whose seeds are restored before the re-run, or use "
            "recompute=False."
        )


def _snapshot_or_restore(stage, index: int, saved: dict) -> None:
    """First run of a stage: remember its non-trainable variables (BatchNorm statistics,
    Keras 3 seed generators); the re-run restores them first, so it draws the same dropout
    mask and the statistics are updated once."""
    variables = list(getattr(stage, "non_trainable_variables", []))
    if index not in saved:
        saved[index] = [tf.identity(v) for v in variables]
    else:
        for v, value in zip(variables, saved[index]):
            v.assign(value)


def _merge(stage_variables: list, variables: list, stage_grads: list) -> list:
    """Per-stage gradients summed into `trainable_variables` order."""
    totals: dict = {}
    for own, grads in zip(stage_variables, stage_grads):
        for v, g in zip(own, grads):
            totals[id(v)] = g if id(v) not in totals else totals[id(v)] + g
    return [totals[id(v)] for v in variables]


def split_sequential(model, at: Sequence[int]) -> list:
    """Cuts a Sequential (or a functional model that is a linear chain) into sub-models.

    The pieces share the original's layers and so its variables: training the pieces trains the
    model.

    Args:
      model: a `keras.Sequential`, or a functional model whose layers form one chain.
      at: increasing indices into `model.layers`; piece i starts at `model.layers[at[i-1]]`.

    Returns:
      `len(at) + 1` `keras.Sequential` models.

    Raises:
      TypeError: not a Keras model. ValueError: a cut out of range, or a model that branches.

    Example:

    >>> import keras, tbptt
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    >>> first, second = tbptt.split_sequential(model, at=[1])
    >>> first.layers[0] is model.layers[0], second.layers[0] is model.layers[1]
    (True, True)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "split_sequential needs a keras.Sequential or a functional model that is "
            f"a linear chain, got {model!r}."
        )
    layers = _linear_layers(model)
    cuts: list = [at] if checks.is_int(at) else list(at)
    if (
        not cuts
        or not all(checks.is_int(c) for c in cuts)
        or cuts != sorted(set(cuts))
        or cuts[0] <= 0
        or cuts[-1] >= len(layers)
    ):
        raise ValueError(
            "at must be increasing layer indices strictly between 0 and "
            f"{len(layers)} (the model has {len(layers)} layers: cut i starts a new "
            f"piece at model.layers[i]), got {at!r}."
        )
    bounds = [0] + cuts + [len(layers)]
    return [keras.Sequential(layers[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _linear_layers(model) -> list:
    """`model.layers` if each takes the previous one's single output, else ValueError."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if isinstance(model, keras.Sequential):
        return layers
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            SPLIT_LINEAR_MSG.format(index=0, name=model.name, why="has several inputs or outputs")
        )
    previous = None
    for index, layer in enumerate(layers):
        nodes = compat.inbound_nodes(layer)
        parents = [p.operation for n in nodes for p in getattr(n, "parent_nodes", [])]
        if previous is None:  # the first layer takes the model input
            linear = len(parents) == 1 and isinstance(parents[0], keras.layers.InputLayer)
        else:
            linear = parents == [previous]
        if len(nodes) != 1 or not linear:
            raise ValueError(
                SPLIT_LINEAR_MSG.format(
                    index=index,
                    name=layer.name,
                    why="is called more than once"
                    if len(nodes) != 1
                    else f"takes {[p.name for p in parents]} instead of "
                    f"{previous.name if previous else 'the model input'}",
                )
            )
        previous = layer
    return layers


def _checked_devices(devices, count: int) -> list:
    """One device name (or None) per stage, each a device of this machine: TensorFlow would
    place a stage asked for a missing device on another one without a word."""
    if devices is None:
        return [None] * count
    if isinstance(devices, str) or len(devices) != count:
        raise ValueError(
            "devices must be None or a sequence with one device name (or None) "
            f"per stage ({count}), got {devices!r}."
        )
    here = tf.config.list_logical_devices()
    known = {(d.device_type, int(d.name.rsplit(":", 1)[1])) for d in here}
    for index, device in enumerate(devices):
        if device is None:
            continue
        try:
            spec = tf.DeviceSpec.from_string(device)
        except (TypeError, ValueError):
            raise ValueError(
                f"devices[{index}] must be a device name such as '/GPU:0', got {device!r}."
            ) from None
        local = spec.job is None and spec.device_type is not None
        if local and (spec.device_type.upper(), spec.device_index or 0) not in known:
            raise ValueError(
                f"devices[{index}]={device!r} is not a device of this machine, "
                f"which has {sorted(d.name for d in here)}. Pass one of those, or "
                "None for the default placement."
            )
    return list(devices)

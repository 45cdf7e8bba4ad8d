"""ChunkedModel: a `keras.Model` whose training step is the chain's chunked gradient (Keras 3).

`compile`/`fit`/`evaluate`/`predict`, callbacks, progress bars and TensorBoard work as for any
Keras model. What Keras's own `stateful=True` keeps in variables (the state between batches)
this model keeps as tensors it passes from one step to the next:

```
carry = None                                   # (state at the context start, context window)
for batch in stream:
    loss, grads, carry = step(batch, carry)    # gradients reach back into carry's context
    optimizer.apply_gradients(grads)
```

so the carried state has its own dtype (float32 under mixed precision), each replica of a
`tf.distribute` strategy carries its own, the batch size may change, and with truncated BPTT the
gradient crosses the cut between batches: the last `backprop_chunks - 1` chunks of the previous
batch (its inputs and the state entering them) are kept and re-run in front of the next batch.
"""

import contextlib
import functools
import inspect
import warnings
from typing import Any

import keras
import tensorflow as tf

from tbptt._src.core import checks, compat, serialization
from tbptt._src.keras import losses as losses_lib
from tbptt._src.keras import saving, serving
from tbptt._src.keras import stream as stream_lib
from tbptt._src.keras.stream import Carried, Stream, StreamPosition
from tbptt._src.recurrent.chain import RecurrentChain
from tbptt._src.recurrent.streaming import StreamCarry, check_window, join_context


@serialization.register
class ChunkedModel(saving.SavableModel, compat.LocalSymbolicBuild, keras.Model):
    """A Keras model around a chain; `fit` trains it with the chain's chunked gradient.

    ```
    model = tbptt.keras.ChunkedModel(chain, stateful=True)
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    model.fit(tbptt.data.stream_windows(x, y, batch_size=8, window=200), epochs=3)
    ```

    `x` is the inputs ``[B, T, F]``, or a dict ``{"inputs": ..., "reset": ..., "mask": ...}``
    with the ``[B, T]`` flags of `value_and_gradients`; `y` ``[B, T, ...]``; `sample_weight`
    ``[B, T]``.

    The compiled loss is applied per chunk and adds up to the loss of the whole sequence, as
    Keras would compute it (its mean over the unmasked steps, or its sum). Compiled metrics
    need the predictions: one more forward pass per step. With stateful=True, `evaluate` and
    `predict` carry the state across the batches of one call, from zeros at its start (the
    training carry is left alone); without, each batch starts from zeros.

    Examples:
        >>> import keras, numpy as np, tbptt
        >>> chain = tbptt.StatefulGRUChain(8, head=keras.layers.Dense(1), chunk_size=5)
        >>> model = tbptt.keras.ChunkedModel(chain, stateful=True)
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> x, y = np.ones([4, 20, 3], "float32"), np.zeros([4, 20, 1], "float32")
        >>> history = model.fit(x, y, batch_size=2, shuffle=False, verbose=0)
        >>> [tuple(s.shape) for s in model.carried_state]
        [(2, 8)]
    """

    train_function: Any  # Keras's step functions, None until made (for type checkers)
    test_function: Any
    predict_function: Any

    def __init__(self, chain: RecurrentChain, *, stateful: bool = False, **kwargs):
        """Wraps `chain`.

        Args:
          chain: the `RecurrentChain` to train (its mode, chunk size and backend apply).
          stateful: consecutive batches are consecutive windows of the same B streams, each
            step a `chain.stream_step`; the carry is reset at the start of each epoch, by
            `reset_state()`, and (with a warning) when the batch size changes.
          **kwargs: passed to `keras.Model` (name, ...).
        """
        _check_chain(chain, stateful)
        super().__init__(**kwargs)
        self._chain = chain
        self._train_chain = chain  # the chain with the compiled loss's reduction (`compile`)
        # Tracked by Keras, so that weights, save_weights and checkpoints see the chain's layers
        # (in this order: the names of saved weights depend on it).
        self.chain_layers = [
            p for p in chain.cells + [chain.head, chain.inputs_layer] if compat.is_keras_layer(p)
        ]
        self.stateful = bool(stateful)
        self._chunk_loss: losses_lib.ChunkLoss | None = None  # made by `compile`
        # What a stateful fit carries between batches (checkpointed with the model), and what
        # a stateful evaluate or predict carries across the batches of one call.
        self._stream = Stream(chain, lambda: self.distribute_strategy)
        self._evaluation = Carried(lambda: self.distribute_strategy)
        self.built = chain.built

    @property
    def chain(self) -> RecurrentChain:
        return self._chain

    @property
    def trainable_weights(self) -> list:
        """The chain's trainable variables in the chain's order (inputs layer, cells, head),
        which its gradients follow: the optimizer is built, saved and restored in this one
        order, so a slot can never be paired with another variable. (Keras would list the
        tracked layers' variables in the order they were tracked.)"""
        return self._chain.trainable_variables if self.trainable else []

    trainable_variables = trainable_weights

    @property
    def chunk_loss(self) -> Any:
        """The compiled loss as the chain's per-chunk `loss_fn` (None before `compile`)."""
        return self._chunk_loss

    def build(self, input_shape):
        shape = input_shape["inputs"] if isinstance(input_shape, dict) else input_shape
        self._chain.build(shape)
        self.built = True

    def call(self, inputs, training: bool = False):
        """The chain's predictions ``[B, T, O]`` from a zero state."""
        inputs, flags = _split_inputs(self._chain, inputs)
        outputs, _ = self._chain(inputs, training=training, **flags)
        self.built = True
        return outputs

    @property
    def carried_state(self):
        """The state after the last training batch (a state nest; per-replica values under a
        tf.distribute strategy), or None before the first batch and after a reset."""
        return self._stream.final_state

    @property
    def stream_position(self) -> StreamPosition:
        """(epoch, batches done in it) of a stateful fit; saved with the carried state."""
        return self._stream.position

    def reset_state(self) -> None:
        """Forgets the carried state: the next batch starts from zeros."""
        self._stream.reset()

    reset_states = reset_state  # the name of Keras's stateful RNN layers

    def export(
        self, filepath, format: str = "tf_saved_model", verbose: bool = True, **kwargs
    ) -> None:
        """A SavedModel serving the chain with its state in and out, for a process without
        tbptt: `step(inputs, state)`, `serve(inputs)`, `initial_state(batch_size)`, a flat
        `serving_default`; or with format="tflite", a streaming TensorFlow Lite model
        (keywords `steps`, `batch_size`). See `keras/serving.py`."""
        serving.export(self._chain, filepath, format=format, verbose=verbose, **kwargs)

    # -- compiling -----------------------------------------------------------------------------

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        self._chunk_loss = losses_lib.ChunkLoss(self)
        if self._chunk_loss.dtype == tf.float64:  # Keras logs the loss in float32 otherwise.
            compat.log_loss_in(self, "float64")
        # The compiled loss says how its chunk losses add up, as in a chain's reduction="auto".
        auto = self._chain.reduction == "auto"
        self._train_chain = self._chain if auto else self._chain.with_config(reduction="auto")
        self.train_function = None

    # -- training ------------------------------------------------------------------------------

    def train_step(self, data):
        logs, _, _ = self._train_step(data, None)
        return logs

    def _train_step(self, data, carry: StreamCarry | None):
        """One step on one replica: returns (logs, the carry for the next step, final state)."""
        x, y, sample_weight = _unpack(data)
        chain = self._train_chain
        inputs, flags = _split_inputs(chain, x)
        _build_before_tracing(chain, self.optimizer, inputs)
        if self.stateful:
            result, new_carry = chain.stream_step(
                inputs, y, self._chunk_loss, carry, sample_weight=sample_weight, **flags
            )
        else:
            result, new_carry = (
                chain.value_and_gradients(
                    inputs, y, self._chunk_loss, sample_weight=sample_weight, **flags
                ),
                None,
            )
        self.built = True
        y_pred = None
        if compat.has_compiled_metrics(self):  # as Keras: predictions before the update
            y_pred = _predictions(chain, carry, inputs, flags)
        grads, penalty = _with_weight_penalty(self, result.grads, chain.trainable_variables)
        loss = self.chunk_loss.logged(result.loss) + penalty  # the scale of this step
        self.optimizer.apply_gradients(zip(grads, chain.trainable_variables))
        compat.loss_tracker(self).update_state(loss, sample_weight=tf.shape(inputs)[0])
        logs = self.compute_metrics(
            x, y, losses_lib.with_keras_mask(y_pred, flags.get("mask")), sample_weight=sample_weight
        )
        return logs, new_carry, result.final_state

    def test_step(self, data):
        return _test_step(self, data, None)[0]

    # -- the step loops of a stateful model (Keras's own run each batch from nothing) --------

    def make_train_function(self, force: bool = False):
        if not self.stateful:
            return super().make_train_function(force)
        if self.train_function is None or force:
            self.train_function = stream_lib.train_function(
                self._on_replicas(self._train_step, "logs"), self._stream, self.steps_per_execution
            )
        return self.train_function

    def make_test_function(self, force: bool = False):
        if not self.stateful:
            return super().make_test_function(force)
        if self.test_function is None or force:
            self.test_function = stream_lib.test_function(
                self._on_replicas(functools.partial(_test_step, self), "logs"),
                self._evaluation,
                self.steps_per_execution,
            )
        return self.test_function

    def make_predict_function(self, force: bool = False):
        if not self.stateful:
            return super().make_predict_function(force)
        if self.predict_function is None or force:
            self.predict_function = stream_lib.predict_function(
                self._on_replicas(functools.partial(_predict_step, self), "outputs"),
                self._evaluation,
            )
        return self.predict_function

    def _on_replicas(self, replica_step, kind: str):
        return stream_lib.distributed(
            self.distribute_strategy,
            replica_step,
            kind,
            run_eagerly=self.run_eagerly,
            jit_compile=bool(self.jit_compile),
        )

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`; with stateful=True the carried state is reset at each epoch's
        start (not at the start of an epoch resumed from a checkpoint)."""
        if kwargs.get("class_weight") is not None:
            raise ValueError(
                "ChunkedModel.fit does not take class_weight (a chunked loss sees "
                "steps, not samples): pass a sample_weight [B, T] built from the "
                "class of each step instead."
            )
        with _fresh_steps_after_an_error(self):
            if self.stateful:
                return super().fit(**_stateful_fit_arguments(self._stream, args, kwargs))
            return super().fit(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        """`keras.Model.evaluate`; with stateful=True the batches are consecutive windows of
        the same streams: the state is carried from one to the next, from zeros at the call's
        start (the training carry is left alone)."""
        self._evaluation.reset()
        with _fresh_steps_after_an_error(self):
            return super().evaluate(*args, **kwargs)

    def predict(self, x, *args, initial_state=None, **kwargs):
        """`keras.Model.predict`, from `initial_state` (None: zeros). With stateful=True the
        state is carried across the batches of the call, as in `evaluate`; without, a given
        `initial_state` ``[B, ...]`` starts one call over all of `x`'s B rows. Unlike Keras's
        stateful layers, a call does not continue the one before (its result depends on its
        arguments only): to continue, pass the state the chain ended with, ``outputs, state =
        model.chain(x, state)``."""
        if kwargs.pop("return_state", None) is not None:
            raise TypeError(
                "predict has no return_state: for the outputs and the state, "
                "outputs, state = model.chain(x, initial_state)."
            )
        if initial_state is not None and not self.stateful:
            return _predict_from(self.chain, x, initial_state)
        self._evaluation.reset()
        self._evaluation.state = initial_state
        with _fresh_steps_after_an_error(self):
            return super().predict(x, *args, **kwargs)


@contextlib.contextmanager
def _fresh_steps_after_an_error(model: ChunkedModel):
    """A call refused while its step was being traced (bad data, say) leaves that tf.function
    with a failed first trace, and TensorFlow refuses to create variables (the chain's, the
    optimizer's) in any later one. Forget the compiled steps then, so the next call starts from
    new ones."""
    try:
        yield
    except BaseException:
        model.train_function = model.test_function = model.predict_function = None
        raise


def _build_before_tracing(chain: RecurrentChain, optimizer, inputs) -> None:
    """The chain and the optimizer built before the chain's gradient is first traced: the
    chunk loss reads the optimizer's loss scale, which an unbuilt `LossScaleOptimizer` gives
    as its initial scale, a Python number the trace would keep; built, it is the dynamic
    scale, a variable read anew at every step."""
    if optimizer.built:
        return
    chain.build(inputs.shape, inputs.dtype)
    optimizer.build(chain.trainable_variables)


def _stateful_fit_arguments(stream: Stream, args: tuple, kwargs: dict) -> dict:
    """`fit`'s arguments for a stateful model: no shuffling (rows are streams: shuffling them
    between batches would splice unrelated streams), and the epoch-start callback."""
    bound = inspect.signature(keras.Model.fit).bind(None, *args, **kwargs).arguments
    bound.pop("self")
    if bound.setdefault("shuffle", False):
        warnings.warn(
            "fit(shuffle=True) on a stateful ChunkedModel reorders the rows between "
            "batches, so the carried state enters other streams; pass shuffle=False.",
            stacklevel=4,
        )
    callbacks = bound.get("callbacks") or []
    epoch_start = _EpochStart(stream)
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks.append(epoch_start)
    else:
        bound["callbacks"] = list(callbacks) + [epoch_start]
    return bound


class _EpochStart(keras.callbacks.Callback):
    """At each epoch's start of a stateful fit: the stream starts from zeros, unless resumed
    mid-epoch from a checkpoint."""

    def __init__(self, stream: Stream):
        super().__init__()
        self._stream = stream

    def on_epoch_begin(self, epoch, logs=None):
        self._stream.begin_epoch(epoch)


def _test_step(model: ChunkedModel, data, state):
    """The loss and metrics of one batch from `state` (None: zeros), as Keras computes them on
    the whole window: ``(logs, the final state)``."""
    x, y, sample_weight = _unpack(data)
    inputs, flags = _split_inputs(model.chain, x)
    y_pred, final_state = model.chain(inputs, state, training=False, **flags)
    loss = model.chunk_loss.whole_sequence(y, y_pred, sample_weight, flags.get("mask"))
    loss += _with_weight_penalty(model, [], [])[1]
    compat.loss_tracker(model).update_state(loss, sample_weight=tf.shape(inputs)[0])
    y_pred = losses_lib.with_keras_mask(y_pred, flags.get("mask"))
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight), final_state


def _predict_from(chain: RecurrentChain, x, initial_state):
    """A non-stateful model's predictions of all of `x` from `initial_state`, in one call."""
    inputs, flags = _split_inputs(chain, x)
    return chain(inputs, initial_state, training=False, **flags)[0].numpy()


def _predict_step(model: ChunkedModel, data, state):
    """The predictions of one batch from `state` (None: zeros), and the final state."""
    x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    inputs, flags = _split_inputs(model.chain, x)
    return model.chain(inputs, state, training=False, **flags)


def _unpack(data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if y is None:
        raise ValueError(
            "ChunkedModel needs targets y [B, T, ...] to train and evaluate: "
            "fit(x, y), or a dataset of (x, y) pairs."
        )
    return x, y, sample_weight


def _split_inputs(chain: RecurrentChain, x):
    """x -> (inputs, {"reset": ..., "mask": ...} for the flags given), the mask the chain
    computes from the inputs (`compute_mask`) where none is given."""
    inputs, flags = _given_flags(x)
    if "mask" not in flags:
        mask = chain.compute_mask(inputs)
        if mask is not None:
            flags["mask"] = mask
    return inputs, flags


def _given_flags(x) -> tuple:
    if not isinstance(x, dict):
        return x, {}
    if "inputs" not in x or set(x) - {"inputs", "reset", "mask"}:
        raise ValueError(
            "x must be inputs [B, T, F] or a dict with 'inputs' and optionally "
            f"'reset' and 'mask' ([B, T] bool), got a dict with keys {sorted(x)}."
        )
    return x["inputs"], {name: x[name] for name in ("reset", "mask") if x.get(name) is not None}


def _with_weight_penalty(model: ChunkedModel, grads: list, variables: list) -> tuple:
    """The layers' weight regularization (`model.losses`), added once per step as Keras's own
    train_step adds it (its share of each replica: the replicas' gradients are summed):
    ``(grads + its gradients, the penalty)``."""
    dtype = model.chunk_loss.dtype
    if not model.losses:
        return grads, tf.zeros([], dtype)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    with tf.GradientTape() as tape:
        penalty = tf.cast(tf.add_n(model.losses), dtype)
        scaled = penalty * model.chunk_loss.scale() / replicas
    extra = tape.gradient(scaled, variables) if variables else []
    # An embedding's rows plus its penalty's gradient: dense, as one tape gives their sum.
    return [
        g if e is None else tf.convert_to_tensor(g) + tf.cast(e, g.dtype)
        for g, e in zip(grads, extra)
    ], penalty


def _check_chain(chain, stateful: bool) -> None:
    """What a ChunkedModel needs of Keras and of its chain, checked before it is made."""
    if compat.KERAS_MAJOR < 3:
        raise ImportError(
            "tbptt.keras.ChunkedModel needs Keras 3 (TensorFlow >= 2.16), found "
            f"Keras {keras.__version__}. With Keras 2, call "
            "chain.value_and_gradients in your own training loop."
        )
    if not isinstance(chain, RecurrentChain):
        raise TypeError(checks.CHAIN_MSG.format(value=chain))
    if stateful and chain.config.schedule.context_chunks:
        check_window(chain.config, None)  # refuses chunk_size="auto"
    _refuse_activity_regularizers(chain)


def _refuse_activity_regularizers(chain: RecurrentChain) -> None:
    """Activity penalties are added while a layer runs, once per chunk inside the compiled
    chunk loop, where fit cannot collect them: refused rather than silently left out."""
    for part in chain.cells + ([chain.head] if chain.head is not None else []):
        for layer in compat.sublayers(part):
            if getattr(layer, "activity_regularizer", None) is not None or (
                type(layer).__name__ == "ActivityRegularization"
            ):
                raise ValueError(
                    f"{layer.name} has an activity regularizer, which ChunkedModel cannot add "
                    "(it is computed inside each chunk). Add the penalty to the loss instead, "
                    "or regularize the weights (kernel_regularizer works)."
                )


def _predictions(chain: RecurrentChain, carry: StreamCarry | None, inputs, flags: dict):
    """The predictions before the update, from the carried state, the carried context re-run in
    front of the window as the gradient step runs it."""
    if carry is None:
        return chain(inputs, training=False, **flags)[0]
    context = {
        name: value for name, value in carry.context.items() if name in flags or name == "inputs"
    }
    joined = join_context(context, {"inputs": inputs, **flags}, chain.dtype)
    outputs = chain(joined.pop("inputs"), carry.state, training=False, **joined)[0]
    return outputs[:, tf.shape(context["inputs"])[1] :] if context else outputs

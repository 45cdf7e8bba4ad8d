"""The compiled loss of a `ChunkedModel` as the chain's per-chunk `loss_fn`: the user's loss
object itself (computed in the chain's loss dtype, every setting kept), with Keras's scaling
for mixed precision and distribution, and the loss of a whole sequence as Keras logs it."""

import keras
import tensorflow as tf

from tbptt._src.core import compat, segments
from tbptt._src.recurrent import losses


class ChunkLoss(keras.losses.Loss):
    """The compiled loss as the chain's per-chunk `loss_fn`: the Keras loss itself (which, as
    in Keras's own `train_step`, divides a mean by the replicas of a tf.distribute strategy,
    whose gradients are summed), times the optimizer's loss scale (mixed precision). It
    computes in the chain's loss dtype (float64 for a float64 chain: the user's loss object
    itself, its inputs cast, every setting it holds kept) and shows the chain its reduction and
    kept labels, so the chunk losses add up as the loss of the whole sequence would (see
    `tbptt._src.recurrent.losses`)."""

    def __init__(self, model):
        dtype = segments.loss_dtype_for(model.chain.dtype)
        self._model_ref = lambda: model  # not an attribute Keras would track
        self.inner = _keras_loss(model.loss, dtype)
        reduction = getattr(self.inner, "reduction", None)
        if reduction in (None, "none"):
            raise ValueError(
                "the compiled loss must reduce to a scalar per chunk: reduction "
                "'sum_over_batch_size' (the default: whole-sequence mean), 'sum' or "
                f"'mean_with_sample_weight', got {reduction!r}."
            )
        super().__init__(name=self.inner.name, reduction=reduction, dtype=dtype.name)
        self.ignore_class = getattr(self.inner, "ignore_class", None)
        self.combine = losses.reduction_of("auto", self).combine

    def scale(self) -> tf.Tensor:
        """The optimizer's loss scale."""
        scale = self._model_ref().optimizer.scale_loss(tf.ones([], self.dtype))
        return tf.cast(scale, self.dtype)

    def call(self, y_true, y_pred):
        return self.inner.call(y_true, y_pred)

    def __call__(self, y_true, y_pred, sample_weight=None):
        return tf.cast(self.unscaled(y_true, y_pred, sample_weight), self.dtype) * self.scale()

    def unscaled(self, y_true, y_pred, sample_weight=None):
        """The user's loss of a chunk (or a whole sequence), without the loss scale: computed
        by the loss itself, in the chain's loss dtype where the loss computes in a narrower
        one (Keras's `Loss.__call__` run with this wrapper's dtype on the loss's own `call`,
        so no setting is lost), else as the loss computes it."""
        if tf.as_dtype(self.inner.dtype) == tf.as_dtype(self.dtype) or not _keras_call(self.inner):
            return self.inner(y_true, y_pred, sample_weight)
        return keras.losses.Loss.__call__(self, y_true, y_pred, sample_weight)

    def logged(self, total: tf.Tensor) -> tf.Tensor:
        """The chain's total loss as Keras logs a loss: without the loss scale, and times
        the replicas (Keras's own `unscale_loss_for_distribution`)."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return total / tf.cast(self.scale(), total.dtype) * replicas

    def whole_sequence(self, y_true, y_pred, sample_weight, mask) -> tf.Tensor:
        """The loss of a whole sequence in one piece as Keras computes and logs it, a mask
        attached to the predictions (the chain's chunk losses add up to it)."""
        loss = self.unscaled(y_true, with_keras_mask(y_pred, mask), sample_weight)
        return self.logged(tf.cast(loss, self.dtype) * self.scale())


def _keras_call(loss) -> bool:
    """Whether `loss` is computed by Keras's own `Loss.__call__` (its `call`, then Keras's
    reduction): then it can be run in another dtype without being remade."""
    return type(loss).__call__ is keras.losses.Loss.__call__


class _FunctionLoss(keras.losses.Loss):
    """A function loss (per-step values) as a Keras loss with the default mean reduction."""

    def __init__(self, fn, dtype: tf.DType):
        super().__init__(name=getattr(fn, "__name__", "loss"), dtype=dtype.name)
        self._fn = fn

    def call(self, y_true, y_pred):
        return self._fn(y_true, y_pred)


def _keras_loss(loss, dtype: tf.DType):
    """The compiled loss as a Keras loss: a loss object as given (never remade: `get_config`
    need not hold every setting), a name as Keras makes it, a function wrapped."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss
    if callable(loss):
        return _FunctionLoss(loss, dtype)
    raise ValueError(
        "ChunkedModel needs one loss for its one output: a Keras loss object, a loss "
        "name or a function loss_fn(y_true, y_pred) -> per-step values; got "
        f"{loss!r}."
    )


def with_keras_mask(y_pred, mask):
    """The predictions with `mask` as their Keras mask, as a masked Keras model hands them to
    its loss and metrics (which then count the unmasked steps only)."""
    if mask is None or y_pred is None:
        return y_pred
    return compat.with_keras_mask(y_pred, tf.cast(mask, tf.bool))

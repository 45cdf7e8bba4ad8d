"""How a call's chunk losses add up to the whole sequence's loss, and which losses can.

The chain computes `loss_fn` on each chunk and adds the chunk losses, each with a weight:

```
total = sum_k weight_k * loss_fn(targets_k, predictions_k[, sample_weight_k])
```

That equals the loss of the whole sequence in one piece only when the loss is a sum, or a
mean, of per-step terms; the weight is then what the chunk's own loss is divided by over what
the whole sequence's is divided by (`Reduction.share`). `reduction="auto"` reads both from a
Keras loss: its reduction and, where it averages over kept labels only
(`SparseCategoricalCrossentropy(ignore_class=...)`), the labels it keeps. Whether a Keras loss's
values are per step is checked when the chain is traced, on the chunk's own tensors
(`check_per_step`): a loss that reduces over the time axis (Dice, Tversky, a cosine over time)
or that masks its values otherwise is refused, never approximated.
"""

from typing import Any, NamedTuple

import tensorflow as tf

from tbptt._src.core import compat

# Keras loss reductions that average over the elements (Keras 3, and tf.keras's "auto").
MEAN_LOSS_REDUCTIONS = ("sum_over_batch_size", "mean", "auto")


class Reduction(NamedTuple):
    """How one call's chunk losses add up.

    Attributes:
      combine: "sum" (weight 1) or "mean" (each chunk weighted by its `share`).
      share: what a chunk's loss and the whole sequence's are divided by, counted over the
        chunk and over the sequence: "steps" (elements: the chunk's steps over the unmasked
        steps), "kept" (the labels other than `ignore_class`, as Keras counts them), "weights"
        (the sum of the sample weights: Keras's "mean_with_sample_weight"); None with "sum".
      keras_loss: a Keras loss whose values are checked to be per step when traced, or None.
      ignore_class: the label `keras_loss` leaves out of its mean, or None.
    """

    combine: str
    share: str | None = None
    keras_loss: Any = None
    ignore_class: int | None = None


def reduction_of(chain_reduction: str, loss_fn) -> Reduction:
    """The `Reduction` of a call: the chain's `reduction` when it is "sum" or "mean" (the chain
    then trusts the loss to be a sum, or a per-element mean, of per-step terms); with "auto",
    what a Keras loss says of itself, and "sum" for any other callable (which returns its
    chunk's total)."""
    if chain_reduction == "sum":
        return Reduction("sum")
    if chain_reduction == "mean":
        return Reduction("mean", "steps")
    if not is_keras_loss(loss_fn):
        return Reduction("sum")
    own = getattr(loss_fn, "reduction", None)
    ignore_class = getattr(loss_fn, "ignore_class", None)
    if own == "sum":
        return Reduction("sum", keras_loss=loss_fn, ignore_class=ignore_class)
    if own == "mean_with_sample_weight":
        if ignore_class is not None:
            raise ValueError(
                "reduction='auto' cannot follow a loss with ignore_class and "
                "reduction 'mean_with_sample_weight'. Give it reduction "
                "'sum_over_batch_size' or 'sum'."
            )
        return Reduction("mean", "weights", loss_fn)
    if isinstance(own, str) and own in MEAN_LOSS_REDUCTIONS:
        return Reduction(
            "mean", "kept" if ignore_class is not None else "steps", loss_fn, ignore_class
        )
    raise ValueError(
        f"reduction='auto' cannot follow loss_fn's reduction {own!r}: the chain "
        "needs one scalar per chunk. Give the loss reduction='sum' or "
        "'sum_over_batch_size', or pass the chain's reduction explicitly."
    )


def is_keras_loss(loss_fn) -> bool:
    return isinstance(loss_fn, compat.keras.losses.Loss) or isinstance(
        loss_fn, tf.keras.losses.Loss
    )


def check_per_step(reduction: Reduction, y_true: tf.Tensor, y_pred: tf.Tensor) -> None:
    """Refuses a Keras loss whose values are not one per step (and row), or that masks them
    otherwise than by `ignore_class`: the sum of its chunk losses would belong to another loss.

    Reads the static shape of `loss.call` on the chunk's own tensors, as the chain traces it
    (what no other op uses is pruned from the compiled function). What it cannot see: a
    `call` that returns per-step values but mixes steps into them (a cumulative sum over
    time); `reduction="sum"` with a loss returning its chunk's total is the way to say
    what such a loss adds up to.
    """
    loss = reduction.keras_loss
    if loss is None:
        return
    dtype = tf.as_dtype(getattr(loss, "dtype", None) or y_pred.dtype)
    values = loss.call(tf.cast(y_true, dtype), tf.cast(y_pred, dtype))
    shape = getattr(values, "shape", tf.TensorShape(None))
    name = type(loss).__name__
    if (
        shape.rank is None
        or shape.rank < 2
        or not shape[1:2].is_compatible_with(y_pred.shape[1:2])
        or (shape[1] is None) != (y_pred.shape[1] is None)
    ):
        raise ValueError(
            f"loss_fn ({name}) is not a mean or sum of per-step terms: on a chunk of "
            f"predictions {y_pred.shape.as_list()} its values have shape {_dims(shape)}, "
            "not [batch, steps, ...], so the chunk losses would not add up to the loss of the "
            "whole sequence (a Dice or Tversky loss, a cosine over the time axis). Compute it "
            "on the whole sequence outside the chunked gradient, or pass the chain "
            "reduction='sum' with a loss_fn that returns the total a chunk adds."
        )
    if compat.keras_mask(values) is not None and reduction.ignore_class is None:
        raise ValueError(
            f"loss_fn ({name}) masks its own values, so its mean counts only the kept "
            "elements of each chunk, which the chain cannot add up. Give it reduction='sum' "
            "and divide by the count yourself, or pass the chain reduction='sum'."
        )


def kept_labels(targets: tf.Tensor, ignore_class: int) -> tf.Tensor:
    """``[B, t]`` bool: True where the label is not `ignore_class` (sparse labels ``[B, t]`` or
    ``[B, t, 1]``, as Keras's SparseCategoricalCrossentropy takes them)."""
    labels = targets if targets.shape.rank == 2 else tf.squeeze(targets, axis=-1)
    return tf.not_equal(tf.cast(labels, tf.int64), ignore_class)


def _dims(shape: tf.TensorShape):
    return shape.as_list() if shape.rank is not None else None

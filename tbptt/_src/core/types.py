"""Type aliases and result records shared by the public API."""

from collections.abc import Callable
from typing import Any, NamedTuple

import tensorflow as tf

# A nest (tuple/list/dict) of tensors: the carried state, one entry per layer.
State = Any
# loss_fn(y_true_chunk, y_pred_chunk[, sample_weight_chunk]) -> scalar tensor.
LossFn = Callable[..., tf.Tensor]


class ChainResult(NamedTuple):
    """What `value_and_gradients` returns.

    Attributes:
      loss: scalar, the total loss over all chunks (weighted by `reduction`).
      grads: one gradient per entry of `chain.trainable_variables`, same shapes; an
        `Embedding` table's is `tf.IndexedSlices` (one row per lookup), as one tape gives it
        (`tf.convert_to_tensor` sums it densely; `embedding_grads="dense"` returns it so).
      final_state: the state after the last step, no gradient attached. Carry it into the next
        batch as its `initial_state`.
      initial_state_grad: dLoss/d(initial_state), same structure as the state. Hand it to the
        previous batch as its `final_state_grad`.
    """

    loss: tf.Tensor
    grads: list
    final_state: State
    initial_state_grad: State

"""Chunked back-propagation inside a user's own TF1-style graph, and TF1 GRU weights for TF2.

For code written with placeholders, `tf.compat.v1.nn.dynamic_rnn` and a `Session`: the graph
already holds every chunk; `backprop_chunks` adds, for each chunk in reverse, one
`tf.gradients(..., grad_ys=...)` call that stops at the chunk's own input state, so the carried
dLoss/dstate crosses each cut as the `grad_ys` of the chunk before it (seed 001).
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tbptt._src.core import chain as chain_lib
from tbptt._src.core import schedules, segments
from tbptt._src.core import vjp as vjp_lib
from tbptt._src.core.types import State


class BackpropChunksResult(NamedTuple):
    """Graph tensors to `sess.run`.

    Attributes:
      grads: dLoss/dW, aligned with `variables` (also `variable_grads`, its first name).
      state_grads: dLoss/ds_k for every boundary state, aligned with `boundary_states`.
      initial_state_grad: dLoss/ds_0 (= state_grads[0]): the previous mini-batch's
        `final_state_grad`.
    """

    grads: list
    state_grads: list
    initial_state_grad: State

    @property
    def variable_grads(self) -> list:
        """`grads`, under the name of TF1's `tf.gradients(loss, variables)`."""
        return self.grads


def backprop_chunks(
    chunk_losses: Sequence[tf.Tensor],
    boundary_states: Sequence[State],
    variables: Sequence | None = None,
    final_state_grad: State | None = None,
) -> BackpropChunksResult:
    """The exact gradient of sum_k chunk_losses[k], one chunk's backward pass at a time.

    ```
    g_n = final_state_grad (or 0)
    for k = n .. 1:   dW_k, g_{k-1} = tf.gradients([L_k, s_k], W + [s_{k-1}], grad_ys=[1, g_k],
                                                   stop_gradients=[s_{k-1}])
    grads = sum_k dW_k ;  state_grads = [g_0 .. g_n]
    ```

    Chunk k must reach earlier chunks only through its input state s_{k-1}: that is where its
    backward pass stops. States may be nests (LSTMStateTuple, MultiRNNCell tuples); a chunk whose
    state does not reach any loss gets zeros, not None.

    Args:
      chunk_losses: n scalar tensors L_1 .. L_n.
      boundary_states: n + 1 states s_0 .. s_n: s_0 enters chunk 1, s_k leaves chunk k.
      variables: variables to differentiate; default the graph's trainable variables.
      final_state_grad: dLoss/ds_n from outside (the next mini-batch), a nest like s_n.

    Returns:
      `BackpropChunksResult(grads, state_grads, initial_state_grad)` (`grads` is also
      `variable_grads`).

    Raises:
      RuntimeError: when executing eagerly. ValueError: on mismatched lengths or structures.
    """
    chunk_losses, flat_states, final_state_grad = _checked(
        chunk_losses, boundary_states, final_state_grad
    )
    variables = list(tf.compat.v1.trainable_variables() if variables is None else variables)
    linearized = [
        _linearized(loss, flat_states[k], flat_states[k + 1], variables)
        for k, loss in enumerate(chunk_losses)
    ]
    dtype = segments.loss_dtype_for(chunk_losses[0].dtype)
    result = chain_lib.static_backward(linearized, schedules.Exact(), dtype, final_state_grad)
    grads = [tf.add_n(list(parts)) for parts in zip(*result.grads)]
    structure = boundary_states[0]
    packed = [tf.nest.pack_sequence_as(structure, g) for g in result.carry_grads]
    packed.append(tf.nest.pack_sequence_as(structure, final_state_grad))
    return BackpropChunksResult(grads, packed, packed[0])


def _linearized(loss, state_in: list, state_out: list, variables: list):
    """Chunk k of a graph that holds every chunk, as a linearized segment: its pullback is
    tf.gradients from its outputs (L_k, s_k), stopped at its input state s_{k-1}."""
    outputs = [loss] + state_out
    pullback = vjp_lib.graph_pullback(outputs, variables, state_in, stop_at_primals=True)
    return lambda: (outputs, pullback)


def _checked(chunk_losses, boundary_states, final_state_grad):
    """The losses as tensors, the states and final_state_grad as flat lists, checked."""
    if tf.executing_eagerly():
        raise RuntimeError(
            "backprop_chunks builds graph tensors with tf.gradients: call it while "
            "building a graph (TF1-style code under tf.Graph().as_default(), or in "
            "a tf.function). In eager code use "
            "tbptt.RecurrentChain.value_and_gradients."
        )
    chunk_losses, boundary_states = list(chunk_losses), list(boundary_states)
    if not chunk_losses:
        raise ValueError("chunk_losses must hold at least one chunk's loss, got none.")
    if len(boundary_states) != len(chunk_losses) + 1:
        raise ValueError(
            "boundary_states must hold one state per cut, len(chunk_losses) + 1 = "
            f"{len(chunk_losses) + 1} (the initial state, then the state after each "
            f"chunk), got {len(boundary_states)}."
        )
    flat_states = [
        _flat(f"boundary_states[{k}]", s, boundary_states[0]) for k, s in enumerate(boundary_states)
    ]
    if final_state_grad is None:
        final_state_grad = [tf.zeros_like(s) for s in flat_states[-1]]
    else:
        final_state_grad = _flat("final_state_grad", final_state_grad, boundary_states[0])
        for index, (grad, state) in enumerate(zip(final_state_grad, flat_states[-1])):
            if not grad.shape.is_compatible_with(state.shape):
                raise ValueError(
                    f"final_state_grad: entry {index} must have the shape of the "
                    f"last state, {state.shape.as_list()}, got "
                    f"{grad.shape.as_list()}."
                )
    chunk_losses = [tf.convert_to_tensor(loss) for loss in chunk_losses]
    for k, loss in enumerate(chunk_losses):
        if loss.shape.rank not in (None, 0):
            raise ValueError(
                f"chunk_losses[{k}] must be a scalar, got shape "
                f"{loss.shape.as_list()}. Reduce it, e.g. with tf.reduce_sum."
            )
        if not _depends_on([loss] + flat_states[k + 1], flat_states[k]):
            raise ValueError(
                f"neither chunk_losses[{k}] nor boundary_states[{k + 1}] depends on "
                f"boundary_states[{k}]: each chunk's outputs must be computed from the state "
                "before it, or the gradient cannot cross the cut. Pass the states in order "
                "(the initial state, then the state each chunk returns), the very tensors "
                "the chunks use."
            )
    return chunk_losses, flat_states, final_state_grad


def _depends_on(outputs: list, sources: list) -> bool:
    """Whether any of `outputs` is computed from any of `sources` (a walk up the graph)."""
    targets = {id(s) for s in sources}
    if any(id(t) in targets for t in outputs):
        return True
    seen, pending = set(), [t.op for t in outputs]
    while pending:
        op = pending.pop()
        if id(op) in seen:
            continue
        seen.add(id(op))
        for tensor in op.inputs:
            if id(tensor) in targets or any(tensor is s for s in sources):
                return True
            pending.append(tensor.op)
    return False


def _flat(name: str, state, reference) -> list:
    leaves, expected = tf.nest.flatten(state), tf.nest.flatten(reference)
    if len(leaves) != len(expected):
        raise ValueError(
            f"{name} must have the structure of boundary_states[0] ({len(expected)} "
            f"tensors), got {len(leaves)} tensors."
        )
    return [tf.convert_to_tensor(leaf) for leaf in leaves]


def gru_weights_from_tf1(gates_kernel, gates_bias, candidate_kernel, candidate_bias) -> list:
    """TF1 `GRUCell` weights as `[kernel, recurrent_kernel, bias]` of a Keras
    `GRUCell(units, reset_after=False)`, which computes the same function.

    TF1 (`tf.compat.v1.nn.rnn_cell.GRUCell`):
    ```
    r, u = split(sigmoid([x, h] @ gates_kernel + gates_bias), 2)
    c = tanh([x, r * h] @ candidate_kernel + candidate_bias);   h' = u * h + (1 - u) * c
    ```
    Keras: kernel ``[in, 3*units]`` and recurrent kernel ``[units, 3*units]`` in gate order
    (z, r, h), with z = TF1's u; one bias ``[3*units]``.

    Args:
      gates_kernel: ``[in + units, 2 * units]`` (TF1 `gates/kernel`, columns r then u).
      gates_bias: ``[2 * units]``.
      candidate_kernel: ``[in + units, units]``.
      candidate_bias: ``[units]``.

    Returns:
      NumPy arrays for `cell.set_weights(...)`. The same permutation maps TF1 gradients.

    Example:

    >>> import numpy as np
    >>> kernel, recurrent, bias = gru_weights_from_tf1(np.ones([5, 4]), np.ones([4]),
    ...                                                np.ones([5, 2]), np.ones([2]))
    >>> kernel.shape, recurrent.shape, bias.shape
    ((3, 6), (2, 6), (6,))
    """
    arrays = [np.asarray(a) for a in (gates_kernel, gates_bias, candidate_kernel, candidate_bias)]
    gates_kernel, gates_bias, candidate_kernel, candidate_bias = arrays
    units = candidate_bias.shape[0] if candidate_bias.ndim == 1 else -1
    inputs = gates_kernel.shape[0] - units if gates_kernel.ndim == 2 else -1
    expected = [(inputs + units, 2 * units), (2 * units,), (inputs + units, units), (units,)]
    if inputs < 1 or [a.shape for a in arrays] != expected:
        raise ValueError(
            "TF1 GRUCell weights must be gates kernel [in+units, 2*units], gates "
            "bias [2*units], candidate kernel [in+units, units], candidate bias "
            f"[units]; got {[a.shape for a in arrays]}."
        )
    reset, update = gates_kernel[:, :units], gates_kernel[:, units:]
    zrh = np.concatenate([update, reset, candidate_kernel], axis=1)  # [in + units, 3 units]
    bias = np.concatenate([gates_bias[units:], gates_bias[:units], candidate_bias])
    return [zrh[:inputs], zrh[inputs:], bias]

"""Independent references for the chain's gradients, shared by the test modules.

None of them runs the library's own forward or backward: the forward is Keras's
`RNN(StackedRNNCells(cells))` (a Python loop over steps calling each cell, for cells that are no
Keras layer) followed by the head, and the gradients come from one `tf.GradientTape` over it.
"""

import keras
import numpy as np
import tensorflow as tf

from tbptt._src.core import compat


def _layer_states(chain, state):
    """A chain state nest (tuple per layer) as Keras RNN's list per layer."""
    return [list(s) if isinstance(s, tuple) else s for s in state]


def _chain_state(chain, layer_states):
    return tuple(tuple(s) if isinstance(s, (list, tuple)) else s for s in layer_states)


def _python_loop(cells, inputs, layer_states):
    """One `cell(x_t, states)` per layer and step, for cells that are no Keras layer."""
    outputs, states = [], [list(s) if isinstance(s, (list, tuple)) else [s] for s in layer_states]
    for t in range(inputs.shape[1]):
        x = inputs[:, t]
        for index, cell in enumerate(cells):
            x, new = cell(x, states[index])
            states[index] = tf.nest.flatten(new)
        outputs.append(x)
    layer_states = [s if len(s) > 1 else s[0] for s in states]
    return tf.stack(outputs, axis=1), layer_states


def forward(chain, inputs, state=None):
    """The chain's function computed without the library: ``(outputs [B, T, O], state)``."""
    inputs = tf.convert_to_tensor(inputs, chain.dtype)
    if state is None:
        state = chain.initial_state(inputs.shape[0])
    state = tf.nest.map_structure(lambda s: tf.cast(s, chain.dtype), state)
    cells = chain.cells
    if all(compat.is_keras_layer(cell) for cell in cells):
        stacked = keras.layers.StackedRNNCells(cells, dtype=chain.dtype)
        rnn = keras.layers.RNN(stacked, return_sequences=True, return_state=True, dtype=chain.dtype)
        outputs, *layer_states = rnn(inputs, initial_state=_layer_states(chain, state))
    else:
        outputs, layer_states = _python_loop(cells, inputs, _layer_states(chain, state))
    if chain.head is not None:
        outputs = chain.head(outputs)
    return outputs, _chain_state(chain, layer_states)


def full_bptt(
    chain, inputs, targets, loss_fn, initial_state=None, final_state_grad=None, sample_weight=None
):
    """Full BPTT: one tape over `forward`, whole-sequence loss.

    Only valid for reduction="sum" with a loss that is a sum over steps. Returns
    (loss, grads, final_state, initial_state_grad).
    """
    if initial_state is None:
        initial_state = chain.initial_state(inputs.shape[0])
    initial_state = tf.nest.map_structure(tf.convert_to_tensor, initial_state)
    with tf.GradientTape() as tape:
        tape.watch(initial_state)
        outputs, final_state = forward(chain, inputs, initial_state)
        args = [targets, outputs] + ([sample_weight] if sample_weight is not None else [])
        loss = loss_fn(*args)
        total = loss
        if final_state_grad is not None:
            total = total + tf.add_n(
                [
                    tf.reduce_sum(tf.cast(g, s.dtype) * s)
                    for g, s in zip(tf.nest.flatten(final_state_grad), tf.nest.flatten(final_state))
                ]
            )
    grads = tape.gradient(total, [chain.trainable_variables, initial_state])
    return loss, grads[0], final_state, grads[1]


def stepwise_forward(chain, inputs, state, reset=None, mask=None):
    """The chain's function with per-step flags, one Keras cell call per layer and step: a
    reset zeroes a row's state before its step, a masked step keeps the row's state."""
    inputs = tf.convert_to_tensor(inputs, chain.dtype)
    layers = [list(s) if isinstance(s, (list, tuple)) else [s] for s in state]
    outputs = []
    for t in range(inputs.shape[1]):
        x = inputs[:, t]
        for index, cell in enumerate(chain.cells):
            states = layers[index]
            if reset is not None:
                states = [tf.where(reset[:, t : t + 1], tf.zeros_like(s), s) for s in states]
            x, new = cell(x, [tf.cast(s, chain.dtype) for s in states])
            new = tf.nest.flatten(new)
            if mask is not None:
                new = [tf.where(mask[:, t : t + 1], n, s) for n, s in zip(new, states)]
            layers[index] = new
        outputs.append(x)
    outputs = tf.stack(outputs, axis=1)
    if chain.head is not None:
        outputs = chain.head(outputs)
    return outputs, tuple(tuple(s) if len(s) > 1 else s[0] for s in layers)


def truncated_reference(
    chain,
    x,
    y,
    loss_fn,
    m,
    initial_state,
    final_state_grad=None,
    sample_weight=None,
    reset=None,
    mask=None,
):
    """TBPTT(K, mK) written out: loss L_j back-propagates through chunks j-m+1 .. j only, each
    term run from the boundary state, which is stop_gradient-ed where the cotangent is dropped.
    With flags (`reset`, `mask` [B, T] bool) the forward is `stepwise_forward` and `loss_fn`
    gets the chunk's sample weight times its mask.

    Returns (loss, grads, initial_state_grad).
    """
    size, steps = chain.chunk_size, x.shape[1]
    count = -(-steps // size)
    flagged = reset is not None or mask is not None or sample_weight is not None

    def run(a, b, state):
        if not flagged:
            return forward(chain, x[:, a:b], state)
        return stepwise_forward(
            chain,
            x[:, a:b],
            state,
            None if reset is None else reset[:, a:b],
            None if mask is None else mask[:, a:b],
        )

    boundaries, state = [initial_state], initial_state
    for j in range(count):
        _, state = run(j * size, (j + 1) * size, state)
        boundaries.append(state)

    def run_from(start, stop, s0):
        """Chunks start..stop-1 from the boundary state, cut where the cotangent drops."""
        if start >= 0:
            return run(
                start * size,
                stop * size,
                tf.nest.map_structure(tf.stop_gradient, boundaries[start]),
            )
        return run(0, stop * size, s0)

    def chunk_loss(j, outputs):
        window = slice(j * size, (j + 1) * size)
        chunk_steps = x[:, window].shape[1]
        args = [y[:, window], outputs[:, -chunk_steps:]]
        if flagged:
            weight = np.ones(x.shape[:2]) if sample_weight is None else sample_weight
            weight = weight if mask is None else weight * mask
            args.append(weight[:, window])
        return loss_fn(*args)

    s0 = tf.nest.map_structure(tf.convert_to_tensor, initial_state)
    with tf.GradientTape() as tape:
        tape.watch(s0)
        total = 0.0
        for j in range(count):
            outputs, _ = run_from(j - m + 1, j + 1, s0)
            total += chunk_loss(j, outputs)
        if final_state_grad is not None and m > 1:
            _, last = run_from(count - m + 1, count, s0)
            total += tf.add_n(
                [
                    tf.reduce_sum(g * s)
                    for g, s in zip(tf.nest.flatten(final_state_grad), tf.nest.flatten(last))
                ]
            )
    grads, state_grad = tape.gradient(
        total, [chain.trainable_variables, s0], unconnected_gradients="zero"
    )
    return total, grads, state_grad

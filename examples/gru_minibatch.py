"""Seed 001's first model: carry the state forward and dLoss/dstate back across consecutive
mini-batches of one stream, in a TF1 graph with a Session and with the TF2 chain.

The thread's model: MultiRNNCell of GRU 64 and 32 (state concatenated to 96), batch 34, 200
features, a dense output layer to 3 labels, mini-batches of 100 steps. Here one stream of 300
steps is cut into 3 consecutive mini-batches. After the forward pass over them, the backward
pass runs the mini-batches in reverse, each fed the next one's dLoss/d(initial_state) as the
`grad_ys` of its final state. The summed gradients equal one pass over the whole stream.

    python examples/gru_minibatch.py          # or: tbptt reproduce gru-minibatch
"""

import sys

import _legacy  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import keras
import numpy as np
import tensorflow as tf

import tbptt

v1 = tf.compat.v1
BATCH, FEATURES, LABELS, UNITS, WINDOW, WINDOWS = 34, 200, 3, (64, 32), 100, 3
# float32 over a 300-step stream: the mini-batch route adds per-step terms in another order
# than one pass; ~1e-6 relative in practice, 1e-4 leaves a margin (a dropped carried gradient
# changes the first layer's gradient by far more).
TOLERANCE = 1e-4


def stream():
    rng = np.random.RandomState(0)
    x = rng.randn(BATCH, WINDOW * WINDOWS, FEATURES).astype("float32")
    y = rng.randn(BATCH, WINDOW * WINDOWS, LABELS).astype("float32")
    return x, y


def l1(labels, predictions):
    return tf.reduce_sum(tf.sqrt(tf.square(predictions - labels)))


def build_tf1_graph():
    """The thread's model(), with a time axis of any length."""
    inputs = v1.placeholder(tf.float32, [BATCH, None, FEATURES], name="input_features")
    labels = v1.placeholder(tf.float32, [BATCH, None, LABELS], name="labels")
    initial_state = v1.placeholder(tf.float32, [None, sum(UNITS)], name="initial_state")
    final_state_grad = v1.placeholder(tf.float32, [None, sum(UNITS)], name="final_state_grad")
    with v1.variable_scope("GRU"):
        cells = [v1.nn.rnn_cell.GRUCell(units) for units in UNITS]
        mcell = v1.nn.rnn_cell.MultiRNNCell(cells, state_is_tuple=False)
        output, new_state = v1.nn.dynamic_rnn(mcell, inputs, initial_state=initial_state)
    with v1.variable_scope("output_layer"):
        fc_w = v1.get_variable("fc_weights", [UNITS[-1], LABELS])
        fc_b = v1.get_variable("fc_bias", [LABELS], initializer=v1.zeros_initializer())
        predictions = tf.reshape(
            tf.reshape(output, [-1, UNITS[-1]]) @ fc_w + fc_b, [BATCH, -1, LABELS]
        )
    loss = l1(labels, predictions)
    # One mini-batch is one chunk: its final state takes the next mini-batch's dL/dstate.
    backprop = tbptt.compat.v1.backprop_chunks(
        [loss], [initial_state, new_state], final_state_grad=final_state_grad
    )
    return dict(
        inputs=inputs,
        labels=labels,
        initial_state=initial_state,
        final_state_grad=final_state_grad,
        new_state=new_state,
        loss=loss,
        backprop=backprop,
        cells=cells,
        dense=[fc_w, fc_b],
    )


def tf1_session(graph_ops, x, y):
    """Mini-batches carried by hand in a Session, and one pass over the whole stream."""
    g = graph_ops
    zeros = np.zeros([BATCH, sum(UNITS)], "float32")
    with v1.Session() as sess:
        sess.run(v1.global_variables_initializer())
        windows = [
            (x[:, i * WINDOW : (i + 1) * WINDOW], y[:, i * WINDOW : (i + 1) * WINDOW])
            for i in range(WINDOWS)
        ]
        states = [zeros]
        for xb, _ in windows:  # forward: carry the state
            states.append(
                sess.run(g["new_state"], {g["inputs"]: xb, g["initial_state"]: states[-1]})
            )
        carried, totals = zeros, None
        for i in reversed(range(WINDOWS)):  # backward: carry dL/dstate
            xb, yb = windows[i]
            grads, carried = sess.run(
                [g["backprop"].variable_grads, g["backprop"].initial_state_grad],
                {
                    g["inputs"]: xb,
                    g["labels"]: yb,
                    g["initial_state"]: states[i],
                    g["final_state_grad"]: carried,
                },
            )
            totals = grads if totals is None else [t + d for t, d in zip(totals, grads)]
        whole = sess.run(
            g["backprop"].variable_grads,
            {
                g["inputs"]: x,
                g["labels"]: y,
                g["initial_state"]: zeros,
                g["final_state_grad"]: zeros,
            },
        )
        weights = sess.run([c.variables for c in g["cells"]] + [g["dense"]])
    return totals, whole, carried, weights


def tf2_chain(weights, x, y):
    """The same model as a TF2 chain, mini-batches carried with final_state_grad."""
    cells = [keras.layers.GRUCell(units, reset_after=False) for units in UNITS]
    dense = keras.layers.Dense(LABELS)
    chain = tbptt.RecurrentChain(cells, head=dense, chunk_size=50)  # 2 chunks per mini-batch
    chain.build(x.shape)
    for cell, tf1_weights in zip(cells, weights[:2]):
        cell.set_weights(tbptt.compat.v1.gru_weights_from_tf1(*tf1_weights))
    dense.set_weights(weights[2])
    windows = [
        (x[:, i * WINDOW : (i + 1) * WINDOW], y[:, i * WINDOW : (i + 1) * WINDOW])
        for i in range(WINDOWS)
    ]
    states = [chain.initial_state(BATCH)]
    for xb, _ in windows:
        states.append(chain(xb, states[-1])[1])
    carried, totals = None, None
    for i in reversed(range(WINDOWS)):
        xb, yb = windows[i]
        result = chain.value_and_gradients(
            xb, yb, l1, initial_state=states[i], final_state_grad=carried
        )
        carried = result.initial_state_grad
        totals = result.grads if totals is None else [t + d for t, d in zip(totals, result.grads)]
    return [t.numpy() for t in totals], np.concatenate([c.numpy() for c in carried], axis=-1)


def keras_layout(tf1_grads):
    return (
        tbptt.compat.v1.gru_weights_from_tf1(*tf1_grads[0:4])
        + tbptt.compat.v1.gru_weights_from_tf1(*tf1_grads[4:8])
        + list(tf1_grads[8:])
    )


def main() -> int:
    _legacy.quiet_tf1_warnings()
    _legacy.require_legacy_cells()
    x, y = stream()
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(1)
        ops = build_tf1_graph()
        print("gradient tensors of one mini-batch (as printed in the thread):")
        for grad in ops["backprop"].variable_grads:
            print(f"  v {grad.name:<60} shape={tuple(grad.shape)}")
        tf1_minibatches, tf1_whole, tf1_state_grad, weights = tf1_session(ops, x, y)
    tf2_minibatches, tf2_state_grad = tf2_chain(weights, x, y)
    reference = keras_layout(tf1_whole)
    rows = [
        ("TF1 Session, 3 mini-batches carried", keras_layout(tf1_minibatches)),
        ("TF2 RecurrentChain, 3 mini-batches", tf2_minibatches),
    ]
    print(f"\n{'route':<38} {'max rel diff vs one TF1 pass over 300 steps':>44}")
    worst = 0.0
    for name, grads in rows:
        error = max(_legacy.relative_error(g, r) for g, r in zip(grads, reference))
        worst = max(worst, error)
        print(f"{name:<38} {error:>44.2e}")
    state_error = _legacy.relative_error(tf2_state_grad, tf1_state_grad)
    worst = max(worst, state_error)
    print(f"{'dL/d(initial state): TF2 vs TF1':<38} {state_error:>44.2e}")
    if worst > TOLERANCE:
        print(f"DISAGREEMENT: {worst:.2e} > {TOLERANCE:.0e}")
        return 1
    print(f"summed mini-batch gradients equal one pass (tolerance {TOLERANCE:.0e} relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

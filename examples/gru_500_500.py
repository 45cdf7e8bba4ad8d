"""Seed 001's 500+500 experiment: dLoss/d(initial_state) and every variable's gradient by four
routes, which must agree.

The thread's TF1 model: two GRU cells of 32 units (`First50`, `Second50`) over one sequence of
1,000 steps, x_t = 1..1000, labels x_t + 1, the second cell starting from the first's final
state; a dense layer to 1 output over both halves; loss reduce_sum(sqrt(square(output - labels)))
split into loss1 and loss2 per half.

Routes:
  (a) the thread's hand-written chaining: grads2 + grads3 with grad_ys=grads1;
  (b) tbptt.compat.v1.backprop_chunks in the same TF1 graph;
  (c) tf.gradients of the whole loss (the reference);
  (d) TF2: two tbptt.RecurrentChain(chunk_size=500) loaded with the TF1 weights, state carried
      forward and dLoss/dstate carried back by hand (final_state_grad).

    python examples/gru_500_500.py          # or: tbptt reproduce gru-500-500
"""

import sys

import _legacy  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import keras
import numpy as np
import tensorflow as tf

import tbptt

v1 = tf.compat.v1
CELL_SIZE, SEQ_LENGTH, STEPS1 = 32, 1000, 500
# Relative to the largest entry of the reference (c). float64: only the order of additions
# differs, so all four routes agree to ~1e-12: this is the check of the chaining itself.
# float32 (the thread's m_dtype): routes (a) and (b) add the same per-step terms as (c) in another
# order, ~1e-6. Route (d) also runs another implementation of the GRU arithmetic (Keras's
# x @ W + h @ U against TF1's [x, h] @ W) on inputs up to 1000, where float32 rounding of the
# pre-activations is ~1e-4 absolute: measured 6e-7 on TF 2.21 / Keras 3 and 2e-3 on TF 2.15 /
# Keras 2 for the same weights, while the float64 run of the same code agrees to 1e-12. So
# float32 route (d) is held to 1e-2, a check that the model is the same, not of rounding. A
# dropped carried gradient would change dL/ds0 entirely.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4}
TOLERANCE_TF2_FLOAT32 = 1e-2


def data(dtype="float32"):
    x_t = np.arange(1, SEQ_LENGTH + 1, dtype=dtype).reshape(1, SEQ_LENGTH, 1)
    return x_t, x_t + 1


def l1(labels, output):
    return tf.reduce_sum(tf.sqrt(tf.square(output - labels)))


def load_weights(variables, seed: int, sess) -> None:
    """Glorot-uniform kernels and small random biases from a NumPy seed: the TF1 legacy cells'
    own initializers draw different weights from run to run despite set_random_seed."""
    rng = np.random.RandomState(seed)
    for variable in variables:
        shape = variable.shape.as_list()
        limit = np.sqrt(6.0 / sum(shape)) if len(shape) == 2 else 0.1
        variable.load(
            rng.uniform(-limit, limit, shape).astype(variable.dtype.base_dtype.name), sess
        )


def tf1_routes(m_dtype, seed: int = 123) -> dict:
    """Routes (a), (b), (c) in the thread's TF1 graph, and the weights it drew."""
    x, y = data(m_dtype.name)
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(seed)
        input_1 = v1.placeholder(m_dtype, [None, STEPS1, 1], name="input_1")
        input_2 = v1.placeholder(m_dtype, [None, SEQ_LENGTH - STEPS1, 1], name="input_2")
        labels = v1.placeholder(m_dtype, [None, SEQ_LENGTH, 1], name="labels")
        initial_state = v1.placeholder(m_dtype, [None, CELL_SIZE], name="initial_state")
        with v1.variable_scope("GRU"):
            cell1 = v1.nn.rnn_cell.GRUCell(CELL_SIZE, dtype=m_dtype)
            cell2 = v1.nn.rnn_cell.GRUCell(CELL_SIZE, dtype=m_dtype)
            with v1.variable_scope("First50"):
                output1, new_state1 = v1.nn.dynamic_rnn(cell1, input_1, initial_state=initial_state)
            with v1.variable_scope("Second50"):
                output2, new_state2 = v1.nn.dynamic_rnn(cell2, input_2, initial_state=new_state1)
        with v1.variable_scope("output"):
            output = tf.concat([output1, output2], axis=1)
            dense = v1.layers.Dense(1, dtype=m_dtype)
            output = tf.reshape(dense(tf.reshape(output, [-1, CELL_SIZE])), [1, SEQ_LENGTH, 1])
        loss = l1(labels, output)
        loss1 = l1(labels[:, :STEPS1], output[:, :STEPS1])
        loss2 = l1(labels[:, STEPS1:], output[:, STEPS1:])
        variables = cell1.variables + cell2.variables + dense.variables
        sources = variables + [initial_state]

        def dense_grads(ys, xs, **kwargs):
            grads = tf.gradients(ys, xs, **kwargs)
            return [tf.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]

        # (a) the thread's chaining, extended from the initial state to every variable.
        grads1 = tf.gradients(loss2, new_state1)
        local1 = dense_grads(loss1, sources)
        local2 = dense_grads(loss2, sources, stop_gradients=[new_state1])
        carried = dense_grads(new_state1, sources, grad_ys=grads1)  # grads3 in the thread
        route_a = [g1 + g2 + g3 for g1, g2, g3 in zip(local1, local2, carried)]
        # (b) the library, in the same graph.
        result = tbptt.compat.v1.backprop_chunks(
            [loss1, loss2], [initial_state, new_state1, new_state2], variables=variables
        )
        route_b = result.variable_grads + [result.initial_state_grad]
        # (c) one tf.gradients over the whole loss.
        route_c = dense_grads(loss, sources)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            load_weights(variables, seed, sess)
            feed = {
                input_1: x[:, :STEPS1],
                input_2: x[:, STEPS1:],
                labels: y,
                initial_state: np.zeros([1, CELL_SIZE], m_dtype.name),
            }
            values = sess.run(
                {
                    "a": route_a,
                    "b": route_b,
                    "c": route_c,
                    "loss": loss,
                    "weights": [cell1.variables, cell2.variables, dense.variables],
                },
                feed_dict=feed,
            )
    return values


def tf2_route(weights, dtype: str) -> list:
    """(d): the same model as two TF2 chains, state and dLoss/dstate carried by hand."""
    x, y = data(dtype)
    dense = keras.layers.Dense(1, dtype=dtype)
    chains = []
    for tf1_weights in weights[:2]:
        cell = keras.layers.GRUCell(CELL_SIZE, reset_after=False, dtype=dtype)
        chain = tbptt.RecurrentChain([cell], head=dense, chunk_size=STEPS1, dtype=dtype)
        chain.build(x.shape)
        cell.set_weights(tbptt.compat.v1.gru_weights_from_tf1(*tf1_weights))
        chains.append(chain)
    dense.set_weights(weights[2])
    first, second = chains
    (x1, x2), (y1, y2) = np.split(x, [STEPS1], axis=1), np.split(y, [STEPS1], axis=1)
    s0 = first.initial_state(1)
    _, s1 = first(x1, s0)  # state forward
    late = second.value_and_gradients(x2, y2, l1, initial_state=s1)
    early = first.value_and_gradients(
        x1,
        y1,
        l1,
        initial_state=s0,  # dL/dstate back
        final_state_grad=late.initial_state_grad,
    )
    cell1, cell2 = early.grads[:3], late.grads[:3]
    head = [a + b for a, b in zip(early.grads[3:], late.grads[3:])]
    return [g.numpy() for g in cell1 + cell2 + head] + [early.initial_state_grad[0].numpy()]


def to_keras_layout(grads: list) -> list:
    """TF1 cell gradients in the Keras GRUCell layout (the weight converter is linear)."""
    cell1 = tbptt.compat.v1.gru_weights_from_tf1(*grads[0:4])
    cell2 = tbptt.compat.v1.gru_weights_from_tf1(*grads[4:8])
    return cell1 + cell2 + list(grads[8:])


def compare(m_dtype) -> bool:
    """All four routes in one dtype; prints the table, returns whether they agree."""
    values = tf1_routes(m_dtype)
    routes = {name: to_keras_layout(values[name]) for name in "abc"}
    routes["d"] = tf2_route(values["weights"], m_dtype.name)
    labels = {
        "a": "(a) thread: grads2 + grads3",
        "b": "(b) compat.v1.backprop_chunks",
        "c": "(c) tf.gradients(loss)",
        "d": "(d) TF2 RecurrentChain x2",
    }
    reference = routes["c"]
    print(
        f"\n{m_dtype.name}: seed 001, 500+500 steps, GRU {CELL_SIZE}, loss = {values['loss']:.2f}"
    )
    print(f"{'route':<32} {'mean dL/ds0':>14} {'sum dL/ds0':>14} {'max rel diff vs (c)':>20}")
    agree = True
    for name, grads in routes.items():
        state_grad = grads[-1]
        error = max(_legacy.relative_error(g, r) for g, r in zip(grads, reference))
        tolerance = TOLERANCE[m_dtype.name]
        if name == "d" and m_dtype == tf.float32:
            tolerance = TOLERANCE_TF2_FLOAT32
        agree &= error <= tolerance
        print(
            f"{labels[name]:<32} {np.mean(state_grad):>14.6e} {np.sum(state_grad):>14.6e} "
            f"{error:>20.2e}{'' if error <= tolerance else '  > ' + format(tolerance, '.0e')}"
        )
    return agree


def main() -> int:
    _legacy.quiet_tf1_warnings()
    _legacy.require_legacy_cells()
    agree = all([compare(tf.float32), compare(tf.float64)])
    print(
        f"\ntolerances (relative to the largest gradient entry): float64 "
        f"{TOLERANCE['float64']:.0e}; float32 {TOLERANCE['float32']:.0e}, route (d) "
        f"{TOLERANCE_TF2_FLOAT32:.0e} (see the comment at TOLERANCE)"
    )
    if not agree:
        print("DISAGREEMENT")
        return 1
    print("all four routes agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())

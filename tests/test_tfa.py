"""RecurrentChain over tensorflow-addons cells (TF 2.13-2.15, Keras 2: the legacy CI leg).

tensorflow-addons is end-of-life and does not install on TF >= 2.16, so this module is skipped
in the main environment and runs in .ci/run's second virtual environment.
"""

import pytest
import tensorflow as tf

tfa = pytest.importorskip("tensorflow_addons")

from conftest import assert_all_close, l1_loss, make_sequence  # noqa: E402
from references import full_bptt  # noqa: E402
from test_recurrent import truncated_reference  # noqa: E402

import tbptt  # noqa: E402


@pytest.fixture(autouse=True)
def float64_sublayers():
    """LayerNormLSTMCell makes its LayerNormalization sublayers in floatx, not in its dtype."""
    floatx = tf.keras.backend.floatx()
    tf.keras.backend.set_floatx("float64")
    yield
    tf.keras.backend.set_floatx(floatx)


CELLS = {
    "layer_norm_lstm": lambda: tfa.rnn.LayerNormLSTMCell(4, dtype="float64"),
    "peephole_lstm": lambda: tfa.rnn.PeepholeLSTMCell(4, dtype="float64"),
}


@pytest.mark.parametrize("backend", ["eager", "graph"])
@pytest.mark.parametrize("kind", sorted(CELLS))
@pytest.mark.default_cases(every=True)  # runs only where tensorflow-addons is (CI's TF 2.15 leg)
def test_exact_equals_full_bptt(kind, backend):
    chain = tbptt.RecurrentChain(
        [CELLS[kind]()],
        head=tf.keras.layers.Dense(2, dtype="float64"),
        chunk_size=4,
        backend=backend,
        dtype="float64",
    )
    x, y = make_sequence(3, 11, 3, "float64"), make_sequence(3, 11, 2, "float64", offset=0.5)
    state = tf.nest.map_structure(lambda s: s + 0.2, chain.initial_state(3))
    result = chain.value_and_gradients(x, y, l1_loss, initial_state=state)
    loss, grads, final_state, state_grad = full_bptt(chain, x, y, l1_loss, state)
    assert_all_close([result.loss] + result.grads, [loss] + grads, 1e-10)
    assert_all_close(result.initial_state_grad, state_grad, 1e-10)
    assert_all_close(result.final_state, final_state, 1e-10)


@pytest.mark.parametrize("kind", sorted(CELLS))
@pytest.mark.default_cases(every=True)
def test_truncated_equals_stop_gradient_reference(kind):
    chain = tbptt.RecurrentChain(
        [CELLS[kind]()], chunk_size=3, mode="truncated", backprop_chunks=2, dtype="float64"
    )
    x, y = make_sequence(2, 10, 3, "float64"), make_sequence(2, 10, 4, "float64", offset=0.5)
    state = chain.initial_state(2)
    result = chain.value_and_gradients(x, y, l1_loss, initial_state=state)
    _, grads, state_grad = truncated_reference(chain, x, y, l1_loss, 2, state)
    assert_all_close(result.grads, grads, 1e-10)
    assert_all_close(result.initial_state_grad, state_grad, 1e-10)

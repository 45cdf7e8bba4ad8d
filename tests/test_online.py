"""The online step: `chain(x_t, state)` one step (or a few) at a time, the state carried, against
Keras's RNN over the whole stream, in every context."""

import keras
import pytest
import tensorflow as tf
from conftest import assert_all_close, make_sequence
from references import forward

import tbptt

B, T, F = 3, 9, 4


def chain(**kwargs):
    keras.utils.set_random_seed(9)
    cells = [keras.layers.GRUCell(5, dtype="float64"), keras.layers.LSTMCell(3, dtype="float64")]
    model = tbptt.RecurrentChain(
        cells, head=keras.layers.Dense(2, dtype="float64"), chunk_size=4, dtype="float64", **kwargs
    )
    model.build([None, None, F])
    return model


def step_by_step(model, x, state, steps=1, call=None):
    call = call or model
    outputs = []
    for start in range(0, x.shape[1], steps):
        y, state = call(tf.constant(x[:, start : start + steps]), state)
        outputs.append(y)
    return tf.concat(outputs, axis=1), state


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.default_cases("1")
def test_steps_one_at_a_time_equal_keras_over_the_whole_stream(steps):
    model = chain()
    x = make_sequence(B, T, F, "float64")
    outputs, state = step_by_step(model, x, model.initial_state(B), steps)
    expected, final = forward(model, x)
    assert_all_close([outputs] + tf.nest.flatten(state), [expected] + tf.nest.flatten(final), 1e-12)
    traces = model.trace_count
    step_by_step(model, x, model.initial_state(B), steps)  # the same shapes: no new trace
    assert model.trace_count == traces


@pytest.mark.parametrize("context", ["function", "jit", "tape", "no_xla"])
@pytest.mark.default_cases("function")
def test_the_online_step_in_every_context(context, monkeypatch):
    model = chain()
    x = make_sequence(B, T, F, "float64")
    expected, _ = forward(model, x)
    if context == "no_xla":
        monkeypatch.setenv("TBPTT_XLA", "0")
    if context in ("function", "jit"):
        compiled = tf.function(lambda x, s: model(x, s), jit_compile=context == "jit")
        outputs, _ = step_by_step(model, x, model.initial_state(B), call=compiled)
    elif context == "tape":
        weights = tf.constant(make_sequence(B, T, 2, "float64", 0.3))
        with tf.GradientTape() as tape:
            outputs, _ = step_by_step(model, x, model.initial_state(B))
            loss = tf.reduce_sum(outputs * weights)
        grads = tape.gradient(loss, model.trainable_variables)
        with tf.GradientTape() as tape:
            reference = tf.reduce_sum(forward(model, x)[0] * weights)
        assert_all_close(grads, tape.gradient(reference, model.trainable_variables), 1e-10)
    else:
        outputs, _ = step_by_step(model, x, model.initial_state(B))
    assert_all_close(outputs, expected, 1e-12, context)


def test_an_online_step_of_another_shape_or_a_bad_state_is_checked():
    model = chain()
    x = make_sequence(B, 1, F, "float64")
    model(x, model.initial_state(B))
    with pytest.raises(ValueError, match="initial_state: entry 0 must have shape"):
        model(x, model.initial_state(B + 1))
    with pytest.raises(ValueError, match="structure of chain.initial_state"):
        (h1,), (h2, c2) = ((model.initial_state(B)[0],), model.initial_state(B)[1])
        model(x, [h1, h2, c2])
    y, _ = model(x[:1], model.initial_state(1))  # another batch size: its own step
    assert y.shape == (1, 1, 2)

"""StageChain and split_sequential against one tape over the joined model."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close, float64_loss

import tbptt

EXECUTIONS = [("eager", False), ("eager", True), ("graph", False), ("graph", True)]


def thread_toy_stages(dtype="float64"):
    """Seed 000's toy check: x (3, 10, 10, 1); Conv2D(6, 2, relu) twice; Flatten-Dense-sigmoid."""
    return [
        keras.layers.Conv2D(6, 2, activation="relu", dtype=dtype),
        keras.layers.Conv2D(6, 2, activation="relu", dtype=dtype),
        keras.Sequential(
            [
                keras.layers.Flatten(dtype=dtype),
                keras.layers.Dense(1, activation="sigmoid", dtype=dtype),
            ]
        ),
    ]


def toy_data(dtype="float64"):
    rng = np.random.RandomState(0)
    return rng.rand(3, 10, 10, 1).astype(dtype), rng.randint(0, 2, (3, 1)).astype(dtype)


def joined_tape(chain, x, y, loss_fn, training=True):
    """Reference: one tape over the joined model; grads, boundary and input grads."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        activations, value = [], x
        for stage in chain.stages:
            value = (
                stage(value, training=training)
                if isinstance(stage, keras.layers.Layer)
                else stage(value)
            )
            activations.append(value)
        loss = loss_fn(y, value)
    grads = tape.gradient(loss, [chain.trainable_variables, activations[:-1], x])
    return loss, grads[0], grads[1], grads[2]


@pytest.mark.parametrize("backend,recompute", EXECUTIONS)
@pytest.mark.default_cases("eager-False")
def test_thread_toy_matches_joined_tape(backend, recompute):
    x, y = toy_data()
    chain = tbptt.StageChain(thread_toy_stages(), backend=backend, recompute=recompute)
    loss_fn = float64_loss(keras.losses.MeanSquaredError)
    result = chain.value_and_gradients(x, y, loss_fn)
    loss, grads, boundary, input_grad = joined_tape(chain, x, y, loss_fn)
    assert len(result.grads) == 6 and len(result.boundary_grads) == 2
    assert_all_close(result.loss, loss, 1e-12, "loss")
    assert_all_close(result.grads, grads, 1e-10, "grads")
    assert_all_close(result.boundary_grads, boundary, 1e-10, "boundary_grads")
    assert_all_close(result.input_grad, input_grad, 1e-10, "input_grad")


class Scale(tf.Module):
    """A stage that is no Keras layer: a tf.Module with a variable and __call__."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(np.linspace(0.5, 1.5, 6), dtype=tf.float64)

    def __call__(self, x):
        return x * self.w


@pytest.mark.parametrize("backend", ["eager", "graph"])
@pytest.mark.default_cases("eager")
def test_plain_callables_and_modules_as_stages(backend):
    x, y = toy_data()
    stages = [
        keras.layers.Conv2D(6, 2, dtype="float64"),
        tf.nn.relu,
        Scale(),
        keras.Sequential(
            [keras.layers.Flatten(dtype="float64"), keras.layers.Dense(1, dtype="float64")]
        ),
    ]
    chain = tbptt.StageChain(stages, backend=backend)
    result = chain.value_and_gradients(x, y, float64_loss(keras.losses.MeanSquaredError))
    loss, grads, boundary, input_grad = joined_tape(
        chain, x, y, float64_loss(keras.losses.MeanSquaredError)
    )
    assert [len(v) for v in chain.stage_variables] == [2, 0, 1, 2]
    assert_all_close(
        result.grads + result.boundary_grads + [result.input_grad],
        grads + boundary + [input_grad],
        1e-10,
    )


def test_one_trace_serves_every_batch_size():
    chain = tbptt.StageChain(thread_toy_stages())
    loss_fn = float64_loss(keras.losses.MeanSquaredError)
    for batch in (3, 5, 1):
        x = np.random.RandomState(batch).rand(batch, 10, 10, 1)
        chain.value_and_gradients(x, np.ones([batch, 1]), loss_fn)
    assert chain.trace_count == 1


def test_joined_forward_call():
    x, _ = toy_data()
    chain = tbptt.StageChain(thread_toy_stages())
    value = x
    out = chain(x)
    for stage in chain.stages:
        value = stage(value)
    np.testing.assert_allclose(out, value, rtol=1e-12)


def test_uncompiled_eager_matches():
    x, y = toy_data()
    chain = tbptt.StageChain(thread_toy_stages(), compiled=False)
    result = chain.value_and_gradients(x, y, float64_loss(keras.losses.MeanSquaredError))
    _, grads, _, input_grad = joined_tape(chain, x, y, float64_loss(keras.losses.MeanSquaredError))
    assert_all_close(result.grads + [result.input_grad], grads + [input_grad], 1e-10)


def dropout_bn_stages():
    return [
        keras.Sequential(
            [
                keras.layers.Dense(8, activation="relu"),
                keras.layers.BatchNormalization(momentum=0.5),
            ]
        ),
        keras.Sequential([keras.layers.Dropout(0.5), keras.layers.Dense(6, activation="tanh")]),
        keras.layers.Dense(1),
    ]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.default_cases("False")
def test_dropout_and_batch_norm_match_one_joined_training_step(recompute):
    """The recompute must draw the first forward's dropout mask and update BN statistics once:
    run the chain, then rewind the non-trainable state and run one joined tape from it."""
    x = np.random.RandomState(1).randn(16, 5).astype("float32")
    y = np.random.RandomState(2).randn(16, 1).astype("float32")
    chain = tbptt.StageChain(dropout_bn_stages(), recompute=recompute)
    chain.build(x.shape)
    state = [v.numpy() for stage in chain.stages for v in stage.non_trainable_variables]
    result = chain.value_and_gradients(x, y, keras.losses.MeanSquaredError())
    after_chain = [v.numpy() for stage in chain.stages for v in stage.non_trainable_variables]
    for v, value in zip([v for s in chain.stages for v in s.non_trainable_variables], state):
        v.assign(value)
    loss, grads, _, _ = joined_tape(chain, x, y, keras.losses.MeanSquaredError())
    after_joined = [v.numpy() for stage in chain.stages for v in stage.non_trainable_variables]
    assert_all_close([result.loss] + result.grads, [loss] + grads, 1e-5)
    for a, b, _before in zip(after_chain, after_joined, state):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    moving_mean = chain.stages[0].layers[1].moving_mean.numpy()
    assert not np.allclose(moving_mean, 0.0)  # the statistics did move, once


def test_stages_on_two_devices():
    x, y = toy_data()
    devices = ["/CPU:0", "/CPU:1", "/CPU:1"]
    chain = tbptt.StageChain(thread_toy_stages(), devices=devices, compiled=False)
    result = chain.value_and_gradients(x, y, float64_loss(keras.losses.MeanSquaredError))
    _, grads, _, _ = joined_tape(chain, x, y, float64_loss(keras.losses.MeanSquaredError))
    assert_all_close(result.grads, grads, 1e-10)
    assert chain._run_stage(
        1, tf.constant(x[:, :9, :9, :].repeat(6, -1)), training=False
    ).device.endswith("CPU:1")


def test_separate_optimizers_per_stage_follow_the_joined_model():
    """Seed 000: model_0 and model_1 with an optimizer each, trained as one model."""
    x, y = toy_data("float32")
    keras.utils.set_random_seed(5)
    joined = keras.Sequential([keras.Input((10, 10, 1))] + thread_toy_stages("float32"))
    keras.utils.set_random_seed(5)
    split_model = keras.Sequential([keras.Input((10, 10, 1))] + thread_toy_stages("float32"))
    model_0, model_1 = tbptt.split_sequential(split_model, at=[2])
    chain = tbptt.StageChain([model_0, model_1])
    optimizers = [keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1)]
    joined_optimizer = keras.optimizers.SGD(0.1)
    loss_fn = keras.losses.MeanSquaredError()
    for _ in range(5):
        result = chain.value_and_gradients(x, y, loss_fn)
        for opt, g, v in zip(optimizers, chain.split_grads(result.grads), chain.stage_variables):
            opt.apply_gradients(zip(g, v))
        with tf.GradientTape() as tape:
            loss = loss_fn(y, joined(x, training=True))
        joined_optimizer.apply_gradients(
            zip(tape.gradient(loss, joined.trainable_variables), joined.trainable_variables)
        )
    assert [len(v) for v in chain.stage_variables] == [4, 2]
    assert_all_close(split_model.trainable_variables, joined.trainable_variables, 1e-5)


def test_split_sequential_shares_variables():
    model = keras.Sequential([keras.Input((10, 10, 1))] + thread_toy_stages("float32"))
    pieces = tbptt.split_sequential(model, at=[1, 2])
    assert [len(p.layers) for p in pieces] == [1, 1, 1]
    assert pieces[0].layers[0].kernel is model.layers[0].kernel
    x, _ = toy_data("float32")
    np.testing.assert_allclose(pieces[2](pieces[1](pieces[0](x))), model(x), rtol=1e-6)


def test_split_functional_linear_chain_and_refuse_branches():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="a")(inputs)
    outputs = keras.layers.Dense(2, name="b")(hidden)
    first, second = tbptt.split_sequential(keras.Model(inputs, outputs), at=[1])
    assert first.layers[0].name == "a" and second.layers[0].name == "b"
    skip = keras.layers.Add()([keras.layers.Dense(4)(inputs), inputs])
    with pytest.raises(ValueError, match="not a linear chain"):
        tbptt.split_sequential(keras.Model(inputs, keras.layers.Dense(1)(skip)), at=[1])


@pytest.mark.parametrize("at", [[0], [3], [5], [2, 1], [], "1"])
@pytest.mark.default_cases("at0")
def test_split_cut_out_of_range(at):
    model = keras.Sequential([keras.Input((10, 10, 1))] + thread_toy_stages("float32"))
    with pytest.raises(ValueError, match="at must be increasing layer indices"):
        tbptt.split_sequential(model, at=at)


@pytest.mark.parametrize(
    "stages,error", [([], TypeError), (None, TypeError), ([keras.layers.Dense(1), "x"], TypeError)]
)
@pytest.mark.default_cases("stages0-TypeError")
def test_bad_stages(stages, error):
    with pytest.raises(error, match="stages"):
        tbptt.StageChain(stages)


def test_bad_devices():
    with pytest.raises(ValueError, match="one device name"):
        tbptt.StageChain([keras.layers.Dense(1)], devices=["/CPU:0", "/CPU:1"])
    with pytest.raises(ValueError, match=r"devices\[1\]='/GPU:7' is not a device of this"):
        tbptt.StageChain([keras.layers.Dense(1)] * 2, devices=["/cpu:1", "/GPU:7"])
    with pytest.raises(ValueError, match=r"devices\[0\] must be a device name"):
        tbptt.StageChain([keras.layers.Dense(1)], devices=["no such thing"])


@pytest.mark.slow  # an end-to-end script run in its own process (40 s)
def test_reproduce_cnn_split():
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run(
        [sys.executable, "-m", "tbptt._src.cli", "reproduce", "cnn-split"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert out.stdout.count("valid  (rel. diff") == 6 and "INVALID" not in out.stdout
    assert "agreement" in out.stdout

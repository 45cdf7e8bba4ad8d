"""check_numerics: a NaN or Inf raises an error naming the chunk (or stage) where it first
appeared; without it, a non-finite loss comes back as it is."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close, make_sequence, needs_keras3, sum_squares
from references import full_bptt

import tbptt

B, T, F, K = 2, 11, 3, 3  # chunks: steps 0-2, 3-5, 6-8, 9-10

CONFIGS = {
    "exact": {},
    "exact_graph": {"backend": "graph"},
    "exact_levels2": {"levels": 2},
    "exact_uncompiled": {"compiled": False},
    "truncated_m1": {"mode": "truncated"},
    "truncated_m2": {"mode": "truncated", "backprop_chunks": 2},
}


def make_chain(check=True, **kwargs):
    keras.utils.set_random_seed(1)
    return tbptt.StatefulGRUChain(
        4, head=keras.layers.Dense(2), chunk_size=K, check_numerics=check, **kwargs
    )


def clean_data():
    return make_sequence(B, T, F), make_sequence(B, T, 2, offset=1.0)


@tf.custom_gradient
def nan_gradient_where(values, poisoned):
    """The identity, whose gradient is NaN where `poisoned` is 1: a finite loss whose backward
    is not."""

    def grad(upstream):
        return upstream + tf.where(poisoned > 0, np.nan, 0.0), tf.zeros_like(poisoned)

    return tf.identity(values), grad


def poisoned_loss(y_true, y_pred):
    """Sum of squares against y_true[..., :2]; y_true[..., 2:] marks steps whose gradient is
    NaN."""
    return sum_squares(y_true[..., :2], nan_gradient_where(y_pred, y_true[..., 2:]))


@pytest.mark.parametrize(
    "config,step",
    [(config, 4) for config in sorted(CONFIGS)]
    + [("exact", 0), ("exact", 10), ("truncated_m2", 10)],
)
@pytest.mark.default_cases("exact-4")
def test_nan_input_names_the_chunk_of_the_state(config, step):
    x, y = clean_data()
    x[1, step, 0] = np.nan
    chain = make_chain(**CONFIGS[config])
    with pytest.raises(
        tbptt.NonFiniteError,
        match=rf"state carried out of chunk {step // K} "
        rf"\(steps {step // K * K} to {min(step // K * K + K, T) - 1}\)",
    ) as error:
        chain.value_and_gradients(x, y, sum_squares)
    assert (error.value.kind, error.value.index) == ("state", step // K)
    assert error.value.findings["loss"] == step // K


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.default_cases("exact")
def test_inf_target_names_the_chunk_of_the_loss(config):
    x, y = clean_data()
    y[0, 7, 1] = np.inf
    with pytest.raises(tbptt.NonFiniteError, match="the loss of chunk 2") as error:
        make_chain(**CONFIGS[config]).value_and_gradients(x, y, sum_squares)
    assert error.value.kind == "loss" and "state" not in error.value.findings


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.default_cases("exact")
def test_nan_gradient_names_the_chunk_where_the_backward_broke(config):
    x, y = clean_data()
    flag = np.zeros([B, T, 1], "float32")
    flag[0, 7] = 1.0  # chunk 2
    chain = make_chain(**CONFIGS[config])
    with pytest.raises(tbptt.NonFiniteError) as error:
        chain.value_and_gradients(x, np.concatenate([y, flag], -1), poisoned_loss)
    # m=1 carries no dLoss/dstate, so only the weight gradients of chunk 2 show it.
    kind = "grads" if config == "truncated_m1" else "state_grad"
    assert (error.value.kind, error.value.index) == (kind, 2)
    assert "state" not in error.value.findings and "loss" not in error.value.findings


def test_clean_data_gives_the_same_result_with_the_check_on():
    x, y = clean_data()
    # check_numerics runs chunk by chunk (to name one): the plain call too, to compare bits.
    plain = make_chain(check=False, memory_budget=None).value_and_gradients(x, y, sum_squares)
    checked = make_chain().value_and_gradients(x, y, sum_squares)
    assert_all_close([checked.loss] + checked.grads, [plain.loss] + plain.grads, 0.0)


@pytest.mark.parametrize("config", ["exact", "truncated_m1"])
@pytest.mark.default_cases("exact")
def test_without_the_check_a_nan_loss_is_returned_as_it_is(config):
    x, y = clean_data()
    x[0, 5, 1] = np.nan
    result = make_chain(check=False, **CONFIGS[config]).value_and_gradients(x, y, sum_squares)
    assert np.isnan(result.loss.numpy())
    assert any(np.isnan(g.numpy()).any() for g in result.grads)


def test_inside_a_users_tf_function_the_check_is_an_assertion():
    x, y = clean_data()
    chain = make_chain()

    @tf.function
    def step(x):
        return chain.value_and_gradients(x, y, sum_squares).loss

    expected = step(x)
    bad = x.copy()
    bad[0, 4, 0] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match="check_numerics"):
        step(bad)
    assert step(x).numpy() == expected.numpy()


def test_the_chain_still_works_after_the_error():
    x, y = clean_data()
    chain = make_chain()
    before = chain.value_and_gradients(x, y, sum_squares)
    bad = x.copy()
    bad[0, 4, 0] = np.nan
    with pytest.raises(tbptt.NonFiniteError):
        chain.value_and_gradients(bad, y, sum_squares)
    after = chain.value_and_gradients(x, y, sum_squares)
    assert_all_close([after.loss] + after.grads, [before.loss] + before.grads, 0.0)
    _, grads, _, _ = full_bptt(chain, x, y, sum_squares)
    assert_all_close(after.grads, grads, 2e-5)


def test_check_numerics_must_be_a_bool():
    with pytest.raises(TypeError, match="check_numerics must be True or False, got 'yes'"):
        make_chain(check="yes")


def stages(poison_at=None):
    keras.utils.set_random_seed(2)
    return [
        keras.layers.Dense(4, activation="tanh"),
        keras.layers.Lambda(
            lambda a: nan_gradient_where(a, tf.ones_like(a)) if poison_at == 1 else a
        ),
        keras.layers.Dense(1),
    ]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.default_cases("False")
def test_stage_chain_names_the_stage(recompute):
    x, y = make_sequence(3, 2, 5)[:, 0], np.zeros([3, 1], "float32")
    bad = x.copy()
    bad[1, 2] = np.nan
    chain = tbptt.StageChain(stages(), recompute=recompute, check_numerics=True)
    with pytest.raises(tbptt.NonFiniteError, match="activation carried out of stage 0") as error:
        chain.value_and_gradients(bad, y, keras.losses.MeanSquaredError())
    assert error.value.findings["loss"] == 2
    chain = tbptt.StageChain(stages(poison_at=1), recompute=recompute, check_numerics=True)
    with pytest.raises(
        tbptt.NonFiniteError, match="dLoss/dactivation carried back out of stage 1"
    ) as error:
        chain.value_and_gradients(x, y, keras.losses.MeanSquaredError())
    assert error.value.kind == "state_grad"


@needs_keras3
def test_chunked_model_fit_stops_on_a_nan():
    x, y = clean_data()
    model = tbptt.keras.ChunkedModel(make_chain())
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    x[0, 3, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="check_numerics"):
        model.fit(x, y, batch_size=B, epochs=1, verbose=0)

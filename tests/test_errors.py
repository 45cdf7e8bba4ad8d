"""Bad input gets a clear ValueError/TypeError naming the argument, before any tracing, and a
rejected call leaves the chain working."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close, make_sequence, needs_keras3, sum_squares
from references import full_bptt

import tbptt


def gru(**kwargs):
    kwargs.setdefault("chunk_size", 3)
    kwargs.setdefault("head", keras.layers.Dense(2))
    return tbptt.StatefulGRUChain(4, **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int .* got 0"),
        ({"chunk_size": -3}, ValueError, "chunk_size"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size"),
        ({"chunk_size": True}, TypeError, "chunk_size"),
        ({"mode": "full"}, ValueError, r"mode must be one of \('exact', 'truncated'\), got 'full'"),
        ({"backend": "jax"}, ValueError, "backend must be one of"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"mode": "truncated", "backprop_chunks": 0}, ValueError, "backprop_chunks"),
        ({"backprop_chunks": 2}, ValueError, "only applies to mode='truncated'"),
        ({"backend": "graph", "compiled": False}, ValueError, "compiled=True"),
        ({"head": "dense"}, TypeError, "head must be"),
    ],
)
@pytest.mark.default_cases("kwargs0-ValueError-chunk_size must be a positive int .* got 0")
def test_bad_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        gru(**kwargs)


@pytest.mark.parametrize(
    "units,error",
    [
        ((), ValueError),
        (0, ValueError),
        ((4, -1), ValueError),
        ("4", ValueError),
        (None, TypeError),
    ],
)
@pytest.mark.default_cases("units0-ValueError")
def test_bad_units(units, error):
    with pytest.raises(error, match="units"):
        tbptt.StatefulGRUChain(units, chunk_size=2)


@pytest.mark.parametrize("cells", [[], None, [object()], "gru"])
@pytest.mark.default_cases("cells0")
def test_bad_cells(cells):
    with pytest.raises(TypeError, match="cells"):
        tbptt.RecurrentChain(cells, chunk_size=2)


def test_dtype_conflict_with_a_built_cell():
    cell = keras.layers.GRUCell(3)
    cell.build((None, 2))
    with pytest.raises(ValueError, match="already built in float32"):
        tbptt.RecurrentChain([cell], chunk_size=2, dtype="float64")


X, Y = make_sequence(2, 7, 3), make_sequence(2, 7, 2, offset=1.0)


def one_arg_loss(y_pred):
    return tf.reduce_sum(y_pred)


# Each is refused in Python, before anything is traced.
BAD_CALLS = [
    (lambda c: c.value_and_gradients(X[0], Y, sum_squares), ValueError, r"rank 3.*\[7, 3\]"),
    (
        lambda c: c.value_and_gradients(X[:, :0], Y[:, :0], sum_squares),
        ValueError,
        "at least one time step",
    ),
    (
        lambda c: c.value_and_gradients(np.full([2, 7, 3], "a"), Y, sum_squares),
        TypeError,
        "inputs must hold numbers.*got dtype string",
    ),
    (
        lambda c: c.value_and_gradients(X, Y[:, :5], sum_squares),
        ValueError,
        r"targets must share \[batch, time\] = \[2, 7\].*got shape \[2, 5, 2\]. Slice or pad",
    ),
    (lambda c: c.value_and_gradients(X, Y[:1], sum_squares), ValueError, "targets"),
    (
        lambda c: c.value_and_gradients(X, Y[:, :, 0, None][:, :, :, None][0], sum_squares),
        ValueError,
        "targets",
    ),
    (
        lambda c: c.value_and_gradients(X, Y, l3, sample_weight=np.ones([2, 6])),
        ValueError,
        "sample_weight",
    ),
    (lambda c: c.value_and_gradients(X, Y, "mse"), TypeError, "loss_fn must be callable"),
    (
        lambda c: c.value_and_gradients(X, Y, one_arg_loss),
        TypeError,
        r"loss_fn must accept 2 positional arguments \(y_true, y_pred\), but one_arg_loss",
    ),
    (
        lambda c: c.value_and_gradients(X, Y, sum_squares, sample_weight=np.ones([2, 7])),
        TypeError,
        "must accept 3 positional arguments.*sample_weight or mask",
    ),
    (
        lambda c: c.value_and_gradients(X, Y, sum_squares, mask=np.ones([2, 7], bool)),
        TypeError,
        "must accept 3 positional arguments",
    ),
    (
        lambda c: c.value_and_gradients(X, Y, sum_squares, initial_state=(tf.zeros([2, 4]),) * 2),
        ValueError,
        "initial_state must be a nest of 1 tensors",
    ),
    (
        lambda c: c.value_and_gradients(X, Y, sum_squares, initial_state=tf.zeros([2, 5])),
        ValueError,
        r"initial_state: entry 0 must have shape \[2, 4\]",
    ),
    (
        lambda c: c.value_and_gradients(X, Y, sum_squares, initial_state=tf.zeros([3, 4])),
        ValueError,
        "batch size",
    ),
    (
        lambda c: c.value_and_gradients(X, Y, sum_squares, initial_state=tf.zeros([4])),
        ValueError,
        r"initial_state: entry 0 must have shape \[2, 4\].*got \[4\]",
    ),
    (
        lambda c: c.value_and_gradients(X, Y, sum_squares, final_state_grad=tf.zeros([2, 3])),
        ValueError,
        "final_state_grad: entry 0",
    ),
    (
        lambda c: c.value_and_gradients(X, Y, sum_squares, final_state_grad=[tf.zeros([2, 4])] * 3),
        ValueError,
        "final_state_grad must be a nest of 1 tensors .* got 3 tensors",
    ),
    (
        lambda c: c.value_and_gradients(X, Y, sum_squares, final_state_grad=tf.zeros([1, 4])),
        ValueError,
        r"final_state_grad: entry 0 must have shape \[2, 4\]",
    ),
    (
        lambda c: c.value_and_gradients(X, Y, sum_squares, reset=np.zeros([2, 6], bool)),
        ValueError,
        r"reset must have shape \[batch, time\] = \[2, 7\]",
    ),
    (
        lambda c: c.value_and_gradients(X, Y, l3, mask=np.ones([2, 7, 1], bool)),
        ValueError,
        r"mask must have shape \[batch, time\] = \[2, 7\].*got shape \[2, 7, 1\]",
    ),
    (
        lambda c: c.value_and_gradients(X, Y, l3, mask=np.ones([2, 7], "float32")),
        TypeError,
        "mask must be bool",
    ),
    (lambda c: c(X, reset=np.zeros([3, 7], bool)), ValueError, "reset must have shape"),
    (lambda c: c(X, mask=np.zeros([7], bool)), ValueError, "mask must have shape"),
    (lambda c: c(X[..., :2]), ValueError, "must have 3 features"),
    (lambda c: c(X, initial_state=tf.zeros([2, 9])), ValueError, "initial_state: entry 0"),
    (lambda c: c.initial_state(0), ValueError, "batch_size"),
    (lambda c: c.chunk_plan(0), ValueError, "steps must be a positive int"),
]
BAD_CALLS.append(
    (
        lambda c: c.value_and_gradients(X, Y, keras.losses.MeanSquaredError(reduction="none")),
        ValueError,
        "reduction 'none'.*one scalar per chunk",
    )
)


def l3(y_true, y_pred, sample_weight):
    return sum_squares(y_true, y_pred * tf.cast(sample_weight, y_pred.dtype)[..., None])


@pytest.mark.parametrize("call,error,match", BAD_CALLS)
@pytest.mark.default_cases("<lambda>-ValueError-rank 3.*\\\\[7, 3\\\\]")
def test_bad_call_raises_before_tracing_and_leaves_the_chain_working(call, error, match):
    chain = gru()
    chain.value_and_gradients(X, Y, sum_squares)
    traces = chain.trace_count
    with pytest.raises(error, match=match):
        call(chain)
    assert chain.trace_count == traces  # nothing was traced for the rejected call
    after = chain.value_and_gradients(X, Y, sum_squares)
    _, grads, _, state_grad = full_bptt(chain, X, Y, sum_squares)
    assert_all_close(after.grads + [after.initial_state_grad], grads + [state_grad], 2e-5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda c: c.value_and_gradients(X, Y, lambda a, b: a - b), "loss_fn must return a scalar"),
        (
            lambda c: c.value_and_gradients(X, Y, lambda a, b: tf.reduce_sum(a - b, axis=0)),
            r"got shape \[None, 2\]",
        ),
    ],
)
@pytest.mark.default_cases("<lambda>-loss_fn must return a scalar")
def test_a_non_scalar_loss_is_refused_and_the_chain_still_works(call, match):
    """Only tracing the loss shows its shape: the error comes from the trace, nothing runs."""
    chain = gru()
    with pytest.raises(ValueError, match=match):
        call(chain)
    result = chain.value_and_gradients(X, Y, sum_squares)
    _, grads, _, _ = full_bptt(chain, X, Y, sum_squares)
    assert_all_close(result.grads, grads, 2e-5)


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("mode", "exat", "Did you mean 'exact'"),
        ("mode", 1, r"mode must be one of .* got 1\."),
        ("backend", "graf", "Did you mean 'graph'"),
        ("reduction", "means", "Did you mean 'mean'"),
    ],
)
@pytest.mark.default_cases("mode-exat-Did you mean 'exact'")
def test_a_misspelled_choice_gets_a_suggestion(name, value, match):
    with pytest.raises(ValueError, match=match):
        gru(**{name: value})


def test_final_state_grad_with_one_chunk_truncation_is_refused():
    chain = gru(mode="truncated")
    with pytest.raises(ValueError, match="would be dropped"):
        chain.value_and_gradients(X, Y, sum_squares, final_state_grad=tf.ones([2, 4]))


def stage_chain():
    keras.utils.set_random_seed(3)
    return tbptt.StageChain([keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])


SX, SY = make_sequence(3, 5, 1)[..., 0], make_sequence(3, 2, 1, offset=0.5)[..., 0]


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda c: c.value_and_gradients(SX, SY, None), TypeError, "loss_fn must be callable"),
        (lambda c: c.value_and_gradients(SX, SY, one_arg_loss), TypeError, "must accept 2"),
        (
            lambda c: c.value_and_gradients(SX, SY, sum_squares, sample_weight=np.ones(3)),
            TypeError,
            "must accept 3",
        ),
        (
            lambda c: c.value_and_gradients(SX, SY[:2], sum_squares),
            ValueError,
            r"y must have x's batch size 3 first \(shape \[3, \.\.\.\]\), got shape \[2, 2\]",
        ),
        (
            lambda c: c.value_and_gradients(SX, SY, l3, sample_weight=np.ones(4)),
            ValueError,
            "sample_weight must have x's batch size 3",
        ),
        (
            lambda c: c.value_and_gradients(np.float32(1.0), SY, sum_squares),
            ValueError,
            "x must have a batch axis",
        ),
        (
            lambda c: c.value_and_gradients(SX, SY, lambda a, b: a - b),
            ValueError,
            "loss_fn must return a scalar",
        ),
    ],
)
@pytest.mark.default_cases("<lambda>-TypeError-loss_fn must be callable")
def test_stage_chain_bad_call_leaves_it_working(call, error, match):
    chain = stage_chain()
    with pytest.raises(error, match=match):
        call(chain)
    result = chain.value_and_gradients(SX, SY, sum_squares)
    with tf.GradientTape() as tape:
        loss = sum_squares(SY, chain(SX, training=True))
    assert_all_close(result.grads, tape.gradient(loss, chain.trainable_variables), 1e-6)


def test_compat_v1_mismatched_boundaries_are_refused():
    @tf.function
    def build(boundary, final_grad=None):
        return tbptt.compat.v1.backprop_chunks(
            [tf.constant(1.0)], boundary, [], final_state_grad=final_grad
        )

    state = tf.zeros([2, 3])
    with pytest.raises(
        ValueError,
        match="boundary_states must hold one state per cut, "
        r"len\(chunk_losses\) \+ 1 = 2",
    ):
        build([state])
    with pytest.raises(ValueError, match=r"boundary_states\[1\] must have the structure"):
        build([state, (state, state)])
    with pytest.raises(ValueError, match="final_state_grad must have the structure"):
        build([state, state], [state, state])


@needs_keras3
def test_chunked_model_trains_as_usual_after_a_rejected_fit():
    def model():
        keras.utils.set_random_seed(4)
        m = tbptt.keras.ChunkedModel(gru())
        m.compile(optimizer="sgd", loss="mse")
        return m

    rejected, fresh = model(), model()
    with pytest.raises(ValueError, match="mask must have shape"):
        rejected.fit({"inputs": X, "mask": np.ones([2, 3], bool)}, Y, batch_size=2, verbose=0)
    for m in (rejected, fresh):
        m.fit(X, Y, batch_size=2, epochs=2, verbose=0)
    assert_all_close(rejected.get_weights(), fresh.get_weights(), 0.0)


def test_forward_mode_through_the_compiled_loops_is_refused_and_short_calls_work():
    """A ForwardAccumulator watching the inputs: the compiled loops have no forward-mode rule
    (TensorFlow raised an internal error) and a chunked gradient's tapes give no tangent, so
    both are refused by name and the chain still works; a short call (unrolled, no compiled
    loop) gives Keras's own JVP."""
    chain = tbptt.RecurrentChain(
        [keras.layers.GRUCell(4, dtype="float64")], chunk_size=5, dtype="float64"
    )
    x = tf.constant(make_sequence(2, 30, 3, "float64"))
    chain(x)
    tangent = tf.ones_like(x)
    with tf.autodiff.ForwardAccumulator(x, tangent):
        with pytest.raises(NotImplementedError, match="ForwardAccumulator.*call"):
            chain(x)
        with pytest.raises(NotImplementedError, match="ForwardAccumulator.*value_and_grad"):
            chain.value_and_gradients(x, tf.zeros([2, 30, 4], "float64"), sum_squares)
    assert_all_close(
        chain(x)[0],
        keras.layers.RNN(chain.cells[0], return_sequences=True, dtype="float64")(x),
        1e-12,
    )
    short = x[:, :3]
    rnn = keras.layers.RNN(chain.cells[0], return_sequences=True, dtype="float64")
    with tf.autodiff.ForwardAccumulator(short, tangent[:, :3]) as acc:
        expected = acc.jvp(rnn(short))
    with tf.autodiff.ForwardAccumulator(short, tangent[:, :3]) as acc:
        got = acc.jvp(chain(short)[0])
    assert_all_close(got, expected, 1e-12, "short call's JVP")


def test_a_built_head_of_another_dtype_than_the_one_given_is_refused():
    head = keras.layers.Dense(2)
    head.build((None, None, 4))  # float32
    with pytest.raises(ValueError, match="already built in float32"):
        tbptt.RecurrentChain([keras.layers.GRUCell(4)], head=head, chunk_size=3, dtype="float64")

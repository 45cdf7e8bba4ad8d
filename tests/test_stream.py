"""chain.stream_step: TBPTT(K, mK) across consecutive windows, exactly, for every m."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close, l1_loss, make_sequence
from references import forward, truncated_reference

import tbptt

K, WINDOW, WINDOWS = 3, 6, 4  # windows of two chunks; m = 4 reaches two windows back
F64 = 1e-10


def chain_for(m, backend="eager", **kwargs):
    cells = [keras.layers.GRUCell(5, dtype="float64"), keras.layers.LSTMCell(3, dtype="float64")]
    return tbptt.RecurrentChain(
        cells,
        head=keras.layers.Dense(2, dtype="float64"),
        chunk_size=K,
        mode="truncated",
        backprop_chunks=m,
        backend=backend,
        dtype="float64",
        **kwargs,
    )


def stream(batch=2):
    x = make_sequence(batch, WINDOW * WINDOWS, 4, "float64")
    y = make_sequence(batch, WINDOW * WINDOWS, 2, "float64", offset=0.5)
    return x, y


def weighted_l1(y_true, y_pred, sample_weight):
    return tf.reduce_sum(
        tf.cast(sample_weight, y_pred.dtype)[..., None] * tf.sqrt(tf.square(y_true - y_pred) + 1e-3)
    )


def run_stream(chain, x, y, loss_fn=l1_loss, **per_step):
    """The summed loss and gradients of stream_step over the windows, and the last carry."""
    carry, loss, grads = None, 0.0, None
    for start in range(0, x.shape[1], WINDOW):
        window = slice(start, start + WINDOW)
        result, carry = chain.stream_step(
            x[:, window],
            y[:, window],
            loss_fn,
            carry,
            **{name: value[:, window] for name, value in per_step.items()},
        )
        loss += result.loss
        grads = result.grads if grads is None else [g + d for g, d in zip(grads, result.grads)]
    return loss, grads, carry, result


@pytest.mark.parametrize("backend", ["eager", "graph"])
@pytest.mark.parametrize("m", [3, 1, 2, 4])
@pytest.mark.default_cases("3-eager")
def test_stream_steps_equal_tbptt_over_the_whole_stream(m, backend):
    x, y = stream()
    chain = chain_for(m, backend)
    loss, grads, carry, last = run_stream(chain, x, y)
    # TBPTT(K, mK) over the whole stream, written out with per-chunk tapes.
    ref_loss, ref_grads, _ = truncated_reference(
        chain, x, y, l1_loss, m, chain.initial_state(x.shape[0])
    )
    assert_all_close([loss] + grads, [ref_loss] + ref_grads, F64, "per-chunk tapes")
    _, final_state = forward(chain, x)
    assert_all_close(last.final_state, final_state, F64, "final state")
    context_steps = min(m - 1, x.shape[1] // K) * K
    assert [v.shape[1] for v in carry.context.values()] == [context_steps] * len(carry.context)


@pytest.mark.slow
def test_stream_without_the_context_is_different():
    """The equality above could hold vacuously if the carried context changed nothing."""
    x, y = stream()
    chain = chain_for(3)
    loss, grads, _, _ = run_stream(chain, x, y)
    cold = [
        chain.value_and_gradients(x[:, s : s + WINDOW], y[:, s : s + WINDOW], l1_loss).grads
        for s in range(0, x.shape[1], WINDOW)
    ]
    cold = [tf.add_n(list(parts)) for parts in zip(*cold)]
    assert max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(grads, cold)) > 1e-3


@pytest.mark.slow
def test_hand_chained_final_state_grad_is_not_tbptt_for_m_3():
    """Why stream_step exists: m >= 3 ages cannot travel in one final_state_grad."""
    x, y = stream()
    chain = chain_for(3)
    first = chain.value_and_gradients(
        x[:, WINDOW:], y[:, WINDOW:], l1_loss, forward(chain, x[:, :WINDOW])[1]
    )
    second = chain.value_and_gradients(
        x[:, :WINDOW], y[:, :WINDOW], l1_loss, final_state_grad=first.initial_state_grad
    )
    whole = chain.value_and_gradients(x, y, l1_loss)
    chained = [a + b for a, b in zip(first.grads, second.grads)]
    assert max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(chained, whole.grads)) > 1e-6


@pytest.mark.slow
def test_stream_with_flags_and_weights_equals_one_call():
    x, y = stream()
    rng = np.random.RandomState(0)
    flags = {
        "sample_weight": rng.rand(*x.shape[:2]),
        "reset": rng.rand(*x.shape[:2]) < 0.1,
        "mask": rng.rand(*x.shape[:2]) < 0.9,
    }
    chain = chain_for(3)
    loss, grads, _, _ = run_stream(chain, x, y, weighted_l1, **flags)
    ref_loss, ref_grads, _ = truncated_reference(
        chain, x, y, weighted_l1, 3, chain.initial_state(x.shape[0]), **flags
    )
    assert_all_close([loss] + grads, [ref_loss] + ref_grads, F64)


def test_only_the_cotangents_a_window_sends_back_are_pulled_back(monkeypatch):
    """A window's context chunks add no loss, and a cotangent no loss sent is zero: such seed
    sets are skipped. Counted executing eagerly (compiled=False), where a skipped set runs no
    backward pass: with m=3 and windows of 2 chunks, each new chunk's loss reaches 3 chunks (2
    in the first window, which has no context: 3 passes), 21 passes in all instead of 42."""
    x, y = stream()
    chain = chain_for(3, compiled=False)
    passes = _counted_backward_passes(monkeypatch)
    loss, grads, _, _ = run_stream(chain, x, y)
    assert len(passes) == 3 + 6 * (WINDOWS - 1)
    ref_loss, ref_grads, _ = truncated_reference(
        chain, x, y, l1_loss, 3, chain.initial_state(x.shape[0])
    )
    assert_all_close([loss] + grads, [ref_loss] + ref_grads, F64, "per-chunk tapes")


def test_the_ages_no_loss_sent_are_not_pulled_back_in_one_call(monkeypatch):
    """value_and_gradients with m=3 over 8 chunks: the last chunk receives no carried age, the
    one before only age 1, so 8 * 3 - 3 = 21 backward passes."""
    x, y = stream()
    chain = chain_for(3, compiled=False)
    passes = _counted_backward_passes(monkeypatch)
    result = chain.value_and_gradients(x, y, l1_loss)
    assert x.shape[1] // K == 8 and len(passes) == 21
    ref_loss, ref_grads, _ = truncated_reference(
        chain, x, y, l1_loss, 3, chain.initial_state(x.shape[0])
    )
    assert_all_close([result.loss] + result.grads, [ref_loss] + ref_grads, F64)


def _counted_backward_passes(monkeypatch) -> list:
    """A list that gets one entry per tape.gradient call from now on."""
    passes = []
    gradient = tf.GradientTape.gradient

    def counted(tape, *args, **kwargs):
        passes.append(1)
        return gradient(tape, *args, **kwargs)

    monkeypatch.setattr(tf.GradientTape, "gradient", counted)
    return passes


def test_exact_mode_carries_the_state_only():
    x, y = stream()
    chain = chain_for(3).with_config(mode="exact", backprop_chunks=1)
    _, _, carry, last = run_stream(chain, x, y)
    assert carry.context == {}
    assert_all_close(carry.state, forward(chain, x)[1], F64)
    assert_all_close(carry.state, last.final_state, 0.0)


def test_stream_refuses_windows_that_are_not_whole_chunks_and_goes_on():
    x, y = stream()
    chain = chain_for(2)
    result, carry = chain.stream_step(x[:, :WINDOW], y[:, :WINDOW], l1_loss)
    with pytest.raises(ValueError, match="whole number of chunks"):
        chain.stream_step(x[:, : WINDOW + 1], y[:, : WINDOW + 1], l1_loss, carry)
    with pytest.raises(ValueError, match="same arguments"):
        chain.stream_step(
            x[:, :WINDOW],
            y[:, :WINDOW],
            l1_loss,
            carry,
            sample_weight=np.ones(x[:, :WINDOW].shape[:2]),
        )
    again, _ = chain.stream_step(
        x[:, WINDOW : 2 * WINDOW], y[:, WINDOW : 2 * WINDOW], l1_loss, carry
    )
    assert np.isfinite(float(again.loss))


def _carry_after_one_window(chain):
    x, y = stream()
    return chain.stream_step(x[:, :WINDOW], y[:, :WINDOW], l1_loss)[1], x, y


@pytest.mark.parametrize(
    "make,error,match",
    [
        (
            lambda carry, x, y: chain_for(3).stream_step(x[:, 6:], y[:, 6:], l1_loss, tuple(carry)),
            TypeError,
            "carry must be the tbptt.StreamCarry",
        ),
        (
            lambda carry, x, y: tbptt.RecurrentChain(
                [
                    keras.layers.GRUCell(5, dtype="float64"),
                    keras.layers.LSTMCell(3, dtype="float64"),
                ],
                chunk_size=4,
                mode="truncated",
                backprop_chunks=2,
                dtype="float64",
            ).stream_step(x[:, 4:8], y[:, 4:8], l1_loss, carry),
            ValueError,
            "another chunking",
        ),
        (
            lambda carry, x, y: chain_for(2).stream_step(x[:, 6:], y[:, 6:], l1_loss, carry),
            ValueError,
            r"holds 6 steps.*at most 1 of them \(3 steps\)",
        ),
        (
            lambda carry, x, y: chain_for(1).stream_step(x[:, 6:], y[:, 6:], l1_loss, carry),
            ValueError,
            "keeps none",
        ),
        (
            lambda carry, x, y: chain_for(3).stream_step(x[:1, 6:], y[:1, 6:], l1_loss, carry),
            ValueError,
            "holds 2 streams, but this window has 1 rows",
        ),
        (
            lambda carry, x, y: chain_for(3).stream_step(x[:, 6:], None, l1_loss, carry),
            ValueError,
            "targets must be given",
        ),
        (
            lambda carry, x, y: chain_for(3).stream_step(
                x[:, 6:], y[:, 6:], l1_loss, carry, sample_weight=np.ones([2, 6])
            ),
            ValueError,
            "same arguments",
        ),
    ],
)
@pytest.mark.default_cases("<lambda>-TypeError-carry must be the tbptt.StreamCarry")
def test_a_carry_that_does_not_fit_the_chain_or_the_window_is_refused(make, error, match):
    """A carry of another chain (chunking, streams) would silently drop the window's first
    losses or splice other streams; each is named before anything runs."""
    carry, x, y = _carry_after_one_window(chain_for(3))
    with pytest.raises(error, match=match):
        make(carry, x, y)

"""truncation_report against independent references: per-chunk tapes with stop_gradient for
the truncated gradients, and one tape per (cut, age) for the carried dLoss/dstate."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from cells import make_cells
from conftest import l1_loss, make_sequence
from references import full_bptt, truncated_reference

import tbptt

K, T, B = 3, 12, 2


def make_chain(kind="gru"):
    keras.utils.set_random_seed(6)
    return tbptt.RecurrentChain(
        make_cells(kind, 2, "float64"),
        chunk_size=K,
        dtype="float64",
        head=keras.layers.Dense(2, dtype="float64"),
    )


def data():
    return make_sequence(B, T, 2, "float64"), make_sequence(B, T, 2, "float64", offset=0.4)


def flat(grads):
    return np.concatenate([np.ravel(g) for g in grads])


@pytest.mark.slow
def test_rows_match_per_chunk_tapes():
    chain = make_chain("stacked")  # a GRU under an LSTM
    x, y = data()
    report = tbptt.diagnostics.truncation_report(
        chain, x, y, l1_loss, backprop_chunks=[1, 2], reach_chunks=1
    )
    _, exact, _, _ = full_bptt(chain, x, y, l1_loss)
    exact = flat(exact)
    for row in report.rows:
        _, grads, _ = truncated_reference(
            chain, x, y, l1_loss, row.backprop_chunks, chain.initial_state(B)
        )
        grads = flat(grads)
        cosine = grads @ exact / np.linalg.norm(grads) / np.linalg.norm(exact)
        error = np.linalg.norm(grads - exact) / np.linalg.norm(exact)
        assert (row.chunk_size, row.window) == (K, K * row.backprop_chunks)
        assert abs(row.cosine - cosine) < 1e-12 and abs(row.relative_error - error) < 1e-10
    assert report.rows[0].relative_error > 0.01  # truncation loses something on this model
    assert report.exact_grad_norm == pytest.approx(np.linalg.norm(exact), rel=1e-12)


@pytest.mark.slow
def test_reach_matches_one_tape_per_cut_and_age():
    """Age a at cut k: d(loss of chunk k+a-1)/d(state entering chunk k), RMS over the cuts."""
    chain = make_chain("lstm")
    x, y = data()
    report = tbptt.diagnostics.truncation_report(
        chain, x, y, l1_loss, backprop_chunks=[1], reach_chunks=3
    )
    chunks = T // K
    boundaries, state = [chain.initial_state(B)], chain.initial_state(B)
    for k in range(chunks):
        _, state = chain(x[:, k * K : (k + 1) * K], state)
        boundaries.append(state)
    expected = []
    for age in range(1, chunks):
        norms = []
        for cut in range(1, chunks - age + 1):
            start = tf.nest.map_structure(tf.convert_to_tensor, boundaries[cut])
            last = cut + age - 1
            with tf.GradientTape() as tape:
                tape.watch(start)
                outputs, _ = chain(x[:, cut * K : (last + 1) * K], start)
                loss = l1_loss(y[:, last * K : (last + 1) * K], outputs[:, -K:])
            grad = tape.gradient(loss, start)
            norms.append(math.sqrt(sum(float(tf.reduce_sum(g**2)) for g in tf.nest.flatten(grad))))
        expected.append(math.sqrt(np.mean(np.square(norms))))
    np.testing.assert_allclose(report.reach[K], expected, rtol=1e-10)


@pytest.mark.slow
def test_enough_chunks_back_is_the_exact_gradient_and_the_report_reads(tmp_path):
    chain = make_chain()
    x, y = data()
    report = tbptt.diagnostics.truncation_report(
        chain, x, y, l1_loss, chunk_sizes=[2, 4], backprop_chunks=[1, 6], reach_chunks=2
    )
    assert [(r.chunk_size, r.backprop_chunks) for r in report.rows] == [
        (2, 1),
        (2, 6),
        (4, 1),
        (4, 6),
    ]
    for row in report.rows:
        if row.window >= T:
            assert row.cosine == pytest.approx(1.0, abs=1e-12) and row.relative_error < 1e-10
    close = [r for r in report.rows if r.relative_error <= 0.1]
    best = min(close, key=lambda r: (r.window, -r.chunk_size))
    assert report.smallest_window() == best
    assert report.smallest_window(max_error=0.0) is None
    text = str(report)
    assert (
        f"within 10% of the exact gradient: chunk_size={best.chunk_size}, "
        f"backprop_chunks={best.backprop_chunks} ({best.window} steps)"
    ) in text
    assert "Carried dLoss/dstate, chunk_size=4" in text
    assert chain.mode == "exact" and chain.chunk_size == K  # the chain itself is unchanged
    pytest.importorskip("matplotlib")
    report.plot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"chunk_sizes": 0}, ValueError, "chunk_sizes must be a positive int"),
        ({"chunk_sizes": "4"}, ValueError, "chunk_sizes"),
        (
            {"backprop_chunks": []},
            ValueError,
            "backprop_chunks must be a positive int or a non-empty",
        ),
        ({"backprop_chunks": 2.0}, TypeError, "backprop_chunks"),
        ({"reach_chunks": 0}, ValueError, "reach_chunks must be a positive int"),
    ],
)
@pytest.mark.default_cases("kwargs0-ValueError-chunk_sizes must be a positive int")
def test_bad_arguments(kwargs, error, match):
    x, y = data()
    with pytest.raises(error, match=match):
        tbptt.diagnostics.truncation_report(make_chain(), x, y, l1_loss, **kwargs)


def test_a_chain_is_required_and_auto_needs_sizes():
    x, y = data()
    with pytest.raises(TypeError, match="chain must be a tbptt.RecurrentChain"):
        tbptt.diagnostics.truncation_report(keras.layers.GRU(2), x, y, l1_loss)
    auto = tbptt.StatefulGRUChain(3, chunk_size="auto")
    with pytest.raises(ValueError, match="chunk_sizes must be given"):
        tbptt.diagnostics.truncation_report(auto, x, y, l1_loss)


@pytest.mark.slow
def test_the_report_says_what_it_computes(capsys):
    chain = make_chain()
    x, y = data()
    tbptt.diagnostics.truncation_report(
        chain, x, y, l1_loss, backprop_chunks=[1, 2], reach_chunks=1, verbose=1
    )
    err = capsys.readouterr().err
    assert "[1/4] truncation report: the exact gradient" in err
    assert "[3/4] truncation report: TBPTT(K=3, m=2)" in err
    tbptt.diagnostics.truncation_report(
        chain, x, y, l1_loss, backprop_chunks=[1], reach_chunks=1, verbose=0
    )
    assert capsys.readouterr().err == ""

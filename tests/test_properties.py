"""Property tests: random configurations, exact == full BPTT and truncated == its reference.

The default suite draws a dozen; the slow suite draws 300 and also runs one configuration per
(cell kind, backend, mode), so that every combination is seen whatever hypothesis draws.
"""

import itertools

import hypothesis.strategies as st
import keras
import pytest
import tensorflow as tf
from cells import make_cells
from conftest import assert_all_close, l1_loss, make_sequence
from hypothesis import HealthCheck, given, settings
from references import full_bptt, truncated_reference

import tbptt

STACKABLE = ["gru", "lstm", "simple", "custom"]
CELL_KINDS = STACKABLE + ["module"]
MODES = ["exact", "exact_levels2", 1, 2, 3]  # int: truncated, m

configs = st.fixed_dictionaries(
    {
        "steps": st.integers(1, 12),
        "chunk_size": st.integers(1, 6),
        "batch": st.integers(1, 3),
        "features": st.integers(1, 3),
        # A plain tf.Module cell is built for the chain's input features: bottom layer only.
        "layers": st.tuples(
            st.sampled_from(CELL_KINDS), st.lists(st.sampled_from(STACKABLE), max_size=1)
        ).map(lambda layers: [layers[0]] + layers[1]),
        "head": st.booleans(),
        "mode": st.sampled_from(MODES),
        "backend": st.sampled_from(["eager", "graph"]),
        "reduction": st.sampled_from(["sum", "mean"]),
    }
)


def check(config):
    features = config["features"]
    cells = [cell for kind in config["layers"] for cell in make_cells(kind, features, "float64")]
    truncated = isinstance(config["mode"], int)
    chain = tbptt.RecurrentChain(
        cells,
        chunk_size=config["chunk_size"],
        backend=config["backend"],
        head=keras.layers.Dense(2, dtype="float64") if config["head"] else None,
        mode="truncated" if truncated else "exact",
        backprop_chunks=config["mode"] if truncated else 1,
        levels=2 if config["mode"] == "exact_levels2" else 1,
        reduction=config["reduction"],
        dtype="float64",
    )
    x = make_sequence(config["batch"], config["steps"], features, "float64")
    chain.build(x.shape)
    outputs = 2 if config["head"] else cells[-1].state_size
    outputs = outputs if isinstance(outputs, int) else outputs[0]
    y = make_sequence(config["batch"], config["steps"], outputs, "float64", offset=0.3)
    mean = config["reduction"] == "mean"

    def mean_l1(y_true, y_pred):
        return tf.reduce_mean(tf.sqrt(tf.square(y_true - y_pred) + 1e-3))

    result = chain.value_and_gradients(x, y, mean_l1 if mean else l1_loss)
    if truncated:
        _, grads, state_grad = truncated_reference(
            chain, x, y, l1_loss, config["mode"], chain.initial_state(config["batch"])
        )
    else:
        _, grads, _, state_grad = full_bptt(chain, x, y, l1_loss)
    if mean:  # chunk means weighted by length/T = the whole-sequence mean = l1_loss / y.size
        grads, state_grad = tf.nest.map_structure(lambda g: g / y.size, (grads, state_grad))
    assert_all_close(result.grads, grads, 1e-9, str(config))
    assert_all_close(result.initial_state_grad, state_grad, 1e-9, str(config))


@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(configs)
def test_random_configurations(config):
    check(config)


@pytest.mark.slow
@pytest.mark.parametrize("shard", range(3))  # side by side under pytest-xdist
@pytest.mark.default_cases(every=True)  # all of them slow
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(config=configs)
def test_random_configurations_many(shard, config):
    check(config)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,backend,mode", itertools.product(CELL_KINDS, ["eager", "graph"], MODES)
)
@pytest.mark.default_cases("gru-eager-exact")
def test_every_cell_kind_backend_and_mode(kind, backend, mode):
    check(
        {
            "steps": 11,
            "chunk_size": 3,
            "batch": 2,
            "features": 2,
            "layers": [kind],
            "head": kind != "simple",
            "mode": mode,
            "backend": backend,
            "reduction": "mean" if backend == "graph" else "sum",
        }
    )

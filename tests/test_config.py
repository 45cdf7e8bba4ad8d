"""ChainConfig, with_config and the package surface."""

import subprocess
import sys

import keras
import pytest
from conftest import assert_all_close, l1_loss, make_sequence

import tbptt


def test_a_config_is_validated_when_made_and_replaced():
    config = tbptt.ChainConfig(chunk_size=10)
    assert config.schedule.context_chunks == 0 and config.schedule.accepts_final_state_grad
    truncated = config._replace(mode="truncated", backprop_chunks=3)
    assert truncated.schedule.context_chunks == 2 and config.backprop_chunks == 1
    with pytest.raises(ValueError, match="only applies to mode='truncated'"):
        config._replace(backprop_chunks=2)
    with pytest.raises(ValueError, match="Did you mean 'exact'"):
        config._replace(mode="exakt")
    with pytest.raises(Exception):  # frozen
        config.mode = "truncated"
    assert not tbptt.ChainConfig(10, mode="truncated").schedule.accepts_final_state_grad


def test_with_config_shares_the_weights_and_changes_only_the_config():
    chain = tbptt.StatefulGRUChain(4, head=keras.layers.Dense(2), chunk_size=3)
    x, y = make_sequence(2, 10, 3), make_sequence(2, 10, 2, offset=0.5)
    truncated = chain.with_config(mode="truncated", backprop_chunks=2)
    assert truncated.trainable_variables == chain.trainable_variables
    assert (truncated.mode, chain.mode) == ("truncated", "exact")
    assert truncated.cells == chain.cells and truncated.head is chain.head
    # Same weights: its exact twin gives the same gradient as the chain itself.
    twin = truncated.with_config(mode="exact", backprop_chunks=1)
    assert_all_close(
        twin.value_and_gradients(x, y, l1_loss).grads,
        chain.value_and_gradients(x, y, l1_loss).grads,
        0.0,
    )


def test_stateful_gru_chain_takes_every_config_keyword():
    chain = tbptt.StatefulGRUChain(
        (4, 3), chunk_size="auto", levels=2, dtype="float64", reduction="mean", check_numerics=True
    )
    assert chain.config == tbptt.ChainConfig(
        "auto", levels=2, dtype="float64", reduction="mean", check_numerics=True
    )
    assert chain.units == (4, 3) and chain.dtype.name == "float64"
    with pytest.raises(ValueError, match="units=64"):
        tbptt.StatefulGRUChain(0, chunk_size=3)


def test_star_import_does_not_shadow_keras():
    """`from tbptt import *` binds exactly `__all__`: no `keras` (nor `data`) in it."""
    assert "keras" not in tbptt.__all__ and "data" not in tbptt.__all__
    assert all(hasattr(tbptt, name) for name in tbptt.__all__)
    assert tbptt.keras.ChunkedModel and tbptt.data.stream_windows  # still reachable


@pytest.mark.slow
def test_another_keras_backend_is_refused_by_name():
    code = "import tbptt; tbptt.RecurrentChain"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"KERAS_BACKEND": "numpy", "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode != 0
    assert "KERAS_BACKEND" in out.stderr and "tensorflow" in out.stderr

"""ChunkedModel under tf.distribute: the same weights as one device on the global batch.

Each case runs `distributed_fit.py` in its own process (logical devices and TF_CONFIG must be
set before TensorFlow starts): a stateful, truncated (backprop_chunks=2) fit over 8 streams, so
the per-replica carried state and the gradient across batch cuts are covered too.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_fit.py")

pytestmark = pytest.mark.slow


def _run(out, kind, env=None, wait=True):
    process = subprocess.Popen(
        [sys.executable, SCRIPT, str(out), kind],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if wait:
        _finish(process)
    return process


def _finish(process):
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]


def _weights(path):
    stored = np.load(path)
    names = sorted((k for k in stored.files if k.startswith("arr_")), key=lambda k: int(k[4:]))
    return [stored[k] for k in names], stored


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "weights.npz"
    _run(out, "single")
    return _weights(out)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_mirrored_strategy_on_two_cpu_devices_equals_one_device(single, tmp_path):
    _run(tmp_path / "mirrored.npz", "mirrored")
    weights, stored = _weights(tmp_path / "mirrored.npz")
    assert int(stored["replicas"]) == 2
    for got, want in zip(weights, single[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored["loss"], single[1]["loss"], rtol=1e-5)


def test_multi_worker_mirrored_strategy_with_two_processes_equals_one_process(single, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    processes = [
        _run(
            tmp_path / f"worker{index}.npz",
            "multiworker",
            wait=False,
            env={
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                )
            },
        )
        for index in range(2)
    ]
    for process in processes:
        _finish(process)
    for index in range(2):
        weights, stored = _weights(tmp_path / f"worker{index}.npz")
        assert int(stored["replicas"]) == 2
        for got, want in zip(weights, single[0]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

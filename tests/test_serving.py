"""The serving export: a SavedModel with the state in and out, served in a process without
tbptt, against Keras's own RNN over the whole stream."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_sequence, mirrored, needs_keras3, run_python
from references import forward

import tbptt

pytestmark = needs_keras3

SERVE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    served = tf.saved_model.load(sys.argv[1])
    x = np.load(sys.argv[2])
    state = served.initial_state(x.shape[0])
    first, state = served.step(x[:, :7], state)            # two windows, the state carried
    second, state = served.step(x[:, 7:], state)
    from_zeros = served.serve(x[:, :7])                    # Keras's endpoint: inputs only
    if x.dtype.kind == "i":                                # token ids: any integer dtype
        for dtype in ("int32", "uint8", "int16"):
            assert np.array_equal(served.serve(x[:, :7].astype(dtype)), from_zeros), dtype
    signature = served.signatures["serving_default"]
    leaves = tf.nest.flatten(served.initial_state(x.shape[0]))
    spec = signature.structured_input_signature[1]["inputs"]
    flat = signature(inputs=tf.constant(x[:, :7], spec.dtype),
                     **{f"state_{i}": leaf for i, leaf in enumerate(leaves)})
    print(json.dumps({"tbptt": "tbptt" in sys.modules,
                      "outputs": np.concatenate([first, second], axis=1).tolist(),
                      "flat": flat["outputs"].numpy().tolist(),
                      "serve": from_zeros.numpy().tolist(),
                      "keys": sorted(flat)}))
""")


def _model(inputs_layer=None):
    keras.utils.set_random_seed(8)
    chain = tbptt.RecurrentChain(
        [keras.layers.GRUCell(4), keras.layers.LSTMCell(3)],
        head=keras.layers.Dense(2),
        chunk_size=5,
        inputs_layer=inputs_layer,
    )
    model = tbptt.keras.ChunkedModel(chain, stateful=True)
    model.compile(optimizer="sgd", loss="mse")
    return model


def _serve(tmp_path, model, x):
    path = tmp_path / "served"
    model.export(path, verbose=False)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    out = subprocess.run(
        [sys.executable, str(script), str(path), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return path, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a subprocess each
@pytest.mark.parametrize("kind", ["features", "token ids"])
@pytest.mark.default_cases("token ids")
def test_an_exported_model_serves_consecutive_windows_without_tbptt(tmp_path, kind):
    if kind == "features":
        model, x = _model(), make_sequence(2, 12, 3)
        y = make_sequence(2, 12, 2, offset=0.5)
    else:
        model = _model(keras.layers.Embedding(9, 3))
        x = (np.arange(24).reshape(2, 12) * 5) % 9  # NumPy's default int64
        y = make_sequence(2, 12, 2, offset=0.5)
    model.fit(x, y, batch_size=2, shuffle=False, verbose=0)
    path, served = _serve(tmp_path, model, x)
    assert not served["tbptt"]
    chain = model.chain
    inputs = x if chain.inputs_layer is None else chain.inputs_layer(x)
    plain = tbptt.RecurrentChain(chain.cells, head=chain.head, chunk_size=5)
    expected, _ = forward(plain, inputs)  # Keras's RNN over the whole stream
    np.testing.assert_allclose(served["outputs"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served["flat"], expected[:, :7], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served["serve"], expected[:, :7], rtol=1e-5, atol=1e-6)
    assert served["keys"] == ["outputs", "state_0", "state_1", "state_2"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("saved_model_cli") is None, reason="no saved_model_cli")
def test_saved_model_cli_lists_the_serving_signature(tmp_path):
    model, x = _model(), make_sequence(2, 12, 3)
    model.predict(x, verbose=0)  # built
    path = tmp_path / "served"
    model.export(path, verbose=False)
    out = subprocess.run(
        ["saved_model_cli", "show", "--dir", str(path), "--all"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for name in (
        "signature_def['serving_default']",
        "inputs['inputs']",
        "inputs['state_0']",
        "outputs['outputs']",
        "outputs['state_2']",
    ):
        assert name in out.stdout, name


def test_export_refuses_another_format_and_an_unbuilt_model(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="build"):
        model.export(tmp_path / "unbuilt", verbose=False)
    model.predict(make_sequence(2, 4, 3), verbose=0)
    with pytest.raises(ValueError, match="format='tf_saved_model'"):
        model.export(tmp_path / "m", format="onnx")


@pytest.mark.slow
def test_a_model_built_under_a_strategy_exports_and_serves_its_weights(tmp_path):
    """Variables made under MirroredStrategy().scope() are a copy per device: the export
    still sees them as the cells' own and serves them."""
    strategy = mirrored()
    with strategy.scope():
        model = _model()
    x = make_sequence(4, 12, 3)
    model.fit(x, make_sequence(4, 12, 2, offset=0.5), batch_size=4, shuffle=False, verbose=0)
    model.export(tmp_path / "served", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    outputs, _ = served.step(x, served.initial_state(4))
    expected, _ = forward(
        tbptt.RecurrentChain(model.chain.cells, head=model.chain.head, chunk_size=5), x
    )
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)


def _interpreter(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter: "moved to the LiteRT package"
        return tf.lite.Interpreter(model_path=str(path))


def _lite_run(path, packets, state_names):
    """The TensorFlow Lite model at `path` over consecutive packets, the state carried."""
    runner = _interpreter(path).get_signature_runner()
    details = runner.get_input_details()
    state = {n: np.zeros(details[n]["shape"], details[n]["dtype"]) for n in state_names}
    outputs = []
    for packet in packets:
        result = runner(inputs=packet, **state)
        outputs.append(result["outputs"])
        state = {name: result[name] for name in state}
    return np.concatenate(outputs, axis=1)


@pytest.mark.parametrize(
    "kind, steps, batch",
    [("features", 1, 1), ("features", 4, 2), ("token ids", 3, 2)],
    ids=["one_step", "packets", "ids"],
)
@pytest.mark.default_cases("ids")
def test_a_tflite_export_streams_packets_with_the_state_in_and_out(tmp_path, kind, steps, batch):
    """Packet after packet through the TensorFlow Lite model equals Keras's RNN over the whole
    stream; the model holds only built-in operators."""
    if kind == "features":
        model, x = _model(), make_sequence(batch, 12, 3)
    else:
        model = _model(keras.layers.Embedding(9, 3))
        x = ((np.arange(batch * 12).reshape(batch, 12) * 5) % 9).astype("int32")
    model.predict(x, verbose=0)  # built
    path = tmp_path / "chain.tflite"
    model.export(path, format="tflite", steps=steps, batch_size=batch, verbose=False)
    packets = [x[:, t : t + steps] for t in range(0, 12, steps)]
    got = _lite_run(path, packets, ["state_0", "state_1", "state_2"])
    chain = model.chain
    inputs = x if chain.inputs_layer is None else chain.inputs_layer(x)
    plain = tbptt.RecurrentChain(chain.cells, head=chain.head, chunk_size=5)
    expected, _ = forward(plain, inputs)  # Keras's RNN over the whole stream
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    ops = {op["op_name"] for op in _interpreter(path)._get_ops_details()}
    assert not any(op.startswith("Flex") or op in ("WHILE", "VAR_HANDLE") for op in ops), ops


def test_a_tflite_export_refuses_bad_options_by_name(tmp_path):
    model, x = _model(), make_sequence(2, 6, 3)
    model.predict(x, verbose=0)
    with pytest.raises(ValueError, match="steps"):
        model.export(tmp_path / "m.tflite", format="tflite", steps=0)
    with pytest.raises(TypeError):
        model.export(tmp_path / "m.tflite", format="tflite", window=3)


@pytest.mark.slow  # a subprocess
def test_a_tflite_model_runs_in_a_process_without_tbptt(tmp_path):
    model, x = _model(), make_sequence(1, 6, 3)
    model.predict(x, verbose=0)
    model.export(tmp_path / "chain.tflite", format="tflite", verbose=False)
    np.save(tmp_path / "x.npy", x)
    out = run_python(
        "import sys, json, warnings, numpy as np, tensorflow as tf\n"
        "warnings.simplefilter('ignore')\n"
        "runner = tf.lite.Interpreter(model_path=sys.argv[1]).get_signature_runner()\n"
        "x = np.load(sys.argv[2])\n"
        "state = {n: np.zeros(d['shape'], d['dtype'])\n"
        "         for n, d in runner.get_input_details().items() if n != 'inputs'}\n"
        "outputs = []\n"
        "for t in range(x.shape[1]):\n"
        "    result = runner(inputs=x[:, t : t + 1], **state)\n"
        "    outputs.append(result['outputs'])\n"
        "    state = {n: result[n] for n in state}\n"
        "print(json.dumps({'tbptt': 'tbptt' in sys.modules,\n"
        "                  'outputs': np.concatenate(outputs, 1).tolist()}))\n",
        tmp_path / "chain.tflite",
        tmp_path / "x.npy",
    )
    served = json.loads(out.strip().splitlines()[-1])
    assert not served["tbptt"]
    want, _ = model.chain(x)
    np.testing.assert_allclose(served["outputs"], want, rtol=1e-5, atol=1e-6)

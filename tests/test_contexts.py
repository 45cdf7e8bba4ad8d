"""Every public entry point in every context a user runs it in, against a reference that does
not run the library: each cell matches, or is refused by name before anything runs.

Contexts: eager; inside the user's tf.function; inside tf.function(jit_compile=True); under a
persistent tape; under a tape inside a tape; TBPTT_XLA=0; a tf.distribute MirroredStrategy
over two logical CPUs; the user's tf.function traced without a tape, then run under a
persistent one; and, for Keras models, run_eagerly, jit_compile True and False, and a
save in one process loaded in another. The default suite runs the first context of each
entry point; `-m slow` runs the whole matrix.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_all_close, l1_loss, make_sequence, mirrored, needs_keras3
from references import forward, full_bptt, truncated_reference

import tbptt

B, T, F, K = 2, 11, 3, 4  # a ragged last chunk
F64 = 1e-10
CONTEXTS = [
    "eager",
    "function",
    "jit",
    "persistent_tape",
    "nested_tape",
    "no_xla",
    "distribute",
    "traced_then_taped",
]


def weighted_l1(y_true, y_pred, sample_weight=None):
    """`l1_loss` with a weight per step (the mask's: 0 on padding)."""
    weight = 1.0 if sample_weight is None else tf.cast(sample_weight, y_pred.dtype)[..., None]
    return tf.reduce_sum(weight * tf.sqrt(tf.square(y_true - y_pred) + 1e-3))


def first(context, contexts=CONTEXTS):
    """`contexts` with `context` first (the order cases are listed in)."""
    return [context] + [c for c in contexts if c != context]


def run_in(context, fn, monkeypatch):
    """`fn()` (a nest of tensors) run the way `context` says, as NumPy values; under a
    strategy, each replica's result (every replica runs the whole `fn`)."""
    if context == "no_xla":
        monkeypatch.setenv("TBPTT_XLA", "0")
    if context == "function":
        return _numpy(tf.function(fn)())
    if context == "jit":
        return _numpy(tf.function(fn, jit_compile=True)())
    if context == "persistent_tape":
        with tf.GradientTape(persistent=True):
            return _numpy(fn())
    if context == "nested_tape":
        with tf.GradientTape():
            with tf.GradientTape():
                return _numpy(fn())
    if context == "traced_then_taped":  # a user's function traced first, then run under tapes
        function = tf.function(fn)
        function()
        with tf.GradientTape(persistent=True):
            return _numpy(function())
    if context == "distribute":
        strategy = mirrored()
        results = tf.function(lambda: strategy.run(fn))()
        replicas = [strategy.experimental_local_results(r) for r in tf.nest.flatten(results)]
        assert len(replicas[0]) == 2
        return [
            tf.nest.pack_sequence_as(results, [_numpy(r[i]) for r in replicas]) for i in range(2)
        ]
    return _numpy(fn())


def _numpy(nest):
    return tf.nest.map_structure(lambda t: np.asarray(t), nest)


def each_replica(context, got):
    return got if context == "distribute" else [got]


def gru_lstm_chain(**kwargs):
    keras.utils.set_random_seed(5)
    cells = [keras.layers.GRUCell(4, dtype="float64"), keras.layers.LSTMCell(3, dtype="float64")]
    chain = tbptt.RecurrentChain(
        cells, head=keras.layers.Dense(2, dtype="float64"), chunk_size=K, dtype="float64", **kwargs
    )
    chain.build([None, None, F])
    return chain


def any_cell_chain():
    """Cells without a written-out backward: their compiled loops pull each step back."""
    keras.utils.set_random_seed(5)
    cells = [
        keras.layers.GRUCell(4, activation="relu", dtype="float64"),
        keras.layers.SimpleRNNCell(3, dtype="float64"),
    ]
    chain = tbptt.RecurrentChain(
        cells, head=keras.layers.Dense(2, dtype="float64"), chunk_size=K, dtype="float64"
    )
    chain.build([None, None, F])
    return chain


def data(steps=T):
    return make_sequence(B, steps, F, "float64"), make_sequence(B, steps, 2, "float64", 0.5)


def initial_state(chain):
    return tf.nest.map_structure(lambda s: s + 0.1, chain.initial_state(B))


# -- chain(...) under the user's own tape --------------------------------------------------------


@pytest.mark.parametrize("context", first("jit"))
@pytest.mark.default_cases("jit", "persistent_tape")
def test_forward_under_an_outer_tape(context, monkeypatch):
    chain = gru_lstm_chain()
    x, y = data()
    state = initial_state(chain)

    def fn():
        with tf.GradientTape(persistent=context == "persistent_tape") as tape:
            tape.watch(state)
            outputs, _ = chain(x, state)
            loss = l1_loss(y, outputs)
        return loss, tape.gradient(loss, [chain.trainable_variables, state])

    loss, grads, _, state_grad = full_bptt(chain, x, y, l1_loss, state)
    # The user's own tape is the persistent one: no other tape around it.
    got = run_in("eager" if context == "persistent_tape" else context, fn, monkeypatch)
    for replica in each_replica(context, got):
        assert_all_close(
            [replica[0]] + replica[1][0] + tf.nest.flatten(replica[1][1]),
            [loss] + grads + tf.nest.flatten(state_grad),
            F64,
            context,
        )


# -- value_and_gradients ------------------------------------------------------------------------


@pytest.mark.parametrize("context", first("jit"))
@pytest.mark.parametrize("mode", ["exact", "truncated", "levels2", "flags", "any_cell"])
@pytest.mark.default_cases(  # every mode once; no_xla, distribute, traced_then_taped with -m slow
    "exact-jit",
    "truncated-eager",
    "levels2-function",
    "flags-persistent_tape",
    "any_cell-nested_tape",
)
def test_value_and_gradients(context, mode, monkeypatch):
    options = {
        "exact": {},
        "flags": {},
        "levels2": {"levels": 2},
        "any_cell": {},
        "truncated": {"mode": "truncated", "backprop_chunks": 2},
    }[mode]
    chain = gru_lstm_chain(**options) if mode != "any_cell" else any_cell_chain()
    x, y = data()
    state = initial_state(chain)
    flags = {}
    if mode == "flags":  # episodes packed end to end, padding at the end of row 1
        reset = np.zeros([B, T], bool)
        reset[0, 6] = True
        mask = np.ones([B, T], bool)
        mask[1, 8:] = False
        flags = {"reset": reset, "mask": mask}

    def fn():
        result = chain.value_and_gradients(x, y, weighted_l1, state, **flags)
        return result.loss, result.grads, result.initial_state_grad

    if mode == "truncated":
        loss, grads, state_grad = truncated_reference(chain, x, y, l1_loss, 2, state)
    elif mode == "flags":
        loss, grads, state_grad = _flagged_reference(chain, x, y, state, **flags)
    else:
        loss, grads, _, state_grad = full_bptt(chain, x, y, l1_loss, state)
    for got in each_replica(context, run_in(context, fn, monkeypatch)):
        assert_all_close(
            [got[0]] + got[1] + tf.nest.flatten(got[2]),
            [loss] + grads + tf.nest.flatten(state_grad),
            F64,
            context,
        )


def _flagged_reference(chain, x, y, state, reset, mask):
    """Row by row, episode by episode: Keras's RNN over each episode's real steps (a reset
    starts from zeros; the padding keeps the state and adds no loss)."""
    state = tf.nest.map_structure(tf.convert_to_tensor, state)
    with tf.GradientTape() as tape:
        tape.watch(state)
        total = 0.0
        for b in range(B):
            row = tf.nest.map_structure(lambda s: s[b : b + 1], state)
            starts = [0] + [t for t in range(T) if reset[b, t] and t > 0] + [T]
            for a, z in zip(starts[:-1], starts[1:]):
                if a > 0:
                    row = tf.nest.map_structure(tf.zeros_like, row)
                real = a + int(mask[b, a:z].sum())  # the padding is at the end
                outputs, row = forward(chain, x[b : b + 1, a:real], row)
                total += l1_loss(y[b : b + 1, a:real], outputs)
    grads, state_grad = tape.gradient(total, [chain.trainable_variables, state])
    return total, grads, state_grad


def test_chunk_sources_and_check_numerics_are_refused_by_name_inside_xla():
    chain = gru_lstm_chain()
    x, y = data()
    source = tbptt.ChunkSource(lambda a, b: x[:, a:b], x.shape, "float64")
    with pytest.raises(ValueError, match="chunk source cannot run inside .*jit_compile"):
        tf.function(lambda: chain.value_and_gradients(source, y, l1_loss).loss, jit_compile=True)()
    checked = chain.with_config(check_numerics=True)
    with pytest.raises(ValueError, match="check_numerics=True cannot run inside"):
        tf.function(lambda: checked.value_and_gradients(x, y, l1_loss).loss, jit_compile=True)()


@pytest.mark.parametrize("context", first("function", ["function", "persistent_tape"]))
@pytest.mark.default_cases("function")
def test_a_chunk_source_inside_the_user_s_function(context, monkeypatch):
    chain = gru_lstm_chain()
    x, y = data()
    source = tbptt.ChunkSource(lambda a, b: x[:, a:b], x.shape, "float64")

    def fn():
        result = chain.value_and_gradients(source, y, l1_loss)
        return result.loss, result.grads

    loss, grads, _, _ = full_bptt(chain, x, y, l1_loss)
    compiled = tf.function(fn)
    for _ in range(2):  # the graph runs again: the source is read again
        got = _numpy(compiled()) if context == "function" else run_in(context, fn, monkeypatch)
        assert_all_close([got[0]] + got[1], [loss] + grads, F64, context)


def test_a_first_call_under_a_tape_traces_with_the_device_and_raises_the_loss_s_error():
    """The first trace of a call made under a persistent tape runs in a thread of its own
    (tapes belong to their thread): the result is placed where the caller asked, and an
    error raised while tracing reaches the caller, leaving the chain usable."""
    chain = gru_lstm_chain()
    x, y = data()

    def failing(y_true, y_pred):
        raise ValueError("the loss says no")

    with tf.GradientTape(persistent=True), pytest.raises(ValueError, match="the loss says no"):
        chain.value_and_gradients(x, y, failing)
    with tf.device("/CPU:1"), tf.GradientTape(persistent=True):  # the second logical CPU
        result = chain.value_and_gradients(x, y, l1_loss)
    assert result.loss.device.endswith("CPU:1")
    loss, grads, _, _ = full_bptt(chain, x, y, l1_loss)
    assert_all_close([result.loss] + result.grads, [loss] + grads, F64, "persistent_tape")


# -- stream_step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("context", first("function"))
@pytest.mark.default_cases("persistent_tape")
def test_stream_step(context, monkeypatch):
    chain = gru_lstm_chain(mode="truncated", backprop_chunks=3)
    x, y = data(3 * 2 * K)  # three windows of two chunks

    def fn():
        carry, loss, grads = None, 0.0, None
        for start in range(0, x.shape[1], 2 * K):
            window = slice(start, start + 2 * K)
            result, carry = chain.stream_step(x[:, window], y[:, window], l1_loss, carry)
            loss += result.loss
            grads = result.grads if grads is None else [g + d for g, d in zip(grads, result.grads)]
        return loss, grads

    loss, grads, _ = truncated_reference(chain, x, y, l1_loss, 3, chain.initial_state(B))
    for got in each_replica(context, run_in(context, fn, monkeypatch)):
        assert_all_close([got[0]] + got[1], [loss] + grads, F64, context)


# -- StageChain ----------------------------------------------------------------------------------


@pytest.mark.parametrize("context", first("jit"))
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.default_cases(  # every context, recompute either way
    "False-jit",
    "True-eager",
    "False-function",
    "True-persistent_tape",
    "False-nested_tape",
    "True-no_xla",
    "False-distribute",
    "True-traced_then_taped",
)
def test_stage_chain(context, recompute, monkeypatch):
    keras.utils.set_random_seed(6)
    stages = [
        keras.layers.Dense(5, activation="tanh", dtype="float64"),
        keras.layers.Dense(4, activation="tanh", dtype="float64"),
        keras.layers.Dense(1, dtype="float64"),
    ]
    chain = tbptt.StageChain(stages, recompute=recompute)
    x, y = make_sequence(4, 1, 3, "float64")[:, 0], make_sequence(4, 1, 1, "float64")[:, 0]
    chain.build(x.shape, "float64")

    def fn():
        result = chain.value_and_gradients(x, y, l1_loss)
        return result.loss, result.grads, result.input_grad

    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        value = inputs
        for stage in stages:
            value = stage(value)
        loss = l1_loss(y, value)
    grads, input_grad = tape.gradient(loss, [chain.trainable_variables, inputs])
    for got in each_replica(context, run_in(context, fn, monkeypatch)):
        assert_all_close([got[0]] + got[1] + [got[2]], [loss] + grads + [input_grad], F64, context)


# -- compat.v1.backprop_chunks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "context", first("function", ["function", "jit", "persistent_tape", "nested_tape", "eager"])
)
@pytest.mark.default_cases(every=True)
def test_backprop_chunks(context, monkeypatch):
    w = tf.Variable([[0.9, -0.2], [0.3, 0.7]], dtype=tf.float64)
    x = tf.constant(make_sequence(2, 6, 2, "float64"))

    def graph_fn():
        state, boundary, losses = tf.fill([2, 2], tf.constant(0.2, tf.float64)), [], []
        boundary.append(state)
        for k in range(3):
            for t in range(2 * k, 2 * k + 2):
                state = tf.tanh(state @ w + x[:, t])
            boundary.append(state)
            losses.append(tf.reduce_sum(tf.sin(state)))
        result = tbptt.compat.v1.backprop_chunks(losses, boundary, [w])
        return result.variable_grads[0], tf.gradients(tf.add_n(losses), w)[0]

    if context == "eager":
        with pytest.raises(RuntimeError, match="while building a graph"):
            graph_fn()
        return
    if context in ("persistent_tape", "nested_tape"):
        fn = tf.function(graph_fn)
        got, expected = run_in(context, fn, monkeypatch)
    else:
        got, expected = run_in(context, graph_fn, monkeypatch)
    assert_all_close([got], [expected], F64, context)


# -- ChunkedModel --------------------------------------------------------------------------------

KERAS_CONTEXTS = ["jit", "function", "run_eagerly", "no_xla", "distribute"]


def keras_pair(strategy=None):
    """A float64 ChunkedModel and a plain Keras GRU model with the same weights."""
    scope = strategy.scope() if strategy is not None else _nullcontext()
    with scope:
        keras.utils.set_random_seed(7)
        chain = tbptt.StatefulGRUChain(
            4, head=keras.layers.Dense(2, dtype="float64"), chunk_size=K, dtype="float64"
        )
        model = tbptt.keras.ChunkedModel(chain)
        model.build([None, None, F])
    plain = keras.Sequential(
        [
            keras.Input((None, F), dtype="float64"),
            keras.layers.GRU(4, return_sequences=True, dtype="float64"),
            keras.layers.Dense(2, dtype="float64"),
        ]
    )
    for target, source in zip(plain.trainable_variables, chain.trainable_variables):
        target.assign(source)
    return model, plain


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _compile(model, context):
    options = {
        "jit": {"jit_compile": True},
        "function": {"jit_compile": False},
        "run_eagerly": {"run_eagerly": True},
    }.get(context, {})
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.MeanSquaredError(dtype="float64"),
        metrics=["mae"],
        **options,
    )


@needs_keras3
@pytest.mark.parametrize("context", KERAS_CONTEXTS)
@pytest.mark.default_cases("jit")  # a strategy's contexts (about 10 s) run with -m slow
def test_chunked_model_fit_evaluate_predict(context, monkeypatch):
    if context == "no_xla":
        monkeypatch.setenv("TBPTT_XLA", "0")
    strategy = mirrored() if context == "distribute" else None
    model, plain = keras_pair(strategy)
    x, y = (np.concatenate([a, a[::-1] * 0.5]) for a in data())  # 4 rows, 2 batches of 2
    _compile(model, context)
    _compile(plain, "function")
    ours = model.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0).history
    theirs = plain.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0).history
    # Keras logs a float64 model's loss and metrics in float32; the weights are float64.
    for name in ("loss", "mae"):
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, err_msg=name)
    assert_all_close(model.trainable_variables, plain.trainable_variables, 1e-9, "weights")
    np.testing.assert_allclose(
        model.evaluate(x, y, verbose=0), plain.evaluate(x, y, verbose=0), rtol=1e-6
    )
    np.testing.assert_allclose(model.predict(x, verbose=0), plain.predict(x, verbose=0), rtol=1e-9)


SAVED_SCRIPT = textwrap.dedent("""
    import json, sys
    import keras, numpy as np, tbptt
    model = keras.models.load_model(sys.argv[1])
    x, y = np.load(sys.argv[2]), np.load(sys.argv[3])
    predicted = model.predict(x, verbose=0)
    loss = model.train_on_batch(x, y)
    weights = [v.numpy().tolist() for v in model.trainable_variables]
    print(json.dumps({"predicted": predicted.tolist(), "loss": float(np.ravel(loss)[0]),
                      "weights": weights}))
""")


@needs_keras3
@pytest.mark.slow  # a new interpreter importing TensorFlow: ~10 s
@pytest.mark.parametrize("order", ["import keras, tbptt", "import tbptt, keras"])
@pytest.mark.default_cases("import keras, tbptt")
def test_a_saved_model_loads_predicts_and_trains_in_a_new_process(tmp_path, order):
    model, _ = keras_pair()
    x, y = (np.concatenate([a, a[::-1] * 0.5]) for a in data())
    _compile(model, "function")
    model.fit(x, y, batch_size=2, shuffle=False, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    script = tmp_path / "load.py"
    script.write_text(
        SAVED_SCRIPT.replace("import keras, numpy as np, tbptt", order + "\nimport numpy as np")
    )
    out = subprocess.run(
        [sys.executable, str(script), path, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(loaded["predicted"], model.predict(x, verbose=0), rtol=1e-12)
    loss = model.train_on_batch(x, y)
    np.testing.assert_allclose(loaded["loss"], np.ravel(loss)[0], rtol=1e-12)
    assert_all_close([np.array(w) for w in loaded["weights"]], model.trainable_variables, 1e-12)

"""Keras as the oracle: whole compositions of features, drawn by hypothesis, trained with
`ChunkedModel.fit` and with the same plain Keras model, in the contexts users run them in.

A composition is an inputs layer, one to three cells of any kind (Keras's dropout included), a
head, a Keras loss with its settings and reduction, sample weights, a padding mask, metrics, a
dtype policy, an optimizer, stateful windows or not, and a chunk size that does or does not
divide T; the context is Keras's default compile, `jit_compile=True`, `run_eagerly=True` or a
`MirroredStrategy`. Both models start from the same weights (and the same dropout seeds), take
a few `fit` steps, and must agree on the logged loss and metrics, the weights, the optimizer's
variables and the predictions; both are then saved and loaded, and the loaded ones must
predict alike and take the same next step (a sample of them in a new process).

The default suite runs a few compositions; `pytest -m slow` runs many more. What the module
found is kept below as regular tests (`test_found_*`).
"""

import dataclasses
import os
import zlib

import hypothesis
import hypothesis.strategies as st
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_sequence, mirrored, needs_keras3, run_python
from hypothesis import HealthCheck, Phase, given, settings

import tbptt

pytestmark = needs_keras3

B, F, O, CLASSES, VOCABULARY = 4, 3, 2, 4, 9
# Hypothesis examples: a few in the default suite, many with -m slow (more with the variable),
# drawn in SHARDS parametrized cases (each its own draws) that pytest-xdist runs side by side:
# a process keeps memory for every model it compiled (about 80 MB a composition), so no one
# worker should train them all.
FEW, MANY = 2, int(os.environ.get("TBPTT_DIFFERENTIAL_EXAMPLES", "120"))
SHARDS = 6


@keras.saving.register_keras_serializable(package="tbptt_tests")
class GatedCell(keras.layers.Layer):
    """A custom Keras cell (a minimal gated unit) that Keras's RNN and the chain both run."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units, self.state_size, self.output_size = units, units, units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 2 * self.units), name="kernel")
        self.recurrent = self.add_weight(shape=(self.units, 2 * self.units), name="recurrent")

    def call(self, inputs, states):
        h = states[0]
        gate, candidate = tf.split(inputs @ self.kernel + h @ self.recurrent, 2, axis=-1)
        gate = tf.sigmoid(gate)
        h = gate * h + (1 - gate) * tf.tanh(candidate)
        return h, [h]

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@dataclasses.dataclass(frozen=True)
class Composition:
    dtype: str = "float64"  # float64 | float32 | mixed_float16
    inputs: str = "none"  # none | dense | embedding | dense_norm
    cells: tuple = ("gru",)  # gru | gru_before | lstm | simple | relu_gru | custom
    dropout: tuple = (0.0, 0.0)  # Keras's dropout, recurrent_dropout of the stock cells
    regularize: bool = False
    head: str = "dense"  # dense | mlp_norm
    loss: str = "mse"  # mse | huber | mae | cce | scce | scce_ignore
    reduction: str = "sum_over_batch_size"  # ... | sum | mean_with_sample_weight
    sample_weight: bool = False
    mask: bool = False
    metrics: bool = True
    optimizer: str = "sgd"  # sgd | adam
    stateful: bool = False
    steps: int = 9
    chunk_size: int = 4
    context: str = "default"  # default | jit | eager | mirrored
    via: str = "chain"  # chain: ChunkedModel(RecurrentChain(...)) | chunked: chunked(keras model)
    # None: chunk by chunk; 1e12: every call one run, as the default budget runs a call that fits
    memory_budget: float | None = None

    @property
    def classes(self) -> bool:
        return self.loss in ("cce", "scce", "scce_ignore")

    @property
    def outputs(self) -> int:
        return CLASSES if self.classes else O


@st.composite
def compositions(draw):
    dtype = draw(st.sampled_from(["float64", "float64", "float32", "mixed_float16"]))
    cells = tuple(
        draw(
            st.lists(
                st.sampled_from(["gru", "gru_before", "lstm", "simple", "relu_gru", "custom"]),
                min_size=1,
                max_size=3,
            )
        )
    )
    stock = all(c != "custom" for c in cells)
    dropout = (
        draw(st.sampled_from([(0.0, 0.0), (0.2, 0.0), (0.0, 0.3), (0.2, 0.3)]))
        if (stock and dtype != "mixed_float16")
        else (0.0, 0.0)
    )
    loss = draw(st.sampled_from(["mse", "huber", "mae", "cce", "scce", "scce_ignore"]))
    inputs = draw(st.sampled_from(["none", "dense", "embedding", "dense_norm"]))
    optimizer = draw(st.sampled_from(["sgd", "adam"]))
    reduction = draw(st.sampled_from(["sum_over_batch_size", "sum", "mean_with_sample_weight"]))
    if loss == "scce_ignore" and reduction == "mean_with_sample_weight":
        reduction = "sum_over_batch_size"  # refused by name (tests/test_losses.py)
    steps = draw(st.integers(6, 10))
    context = draw(st.sampled_from(["default", "default", "jit", "eager", "mirrored"]))
    if inputs == "embedding" and optimizer == "adam" and context == "jit":
        optimizer = "sgd"  # under XLA an Embedding's gradient is dense: refused by a warning
    stateful = draw(st.booleans()) and context != "mirrored"  # Keras's stateful RNN cannot
    if stateful and context == "jit" and dropout != (0.0, 0.0):
        context = "default"  # Keras's stateful RNN with dropout trains otherwise under XLA
    head = draw(st.sampled_from(["dense", "mlp_norm"]))
    return Composition(
        # Keras's own fit fails on a float64 model with weight regularizers (it adds float32
        # and float64 losses): no oracle there.
        dtype=dtype,
        inputs=inputs,
        cells=cells,
        dropout=dropout,
        regularize=draw(st.booleans()) and dtype != "float64",
        head=head,
        loss=loss,
        reduction=reduction,
        sample_weight=draw(st.booleans()) or reduction == "mean_with_sample_weight",
        # Keras's Sequential (an inputs layer or a head) drops a mask: no oracle there
        mask=draw(st.booleans()) and not stateful and inputs != "dense_norm" and head == "dense",
        metrics=draw(st.booleans()) and dropout == (0.0, 0.0),
        optimizer=optimizer,
        stateful=stateful,
        steps=steps,
        chunk_size=draw(st.sampled_from([steps, 3, 4, max(2, steps // 2)])),
        context=context,
        via=draw(st.sampled_from(["chain", "chunked"])),
        memory_budget=draw(st.sampled_from([None, 1e12])),
    )


# -- the layers, twice: one set for the chain, one for Keras's own model ---------------------------


def _layers(c: Composition, seed: int):
    """(inputs layer or None, cells, head): new Keras layers, the same for the same seed."""
    keras.utils.set_random_seed(seed)
    dtype = None if c.dtype == "mixed_float16" else c.dtype
    regularizer = keras.regularizers.L2(0.01) if c.regularize else None
    inputs = {
        "none": lambda: None,
        "dense": lambda: keras.layers.Dense(4, kernel_regularizer=regularizer, dtype=dtype),
        "embedding": lambda: keras.layers.Embedding(VOCABULARY, 4, mask_zero=c.mask, dtype=dtype),
        "dense_norm": lambda: keras.Sequential(
            [keras.layers.Dense(4, dtype=dtype), keras.layers.LayerNormalization(dtype=dtype)]
        ),
    }[c.inputs]()
    drop = dict(dropout=c.dropout[0], recurrent_dropout=c.dropout[1])
    reg = dict(kernel_regularizer=regularizer, recurrent_regularizer=regularizer)

    def cell(kind, index):
        seed_kw = dict(seed=100 + index, dtype=dtype)
        return {
            "gru": lambda: keras.layers.GRUCell(5, **drop, **reg, **seed_kw),
            "gru_before": lambda: keras.layers.GRUCell(4, reset_after=False, **drop, **seed_kw),
            "lstm": lambda: keras.layers.LSTMCell(4, **drop, **reg, **seed_kw),
            "simple": lambda: keras.layers.SimpleRNNCell(3, **drop, **seed_kw),
            "relu_gru": lambda: keras.layers.GRUCell(4, activation="relu", **drop, **seed_kw),
            "custom": lambda: GatedCell(4, dtype=dtype),
        }[kind]()

    cells = [cell(kind, index) for index, kind in enumerate(c.cells)]
    head_dtype = "float32" if c.dtype == "mixed_float16" else dtype
    head = {
        "dense": lambda: keras.layers.Dense(
            c.outputs, bias_regularizer=regularizer, dtype=head_dtype
        ),
        "mlp_norm": lambda: keras.Sequential(
            [
                keras.layers.Dense(6, activation="tanh", dtype=dtype),
                keras.layers.LayerNormalization(dtype=dtype),
                keras.layers.Dense(c.outputs, dtype=head_dtype),
            ]
        ),
    }[c.head]()
    return inputs, cells, head


def _loss(c: Composition, dtype):
    settings_ = dict(reduction=c.reduction, dtype=dtype)
    return {
        "mse": lambda: keras.losses.MeanSquaredError(**settings_),
        "huber": lambda: keras.losses.Huber(delta=0.3, **settings_),
        "mae": lambda: keras.losses.MeanAbsoluteError(**settings_),
        "cce": lambda: keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=0.1, **settings_
        ),
        "scce": lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True, **settings_),
        "scce_ignore": lambda: keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=0, **settings_
        ),
    }[c.loss]()


def _optimizer(c: Composition):
    inner = keras.optimizers.SGD(0.05) if c.optimizer == "sgd" else keras.optimizers.Adam(0.01)
    if c.dtype != "mixed_float16":
        return inner
    # A loss scale that overflows neither model: where float16 overflows depends on how a
    # gradient is summed (the chain sums weight gradients in float32), and one step skipped by
    # one model and not by the other parts them for good.
    return keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**6)


def _metrics(c: Composition):
    if not c.metrics:
        return None
    return ["accuracy"] if c.classes else ["mae"]


# -- data ------------------------------------------------------------------------------------------


def _data(c: Composition, windows: int):
    """x, y, sample_weight and mask for `windows` consecutive windows of B streams, stacked
    so that batch j (rows j*B ... j*B+B-1) is window j: [windows*B, T, ...]."""
    rows, steps = windows * B, c.steps
    rng = np.random.default_rng(zlib.crc32(repr(c).encode()))
    float_dtype = "float32" if c.dtype == "mixed_float16" else c.dtype
    if c.inputs == "embedding":
        x = rng.integers(1, VOCABULARY, size=[rows, steps])
    else:
        x = make_sequence(rows, steps, F, float_dtype)
    if c.loss == "cce":
        y = np.eye(CLASSES, dtype=float_dtype)[rng.integers(0, CLASSES, size=[rows, steps])]
    elif c.classes:
        y = rng.integers(0, CLASSES, size=[rows, steps])
    else:
        y = make_sequence(rows, steps, O, float_dtype, offset=0.5)
    weights = (
        rng.uniform(0.5, 2.0, size=[rows, steps]).astype(float_dtype) if (c.sample_weight) else None
    )
    mask = None
    if c.mask:  # trailing padding, as Keras's Masking and mask_zero see it
        lengths = steps - rng.integers(0, 3, size=[rows])
        mask = np.arange(steps)[None] < lengths[:, None]
        x = x * mask if c.inputs == "embedding" else x * mask[..., None]
    return x, y, weights, mask


# -- the two models --------------------------------------------------------------------------------


def _ours(c: Composition, layers):
    inputs_layer, cells, head = layers
    chain = tbptt.RecurrentChain(
        cells,
        head=head,
        inputs_layer=inputs_layer,
        chunk_size=c.chunk_size,
        memory_budget=c.memory_budget,
    )
    return tbptt.keras.ChunkedModel(chain, stateful=c.stateful)


def _keras(c: Composition, layers):
    inputs_layer, cells, head = layers
    shape = [c.steps] if c.inputs == "embedding" else [c.steps, F]
    dtype = "int64" if c.inputs == "embedding" else None
    first = (
        keras.Input(batch_shape=[B] + shape, dtype=dtype)
        if c.stateful
        else keras.Input(shape, dtype=dtype)
    )
    stack = [first]
    if c.mask and c.inputs != "embedding":
        stack.append(keras.layers.Masking(0.0))
    stack += [layer for layer in [inputs_layer] if layer is not None]
    stack += [
        keras.layers.RNN(cell, return_sequences=True, stateful=c.stateful, dtype=cell.dtype_policy)
        for cell in cells
    ]
    return keras.Sequential(stack + [head])


def _compile(c: Composition, model, loss):
    options = {"jit": dict(jit_compile=True), "eager": dict(run_eagerly=True)}.get(c.context, {})
    model.compile(optimizer=_optimizer(c), loss=loss, metrics=_metrics(c), **options)


def _given_mask(c: Composition, ours: bool) -> bool:
    """Whether our model is given the mask (a converted Keras model computes it as Keras)."""
    return ours and c.via == "chain"


def _fit(c: Composition, model, x, y, weights, mask, ours: bool):
    inputs = {"inputs": x, "mask": mask} if _given_mask(c, ours) and mask is not None else x
    return model.fit(
        inputs, y, sample_weight=weights, batch_size=B, shuffle=False, verbose=0, epochs=1
    ).history


def _tolerance(c: Composition) -> float:
    if c.dtype == "mixed_float16":
        return 3e-2
    if c.dtype == "float32":
        return 2e-3 if c.optimizer == "adam" else 2e-4
    return 1e-8


def _close(got, want, tolerance, what):
    got, want = np.asarray(got, "float64"), np.asarray(want, "float64")
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
    error = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:.1g}"


def _models(c: Composition):
    """Ours and Keras's, from the same weights and seeds, built and compiled in the context."""
    policy = keras.mixed_precision.global_policy()
    if c.dtype == "mixed_float16":
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        scope = mirrored().scope() if c.context == "mirrored" else _nothing()
        with scope:
            if c.via == "chunked":  # the same Keras model, converted
                ours = tbptt.keras.chunked(
                    _keras(c, _layers(c, 1)),
                    chunk_size=c.chunk_size,
                    memory_budget=c.memory_budget,
                )
            else:
                ours = _ours(c, _layers(c, 1))
            theirs = _keras(c, _layers(c, 1))
            ours.build([None, None] if c.inputs == "embedding" else [None, None, F])
            for mine, reference in zip(ours.trainable_variables, theirs.trainable_variables):
                assert tuple(mine.shape) == tuple(reference.shape), (mine.path, reference.path)
                mine.assign(reference)
            loss_dtype = "float64" if c.dtype == "float64" else None
            _compile(c, ours, _loss(c, None))  # as given: the chain computes in its dtype
            _compile(c, theirs, _loss(c, loss_dtype))
    finally:
        keras.mixed_precision.set_global_policy(policy)
    return ours, theirs


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def _predict(c: Composition, model, x, mask, ours: bool):
    """The predictions of one batch from a zero state (Keras's stateful layers reset)."""
    probe = x[:B]
    if ours:
        given = mask is not None and _given_mask(c, ours)
        inputs = {"inputs": probe, "mask": mask[:B]} if given else probe
        return model.predict(inputs, batch_size=B, verbose=0)
    return _reset(model).predict(probe, batch_size=B, verbose=0)


def check_composition(c: Composition, tmp_path=None, new_process: bool = False) -> None:
    """Both models fit, compared; then saved, loaded and compared again."""
    ours, theirs = _models(c)
    windows = 2
    x, y, weights, mask = _data(c, windows)
    tolerance = _tolerance(c)
    history = _fit(c, ours, x, y, weights, mask, ours=True)
    try:
        reference = _fit(c, theirs, x, y, weights, mask, ours=False)
    except (tf.errors.InvalidArgumentError, TypeError):
        # Keras's own fit fails on some compositions (a float64 model with weight
        # regularizers run eagerly adds a float32 loss to float64 penalties): no oracle.
        hypothesis.reject()
    for name in reference:
        _close(history[name], reference[name], max(tolerance, 1e-6), f"{c}: logged {name}")
    for mine, want in zip(ours.trainable_variables, theirs.trainable_variables):
        _close(mine, want, tolerance, f"{c}: weight {want.path}")
    for mine, want in zip(ours.optimizer.variables, theirs.optimizer.variables):
        _close(mine, want, tolerance, f"{c}: optimizer {want.path}")
    mine, reference = (
        _predict(c, ours, x, mask, ours=True),
        _predict(c, theirs, x, mask, ours=False),
    )
    if mask is not None and "custom" in c.cells:
        # A masked step of a cell run as itself outputs its own output (Keras's RNN repeats
        # the last one; the stock cells' runners do too): documented, compared where real.
        mine, reference = (np.where(mask[:B, :, None], v, 0.0) for v in (mine, reference))
    _close(mine, reference, tolerance, f"{c}: predictions")
    if tmp_path is not None:
        _check_reloaded(c, ours, theirs, (x, y, weights, mask), tmp_path, new_process)


def _slots(optimizer) -> list:
    """The optimizer's state that matters: a LossScaleOptimizer's inner optimizer's (Keras
    does not round-trip the wrapper's own unused learning rate)."""
    inner = getattr(optimizer, "inner_optimizer", None)
    return list((inner or optimizer).variables)


def _check_reloaded(c, ours, theirs, data, tmp_path, new_process: bool) -> None:
    """Saved and loaded, our model predicts as before and keeps its optimizer's state; its next
    step is the step the same Keras model takes after Keras saved and loaded it (Keras's
    oracle: what Keras's own saving drops, such as a `Huber` loss's `delta`, both drop)."""
    x, y, weights, mask = data
    path = str(tmp_path / "ours.keras")
    ours.save(path)
    theirs.save(tmp_path / "theirs.keras")
    if new_process:
        np.savez(tmp_path / "data.npz", **_present(x=x, y=y, weights=weights, mask=mask))
        code = (
            "import sys, numpy as np, keras, tbptt\n"
            "import test_differential  # the custom cell's registration\n"
            "model = keras.models.load_model(sys.argv[1])\n"
            "data = dict(np.load(sys.argv[2]))\n"
            "x = {'inputs': data['x'], 'mask': data['mask']} if 'mask' in data else data['x']\n"
            "model.fit(x, data['y'], sample_weight=data.get('weights'), batch_size=4,\n"
            "          shuffle=False, verbose=0)\n"
            "np.save(sys.argv[3], np.concatenate([v.numpy().ravel().astype('float64') "
            "for v in model.trainable_variables]))\n"
        )
        run_python(
            f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n" + code,
            path,
            tmp_path / "data.npz",
            tmp_path / "w.npy",
        )
        stepped = np.load(tmp_path / "w.npy")
    else:
        loaded = keras.models.load_model(path)
        _close(
            _predict(c, loaded, x, mask, ours=True),
            _predict(c, ours, x, mask, ours=True),
            1e-12,
            f"{c}: reloaded predictions",
        )
        for mine, again in zip(_slots(ours.optimizer), _slots(loaded.optimizer)):
            _close(again, mine, 0.0, f"{c}: reloaded {mine.path}")
        if c.dropout != (0.0, 0.0) or c.context == "mirrored":
            # Keras saves no seed generator's state: a loaded model draws other masks; and a
            # model loaded outside the strategy sums its gradient over other replicas.
            return
        _fit(c, loaded, x, y, weights, mask, ours=True)
        stepped = np.concatenate([_flat(v) for v in loaded.trainable_variables])
    reference = keras.models.load_model(tmp_path / "theirs.keras")
    _fit(c, _reset(reference), x, y, weights, mask, ours=False)
    expected = np.concatenate([_flat(v) for v in reference.trainable_variables])
    what = "new process" if new_process else "reloaded"
    _close(stepped, expected, _tolerance(c), f"{c}: {what}, one more step as Keras's reloaded")


def _present(**arrays) -> dict:
    return {name: value for name, value in arrays.items() if value is not None}


def _flat(variable) -> np.ndarray:
    return np.asarray(variable, "float64").ravel()


def _reset(model):
    """A Keras model whose stateful layers start from zeros (ours resets at an epoch's start)."""
    for layer in model.layers:
        if getattr(layer, "stateful", False):
            layer.reset_states()
    return model


# -- the drawn compositions ------------------------------------------------------------------------

# No shrinking: each example trains two models; the failing composition is printed whole.
_SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@settings(max_examples=FEW, **_SETTINGS)
@given(compositions())
def test_drawn_compositions_train_as_keras_trains_them(composition):
    check_composition(composition)


@pytest.mark.slow
@pytest.mark.parametrize("shard", range(SHARDS))  # each case draws its own compositions
@pytest.mark.default_cases(every=True)  # all of them slow
@settings(max_examples=-(-MANY // SHARDS), **_SETTINGS)  # each shard starts from the simplest
@given(composition=compositions())
def test_many_drawn_compositions_train_as_keras_trains_them(shard, composition):
    check_composition(composition)


@pytest.mark.slow
@settings(max_examples=max(4, MANY // 10), **_SETTINGS)
@given(composition=compositions())
def test_drawn_compositions_save_and_load_as_they_trained(composition, tmp_path_factory):
    check_composition(composition, tmp_path_factory.mktemp("saved"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "composition",
    [
        Composition(inputs="embedding", cells=("lstm", "custom"), loss="scce", optimizer="adam"),
        Composition(
            dtype="float32",
            inputs="dense",
            cells=("gru", "simple"),
            head="mlp_norm",
            loss="huber",
            optimizer="adam",
            regularize=True,
            stateful=True,
        ),
        Composition(inputs="dense", cells=("gru", "lstm"), mask=True, via="chunked"),
    ],
)
@pytest.mark.default_cases("composition0")
def test_saved_compositions_load_and_train_on_in_a_new_process(composition, tmp_path):
    assert composition.dropout == (0.0, 0.0)  # a loaded model draws other masks
    check_composition(composition, tmp_path, new_process=True)


# -- what the drawn compositions found, kept as regular tests -------------------------------------


def test_found_a_mixed_precision_model_with_a_float32_head_reloads_in_a_float32_process(tmp_path):
    """Keras's advice under mixed precision, a float32 output layer: the saved model loads
    where the global policy is float32 (the loaded head, built in float32, was refused)."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _ours(
            Composition(dtype="mixed_float16"), _layers(Composition(dtype="mixed_float16"), 1)
        )
        model.compile(optimizer="sgd", loss="mse")
        x = make_sequence(B, 6, F)
        model.fit(x, make_sequence(B, 6, O, offset=0.5), verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.chain.dtype == tf.float16 and loaded.chain.head.compute_dtype == "float32"
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-3, atol=1e-3
    )


@pytest.mark.slow
def test_found_a_float64_model_with_a_sequential_head_reloads(tmp_path):
    """A Sequential head of float64 layers: the chain makes the container cast its inputs to
    float64; Keras does not save a Sequential's dtype, and the loaded (built) container was
    refused."""
    c = Composition(inputs="dense_norm", head="mlp_norm", metrics=False)
    check_composition(c, tmp_path)

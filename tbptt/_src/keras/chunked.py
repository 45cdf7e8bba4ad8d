"""`chunked(model)`: a user's Keras model as a `ChunkedModel` that shares its weights.

```
model = keras.Sequential([keras.Input((None, F)), GRU(64, return_sequences=True),
                          GRU(32, return_sequences=True), Dense(3)])
chunky = tbptt.keras.chunked(model, chunk_size=50)      # the same layers, the same weights
chunky.compile(optimizer="adam", loss="mse")
chunky.fit(x, y)                                         # trains `model` too
```

The model is read as [per-step layers] -> recurrent layers -> [per-step layers]: the layers in
front become the chain's inputs layer, the recurrent layers' cells its cells (a
`StackedRNNCells` is unstacked) and the layers behind its head, each the very layer object of
the model. A front layer's Keras mask (`Masking`, `Embedding(mask_zero=True)`) is the chain's
mask (`RecurrentChain.compute_mask`). What cannot be cut along time is refused by name.
"""

import keras
import tensorflow as tf

from tbptt._src.core import serialization
from tbptt._src.keras.model import ChunkedModel
from tbptt._src.recurrent.chain import RecurrentChain

# Per-step layers that mix time steps: a chunk would see only its own steps.
TIME_MIXING = (
    "Conv1D",
    "Conv1DTranspose",
    "SeparableConv1D",
    "DepthwiseConv1D",
    "MaxPooling1D",
    "AveragePooling1D",
    "GlobalAveragePooling1D",
    "GlobalMaxPooling1D",
    "Cropping1D",
    "ZeroPadding1D",
    "UpSampling1D",
    "Flatten",
    "Reshape",
    "Permute",
    "Attention",
    "AdditiveAttention",
    "MultiHeadAttention",
    "GroupedQueryAttention",
)
# Layers whose one random draw covers every step of a sequence: a chunk would draw its own.
ONE_DRAW_PER_SEQUENCE = ("SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D")
MANY_TO_ONE = (
    "the chain trains on a loss at every step: keep return_sequences=True, give each "
    "sequence's target at its last step and weigh the other steps 0 with "
    "sample_weight=tbptt.data.last_step_weights(lengths, T) (and a loss with "
    'reduction="mean_with_sample_weight")'
)


def chunked(
    model,
    *,
    chunk_size,
    mode: str = "exact",
    backprop_chunks: int = 1,
    stateful: bool | None = None,
    **options,
) -> ChunkedModel:
    """`model` as a `ChunkedModel` that trains it with chunked gradients, sharing its weights.

    Args:
      model: a Keras 3 `Sequential` or functional model with one sequence input ``[B, T, ...]``
        and one output, of the form [per-step layers] -> recurrent layers (`GRU`, `LSTM`,
        `SimpleRNN`, `RNN(cell)`, `RNN(StackedRNNCells(...))`, all `return_sequences=True`)
        -> [per-step layers] (`Dense`, `TimeDistributed`, `LayerNormalization`, `Dropout`,
        ...). Built or not, trained or not.
      chunk_size, mode, backprop_chunks, **options: the chain's (see `RecurrentChain`).
      stateful: consecutive batches continue the same streams (see `ChunkedModel`); None
        follows the recurrent layers' own `stateful`.

    Returns:
      An uncompiled `ChunkedModel` over the model's own layer objects: training either trains
      both. Compile it as you would the model.

    Raises:
      ValueError: for what cannot be chunked, by name: `Bidirectional`, a layer that mixes
        time steps, `return_sequences=False`, `go_backwards`, `return_state`, layers between
        recurrent layers, recurrent layers that disagree on `stateful`, a subclassed model.
    """
    layers = _layers_in_order(model)
    front, recurrent, back = _split(layers)
    if stateful is None:
        stateful = _stateful(recurrent)
    chain = RecurrentChain(
        [cell for layer in recurrent for cell in _cells_of(layer)],
        chunk_size=chunk_size,
        mode=mode,
        backprop_chunks=backprop_chunks,
        head=_joined(back, f"{model.name}_head"),
        inputs_layer=_joined(front, f"{model.name}_inputs"),
        **options,
    )
    converted = ChunkedModel(chain, stateful=stateful, name=f"chunked_{model.name}")
    if model.built and model.inputs:
        converted.build([None, None] + list(model.inputs[0].shape[2:]))
    return converted


def _layers_in_order(model) -> list:
    """The model's layers from input to output (nested Sequentials opened), or refused."""
    if isinstance(model, keras.Sequential):
        layers = list(model.layers)
    elif _is_functional(model):
        layers = _functional_chain(model)
    else:
        raise ValueError(
            f"chunked(model) takes a keras.Sequential or a functional keras.Model, got "
            f"{type(model).__name__} (a subclassed model's call() is Python that cannot be "
            "cut into chunks): build tbptt.RecurrentChain(cells, head=..., inputs_layer=...) "
            "from its layers, then tbptt.keras.ChunkedModel(chain)."
        )
    opened = []
    for layer in layers:
        opened += _layers_in_order(layer) if isinstance(layer, keras.Sequential) else [layer]
    return opened


def _is_functional(model) -> bool:
    return isinstance(model, keras.Model) and hasattr(model, "inputs") and model.inputs is not None


def _functional_chain(model) -> list:
    """A functional model's layers, if each takes the one before's output and nothing else."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"chunked(model) takes a model with one sequence input and one output, got "
            f"{len(model.inputs)} inputs and {len(model.outputs)} outputs."
        )
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    previous = model.inputs[0]
    for layer in layers:
        try:
            follows = layer.input is previous
        except (AttributeError, ValueError):  # a layer called more than once
            follows = False
        if not follows:
            raise ValueError(
                f"chunked(model) takes a chain of layers, each applied once to the one "
                f"before's output; {layer.name!r} ({type(layer).__name__}) is not (a "
                "branch, a skip connection or a shared layer): build tbptt.RecurrentChain("
                "cells, head=..., inputs_layer=...) from the model's layers instead."
            )
        previous = layer.output
    if previous is not model.outputs[0]:
        raise ValueError("chunked(model): the model's output is not its last layer's output.")
    return layers


def _split(layers: list) -> tuple:
    """(front layers, recurrent layers, back layers), each layer checked."""
    positions = [i for i, layer in enumerate(layers) if _is_recurrent(layer)]
    for layer in layers:
        _check_layer(layer)
    if not positions:
        raise ValueError(
            "chunked(model) found no recurrent layer (GRU, LSTM, SimpleRNN or RNN(cell)) "
            f"among {[type(layer).__name__ for layer in layers]}."
        )
    first, last = positions[0], positions[-1]
    between = [layer for layer in layers[first : last + 1] if not _is_recurrent(layer)]
    if between:
        raise ValueError(
            f"chunked(model): {[layer.name for layer in between]} sit between recurrent "
            "layers; the chain stacks cells directly. Build a cell that runs the layer on its "
            "output (a keras.layers.Layer with state_size and call(inputs, states)) and pass "
            "the cells to tbptt.RecurrentChain; for dropout, the next recurrent layer's "
            "dropout= (one mask per sequence, not per step) is the nearest Keras has."
        )
    return layers[:first], layers[first : last + 1], layers[last + 1 :]


def _is_recurrent(layer) -> bool:
    return isinstance(layer, keras.layers.RNN)


def _check_layer(layer) -> None:
    name = type(layer).__name__
    if isinstance(layer, keras.layers.Bidirectional):
        raise ValueError(
            f"chunked(model) cannot chunk {layer.name!r} (Bidirectional): its backward "
            "half runs from the sequence's end, so a chunk's outputs need the chunks after "
            "it and no state carried from the chunks before can give them. Chunk a "
            "forward-only model, or train this one on whole sequences with Keras."
        )
    if name.startswith("ConvLSTM"):
        raise ValueError(
            f"chunked(model) cannot chunk {layer.name!r} ({name}): its state is a feature map, "
            "and the chain's cells step on [batch, features]. Flatten each frame in front "
            "(TimeDistributed(...)) and use GRU or LSTM layers."
        )
    if _one_draw_per_sequence(layer):
        raise ValueError(
            f"chunked(model) cannot chunk {layer.name!r} ({name}): it draws one dropout mask "
            "for every step of a sequence, and each chunk would draw its own. Use Dropout "
            "(a mask per step), or the recurrent layers' dropout= (one mask per sequence)."
        )
    if getattr(layer, "activity_regularizer", None) is not None:
        raise ValueError(
            f"chunked(model) cannot chunk {layer.name!r} with an activity_regularizer: its "
            "penalty is added while the layer runs, once per chunk inside the compiled chunk "
            "loop, where fit cannot collect it. Regularize its weights instead "
            "(kernel_regularizer=...)."
        )
    if any(name == kind or _is_a(layer, kind) for kind in TIME_MIXING):
        raise ValueError(
            f"chunked(model) cannot chunk {layer.name!r} ({name}): it mixes time steps, and "
            f"a chunk sees only its own. Per-step layers only in front of and behind the "
            f"recurrent layers; for a many-to-one model, {MANY_TO_ONE}."
        )
    if not _is_recurrent(layer):
        return
    for flag, why in [
        ("go_backwards", "it runs the sequence from its end"),
        ("return_state", "the chain returns its final state itself"),
    ]:
        if getattr(layer, flag, False):
            raise ValueError(f"chunked(model) cannot chunk {layer.name!r} with {flag}=True: {why}.")
    if not layer.return_sequences:
        raise ValueError(
            f"chunked(model) cannot chunk {layer.name!r} with return_sequences=False: "
            f"{MANY_TO_ONE}."
        )


def _is_a(layer, kind: str) -> bool:
    """Whether `layer` is an instance of Keras's layer class `kind` (or of a subclass)."""
    cls = getattr(keras.layers, kind, None)
    return cls is not None and isinstance(layer, cls)


def _one_draw_per_sequence(layer) -> bool:
    if any(_is_a(layer, kind) for kind in ONE_DRAW_PER_SEQUENCE):
        return True
    shape = getattr(layer, "noise_shape", None) if _is_a(layer, "Dropout") else None
    return shape is not None and len(shape) > 1 and shape[1] == 1  # one mask over time


def _stateful(recurrent: list) -> bool:
    kinds = {bool(layer.stateful) for layer in recurrent}
    if len(kinds) > 1:
        raise ValueError(
            "chunked(model): the recurrent layers disagree on stateful "
            f"({ {layer.name: layer.stateful for layer in recurrent} }); pass stateful= "
            "to say which."
        )
    return kinds.pop()


def _cells_of(layer) -> list:
    """The cells of a recurrent layer (a `StackedRNNCells` unstacked)."""
    cell = layer.cell
    if isinstance(cell, keras.layers.StackedRNNCells):
        return list(cell.cells)
    return [cell]


# Layers that act on the last axis alone: TimeDistributed(layer) is the layer itself.
ON_THE_LAST_AXIS = (
    keras.layers.Dense,
    keras.layers.Activation,
    keras.layers.Dropout,
    keras.layers.ReLU,
    keras.layers.Softmax,
)


@serialization.register
class PerStep(keras.layers.Wrapper):
    """`TimeDistributed` for any number of steps: the wrapped layer on each step's ``[B, ...]``
    (run as one ``[B * T, ...]`` batch), for inputs ``[B, T, ...]`` whose T is unknown when
    traced (Keras's `TimeDistributed` then maps over the batch axis instead)."""

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build((None,) + tuple(input_shape[2:]))
        self.built = True

    def call(self, inputs, training=None):
        shape = tf.shape(inputs)
        steps = tf.reshape(inputs, tf.concat([[-1], shape[2:]], 0))
        outputs = self.layer(steps, training=training)
        return tf.reshape(outputs, tf.concat([shape[:2], tf.shape(outputs)[1:]], 0))

    def compute_output_shape(self, input_shape):
        inner = self.layer.compute_output_shape((None,) + tuple(input_shape[2:]))
        return tuple(input_shape[:2]) + tuple(inner[1:])


def _per_step(layer):
    """A front or back layer as the chain runs it: `TimeDistributed` unwrapped."""
    if not isinstance(layer, keras.layers.TimeDistributed):
        return layer
    inner = layer.layer
    axis = getattr(inner, "axis", -1)
    on_the_last_axis = axis in (-1, [-1]) and (
        isinstance(inner, ON_THE_LAST_AXIS) or isinstance(inner, keras.layers.LayerNormalization)
    )
    return inner if on_the_last_axis else PerStep(inner)


def _joined(layers: list, name: str):
    """One layer, a Sequential of several, or None (`TimeDistributed` unwrapped)."""
    if not layers:
        return None
    layers = [_per_step(layer) for layer in layers]
    if len(layers) == 1:
        return layers[0]
    return keras.Sequential(layers, name=name)

"""Keras serialization of chains: `get_config`/`from_config`, so that a chain (and a
`ChunkedModel` holding one) saves as a whole (`model.save("m.keras")`, `load_model`).

A chain's config is its constructor's keywords: the options as given, a name, and its layers
(cells or units, the head, the inputs layer; a StageChain's stages) as Keras serializes them.
Weights are not in it: Keras saves them from the layers a model tracks.
"""

import tensorflow as tf

from tbptt._src.core import compat

keras = compat.keras


def register(cls):
    """Registers `cls` with Keras under the package "tbptt", so `load_model` finds it."""
    register_with_keras = getattr(
        getattr(keras, "saving", None), "register_keras_serializable", None
    )
    if register_with_keras is None:  # pragma: no cover - Keras 2 before 2.13
        return cls
    return register_with_keras(package="tbptt")(cls)


def chain_config(arguments: dict) -> dict:
    """A chain's config from its constructor's keywords as given: layers serialized; a chain
    made from `units` is saved without its cells, which its constructor makes."""
    config = dict(arguments)
    if "units" in config:
        del config["cells"]
    if config.get("dtype") is not None:
        config["dtype"] = tf.as_dtype(config["dtype"]).name
    for key in ("cells", "head", "inputs_layer", "units"):
        if key in config:
            config[key] = _serialize(key, config[key])
    return config


def chain_arguments(config: dict) -> dict:
    """The constructor's keywords of a chain's config (see `chain_config`)."""
    config = dict(config)
    for key in ("cells", "head", "inputs_layer"):
        if key in config:
            config[key] = _deserialize(config[key])
    return config


def stages_config(stages: list, options: dict, name: str) -> dict:
    """A `StageChain`'s config when its stages are Keras layers: the architecture and
    options, not the weights (`tf.train.Checkpoint(chain=chain)` holds those)."""
    serialized = []
    for index, stage in enumerate(stages):
        if not compat.is_keras_layer(stage):
            raise TypeError(
                f"only a StageChain whose stages are Keras layers has a config; "
                f"stages[{index}] is {stage!r}. Rebuild the chain in code and restore its "
                f"weights with tf.train.Checkpoint(chain=chain)."
            )
        serialized.append(keras.saving.serialize_keras_object(stage))
    return dict(options, stages=serialized, name=name)


def stages_arguments(config: dict) -> dict:
    """The constructor's keywords of a `StageChain`'s config."""
    return dict(config, stages=_deserialize(config["stages"]))


def _serialize(key: str, value):
    if isinstance(value, (list, tuple)) and key == "cells":
        return [_serialize("cell", cell) for cell in value]
    if key == "units" or value is None:
        return list(value) if isinstance(value, tuple) else value
    if not compat.is_keras_layer(value):
        if key in ("head", "inputs_layer"):
            raise TypeError(
                f"only a chain whose {key} is a Keras layer (or None) can be saved as a whole; "
                f"this {key} is {value!r}. Save the weights instead (model.save_weights(...), or "
                f"tf.train.Checkpoint), or make the head a Keras layer."
            )
        raise TypeError(f"only Keras cells can be saved as a whole; this {key} is {value!r}.")
    return keras.saving.serialize_keras_object(value)


def _deserialize(value):
    if isinstance(value, list):
        return [_deserialize(item) for item in value]
    return None if value is None else keras.saving.deserialize_keras_object(value)

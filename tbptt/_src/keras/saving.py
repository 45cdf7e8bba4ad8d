"""Whole-model saving for `tbptt.keras.ChunkedModel`: its config (the chain's and
`stateful`), its build config, and loading weights into a model not built yet.
"""

import json
import re
import zipfile

import keras


class SavableModel(keras.Model):
    """Whole-model saving for `tbptt.keras.ChunkedModel`: its config is its chain's config and
    `stateful`; its build config is the chain's feature size, so a loaded model is built (and
    its optimizer restored) before Keras reads the weights into it."""

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "stateful": self.stateful,
            "chain": keras.saving.serialize_keras_object(self.chain),
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        return cls(keras.saving.deserialize_keras_object(config.pop("chain")), **config)

    def load_weights(self, filepath, *args, **kwargs):
        """`keras.Model.load_weights`; a model not built yet is first built for the inputs the
        file's weights were made for, and a compiled one's optimizer too (so that its state,
        saved with the weights, is restored)."""
        if not self.built:
            self.build(saved_input_shape(str(filepath), self.chain, self.chain_layers))
        if getattr(self, "optimizer", None) is not None and not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        return super().load_weights(filepath, *args, **kwargs)

    def get_build_config(self):
        return {"input_shape": self.chain.input_shape} if self.chain.built else None

    def build_from_config(self, config) -> None:
        if config:
            self.build(config["input_shape"])

    def compile_from_config(self, config) -> None:
        """Compiles as the saved model was, and builds the optimizer so that its variables
        (moments, iterations) are restored too."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)


def saved_input_shape(path: str, chain, saved_layers: list) -> list:
    """The inputs' shape a saved `ChunkedModel` was built for: its build config in a ".keras"
    file; in a ".weights.h5" file, read off the weights of the layer that takes the inputs
    (`saved_layers` is the model's list of the chain's layers, as Keras stored it): token ids
    [B, T] for an Embedding inputs layer, else [B, T, F] with F the rows of the first input
    kernel (the inputs layer's or the first cell's)."""
    if path.endswith(".keras") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            build = json.loads(archive.read("config.json")).get("build_config") or {}
        if build.get("input_shape"):
            return build["input_shape"]
    first = chain.cells[0] if chain.inputs_layer is None else chain.inputs_layer
    if hasattr(first, "input_dim"):  # an Embedding: token ids
        return [None, None]
    return [None, None, saved_features(path, first, saved_layers)]


def saved_features(path: str, first, saved_layers: list) -> int:
    """The rows of `first`'s input kernel in a ".weights.h5" file (see `saved_input_shape`;
    Keras stores a list's layers by class name, the first of a class without a suffix)."""
    features = None
    if path.endswith(".h5") and any(layer is first for layer in saved_layers):
        import h5py  # a Keras 3 dependency

        name = _snake_case(type(first).__name__)
        before = sum(
            1
            for layer in saved_layers[: [id(v) for v in saved_layers].index(id(first))]
            if _snake_case(type(layer).__name__) == name
        )
        with h5py.File(path, "r") as weights:
            kernel = weights.get(f"chain_layers/{name}{f'_{before}' if before else ''}/vars/0")
            features = kernel.shape[0] if kernel is not None and len(kernel.shape) == 2 else None
    if not features:
        raise ValueError(
            f"cannot tell from {path!r} which inputs the weights are for. Build "
            "the model before loading: model.build([None, None, F]) (or model("
            "x) on one batch)."
        )
    return int(features)


def _snake_case(name: str) -> str:
    """Keras's own naming of a layer in a weights file: GRUCell -> gru_cell."""
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", re.sub(r"\W+", "", name))
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()

"""Keras integration: `ChunkedModel`, a `keras.Model` trained with the chain's chunked gradient."""

from tbptt._src.keras.model import ChunkedModel
from tbptt._src.keras.stream import StreamPosition

__all__ = ["ChunkedModel", "StreamPosition"]

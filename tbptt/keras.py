"""Keras integration: `ChunkedModel`, a `keras.Model` trained with the chain's chunked gradient,
and `chunked(model)`, a user's Keras model as one."""

from tbptt._src.keras.chunked import chunked
from tbptt._src.keras.model import ChunkedModel
from tbptt._src.keras.stream import StreamPosition

__all__ = ["ChunkedModel", "StreamPosition", "chunked"]

"""Chunked back-propagation for TF1-style graphs (placeholders, dynamic_rnn, Session)."""

from tbptt._src.tf1 import BackpropChunksResult, backprop_chunks, gru_weights_from_tf1

__all__ = [
    "BackpropChunksResult",
    "backprop_chunks",
    "gru_weights_from_tf1",
]

"""Cells used across the tests: Keras cells, a custom Keras cell and a plain tf.Module cell."""

import keras
import numpy as np
import tensorflow as tf

CELL_KINDS = ("gru", "lstm", "stacked", "custom", "module")


class TwoStateCell(keras.layers.Layer):
    """A custom Keras cell with two state tensors of different widths."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = [units, 2]

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.recurrent = self.add_weight(shape=(self.units, self.units), name="recurrent")
        self.memory = self.add_weight(shape=(2, self.units), name="memory")

    def call(self, inputs, states):
        h, c = states
        h_new = tf.tanh(inputs @ self.kernel + h @ self.recurrent + c @ self.memory)
        c_new = 0.9 * c + 0.1 * tf.tanh(h_new[:, :2])
        return h_new, [h_new, c_new]


class ModuleCell(tf.Module):
    """A cell that is no Keras layer at all: state_size and __call__(inputs, states)."""

    def __init__(self, features, units, dtype="float32"):
        super().__init__()
        rng = np.random.RandomState(7)
        self.state_size = units
        self.w = tf.Variable(rng.randn(features, units).astype(dtype) * 0.5)
        self.u = tf.Variable(rng.randn(units, units).astype(dtype) * 0.3)

    def __call__(self, inputs, states):
        h = tf.tanh(inputs @ self.w + states[0] @ self.u)
        return h, [h]


def make_cells(kind, features, dtype="float32"):
    return {
        "gru": lambda: [keras.layers.GRUCell(5, dtype=dtype)],
        "lstm": lambda: [keras.layers.LSTMCell(4, dtype=dtype)],
        "stacked": lambda: [
            keras.layers.GRUCell(5, dtype=dtype),
            keras.layers.LSTMCell(3, dtype=dtype),
        ],
        "custom": lambda: [TwoStateCell(4, dtype=dtype)],
        "module": lambda: [ModuleCell(features, 4, dtype=dtype)],
        "simple": lambda: [keras.layers.SimpleRNNCell(4, dtype=dtype)],
    }[kind]()

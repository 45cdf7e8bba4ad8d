"""Sequences read chunk by chunk from outside memory: callables, NumPy memmaps, h5py/zarr arrays.

The exact backward pass reads the chunks again in reverse order, so a source must give any
chunk `[start, stop)` on demand; a one-pass iterator cannot.
"""

import collections.abc
import contextlib
import itertools
import numbers
import threading
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

ONE_PASS_MSG = ("{name} is a one-pass iterator ({type}): the backward pass reads chunks again, "
                "in reverse order, so it needs random access. Pass an array-like (np.memmap, an "
                "h5py or zarr array) or tbptt.ChunkSource(fetch, shape) with fetch(start, stop) "
                "-> the steps [start, stop).")
SHAPE_MSG = "{name}: a chunk source must have shape [batch, time, ...] with time > 0, got {shape}."
FETCH_MSG = ("{name}: fetch({start}, {stop}) must return shape {expected}, got {got}.")


class ChunkSource:
    """A sequence that lives outside memory, read one chunk of time steps at a time.

    Example:

    >>> import numpy as np
    >>> data = np.arange(24.0).reshape(2, 4, 3)
    >>> source = ChunkSource(lambda start, stop: data[:, start:stop], shape=(2, 4, 3))
    >>> source.read(1, 3).shape
    (2, 2, 3)
    """

    def __init__(self, fetch: Callable[[int, int], np.ndarray], shape: Sequence[int],
                 dtype="float32", name: str = "source"):
        """Args:
          fetch: `fetch(start, stop) -> array [B, stop - start, ...]`, any chunk, any order.
          shape: the whole sequence's shape ``[B, T, ...]``.
          dtype: dtype of the arrays `fetch` returns.
          name: used in error messages.
        """
        self.fetch = fetch
        if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in shape):
            raise TypeError(f"{name}: shape must be whole numbers [batch, time, ...], got "
                            f"{tuple(shape)!r}.")
        self.shape = tuple(int(d) for d in shape)
        self.dtype = tf.as_dtype(dtype)
        self.name = name
        if len(self.shape) < 2 or self.shape[1] < 1:
            raise ValueError(SHAPE_MSG.format(name=name, shape=self.shape))

    def read(self, start: int, stop: int) -> np.ndarray:
        chunk = self.fetch(int(start), int(stop))
        try:
            chunk = np.asarray(chunk, dtype=self.dtype.as_numpy_dtype)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{self.name}: fetch({start}, {stop}) must return numbers "
                            f"convertible to {self.dtype.name}, got {type(chunk).__name__}: "
                            f"{error}") from None
        expected = (self.shape[0], int(stop) - int(start)) + self.shape[2:]
        if chunk.shape != expected:
            raise ValueError(FETCH_MSG.format(name=self.name, start=start, stop=stop,
                                              expected=expected, got=chunk.shape))
        return chunk


def as_source(name: str, value):
    """`value` as a ChunkSource if it is one or an out-of-memory array; None for in-memory data.

    Raises:
      TypeError: for one-pass iterators and generators.
    """
    if isinstance(value, ChunkSource):
        return value
    if isinstance(value, (tf.Tensor, tf.Variable, tf.RaggedTensor, tf.SparseTensor)) or (
            isinstance(value, np.ndarray) and not isinstance(value, np.memmap)):
        return None
    if isinstance(value, collections.abc.Iterator):
        raise TypeError(ONE_PASS_MSG.format(name=name, type=type(value).__name__))
    if hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__getitem__"):
        return ChunkSource(lambda start, stop: value[:, start:stop], value.shape,
                           np.dtype(value.dtype).name, name=name)
    return None


# The sources of the calls running now, by handle. A compiled function receives a source's
# handle as a value and looks it up when the graph reads a window: nothing about one call is
# stored on a chain, so concurrent calls with their own sources cannot see each other's.
_LIVE = {}
_ERRORS = {}  # handle -> the exception a fetch raised, re-raised to the caller as it was
_LIVE_LOCK = threading.Lock()
_HANDLES = itertools.count(1)


@contextlib.contextmanager
def live(sources: dict):
    """Registers `sources` ({name: ChunkSource}) for one call; yields {name: handle tensor}."""
    with _LIVE_LOCK:
        handles = {name: next(_HANDLES) for name in sources}
        _LIVE.update({handles[name]: source for name, source in sources.items()})
    try:
        yield {name: tf.constant(handle, tf.int64) for name, handle in handles.items()}
    except tf.errors.OpError as error:
        raised = [_ERRORS[h] for h in handles.values() if h in _ERRORS]
        if raised:  # the source's own exception, not TensorFlow's wrapper of it
            raise raised[0] from error
        raise
    finally:
        with _LIVE_LOCK:
            for handle in handles.values():
                _LIVE.pop(handle, None)
                _ERRORS.pop(handle, None)


def read_window(handle: tf.Tensor, start, stop, spec: tf.TensorSpec) -> tf.Tensor:
    """The window [start, stop) of the live source `handle`, when the graph runs."""
    def read(handle, start, stop):
        try:
            return _LIVE[int(handle)].read(start, stop).astype(spec.dtype.as_numpy_dtype)
        except Exception as error:
            _ERRORS[int(handle)] = error
            raise

    chunk = tf.numpy_function(read, [handle, start, stop], spec.dtype, stateful=False)
    chunk.set_shape(spec.shape)
    return chunk

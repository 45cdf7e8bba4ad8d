"""Sequences read chunk by chunk from outside memory: callables, NumPy memmaps, h5py/zarr arrays.

The exact backward pass reads the chunks again in reverse order, so a source must give any
chunk `[start, stop)` on demand; a one-pass iterator cannot.
"""

import collections
import collections.abc
import contextlib
import hashlib
import itertools
import numbers
import threading
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf


class ChunkSource:
    """A sequence that lives outside memory, read one chunk of time steps at a time.

    Example:

    >>> import numpy as np
    >>> data = np.arange(24.0).reshape(2, 4, 3)
    >>> source = ChunkSource(lambda start, stop: data[:, start:stop], shape=(2, 4, 3))
    >>> source.read(1, 3).shape
    (2, 2, 3)
    """

    def __init__(
        self,
        fetch: Callable[[int, int], np.ndarray],
        shape: Sequence[int],
        dtype="float32",
        name: str = "source",
    ):
        """Args:
        fetch: `fetch(start, stop) -> array [B, stop - start, ...]`, any chunk, any order.
        shape: the whole sequence's shape ``[B, T, ...]``.
        dtype: dtype of the arrays `fetch` returns.
        name: used in error messages.
        """
        self.fetch = fetch
        if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in shape):
            raise TypeError(
                f"{name}: shape must be whole numbers [batch, time, ...], got {tuple(shape)!r}."
            )
        self.shape = tuple(int(d) for d in shape)
        self.dtype = tf.as_dtype(dtype)
        self.name = name
        if len(self.shape) < 2 or self.shape[1] < 1:
            raise ValueError(
                f"{name}: a chunk source must have shape [batch, time, ...] with time "
                f"> 0, got {self.shape}."
            )

    def read(self, start: int, stop: int) -> np.ndarray:
        chunk = self.fetch(int(start), int(stop))
        try:
            chunk = np.asarray(chunk, dtype=self.dtype.as_numpy_dtype)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{self.name}: fetch({start}, {stop}) must return numbers "
                f"convertible to {self.dtype.name}, got {type(chunk).__name__}: "
                f"{error}"
            ) from None
        expected = (self.shape[0], int(stop) - int(start)) + self.shape[2:]
        if chunk.shape != expected:
            raise ValueError(
                f"{self.name}: fetch({start}, {stop}) must return shape {expected}, "
                f"got {chunk.shape}."
            )
        return chunk


def as_source(name: str, value):
    """`value` as a ChunkSource if it is one or an out-of-memory array; None for in-memory data.

    Raises:
      TypeError: for one-pass iterators and generators.
    """
    if isinstance(value, ChunkSource):
        return value
    if isinstance(value, (tf.Tensor, tf.Variable, tf.RaggedTensor, tf.SparseTensor)) or (
        isinstance(value, np.ndarray) and not isinstance(value, np.memmap)
    ):
        return None
    if isinstance(value, collections.abc.Iterator):
        raise TypeError(
            f"{name} is a one-pass iterator ({type(value).__name__}): the backward "
            "pass reads chunks again, in reverse order, so it needs random access. "
            "Pass an array-like (np.memmap, an h5py or zarr array) or "
            "tbptt.ChunkSource(fetch, shape) with fetch(start, stop) -> the steps "
            "[start, stop)."
        )
    if hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__getitem__"):
        return ChunkSource(
            lambda start, stop: value[:, start:stop],
            value.shape,
            np.dtype(value.dtype).name,
            name=name,
        )
    return None


# The sources of the calls running now, by handle. A compiled function receives a source's
# handle as a value and looks it up when the graph reads a window: nothing about one call is
# stored on a chain, so concurrent calls with their own sources cannot see each other's. A
# registration lives while a call holds it, or, for a call made while a graph is built (inside
# a user's tf.function, or a TF1 graph), while that graph does: the graph runs later, and maybe
# many times.
_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
# graph -> the registrations its runs read
_HELD_BY_GRAPH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LIVE_LOCK = threading.Lock()
_HANDLES = itertools.count(1)
_RUNS = itertools.count(1)
# The runs of one graph whose chunk fingerprints are kept (see `_Registration.check_same`).
RUNS_KEPT = 8


class _Registration:
    """A live source, the exception its fetch raised (re-raised to the caller as it was), and
    a fingerprint of every chunk it gave in each run, to refuse a chunk that reads back other
    values: the backward re-reads each chunk and must see what the forward saw."""

    def __init__(self, source: ChunkSource):
        self.source = source
        self.error: BaseException | None = None
        # run -> {(start, stop): digest}
        self.fingerprints: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()

    def read(self, run: int, start: int, stop: int) -> np.ndarray:
        chunk = self.source.read(start, stop)
        digest = hashlib.blake2b(np.ascontiguousarray(chunk).tobytes(), digest_size=16)
        self.check_same(run, start, stop, digest.digest())
        return chunk

    def check_same(self, run: int, start: int, stop: int, digest: bytes) -> None:
        with self.lock:
            seen = self.fingerprints.setdefault(run, {})
            self.fingerprints.move_to_end(run)
            while len(self.fingerprints) > RUNS_KEPT:
                self.fingerprints.popitem(last=False)
            first = seen.setdefault((start, stop), digest)
        if first != digest:
            raise ValueError(
                f"{self.source.name}: fetch({start}, {stop}) returned other values when read "
                "again. The backward pass reads each chunk again and must see the values the "
                "forward pass saw, or the gradient would belong to other data. Make fetch "
                "deterministic (draw augmentations from a seed of the chunk, not anew)."
            )


def _enclosing_graphs() -> list:
    """The graph being built and every graph it is built inside (a tf.function traced inside
    another, a loop body): the registration lives while any of them does."""
    graph = tf.compat.v1.get_default_graph()
    graphs = [graph]
    while getattr(graph, "outer_graph", None) is not None:
        graph = graph.outer_graph
        graphs.append(graph)
    return graphs


@contextlib.contextmanager
def live(sources: dict):
    """Registers `sources` ({name: ChunkSource}) for one call; yields {name: handle tensor}."""
    registrations = {name: _Registration(source) for name, source in sources.items()}
    with _LIVE_LOCK:
        handles = {name: next(_HANDLES) for name in sources}
        for name, registration in registrations.items():
            _LIVE[handles[name]] = registration
        if registrations and not tf.executing_eagerly():
            for graph in _enclosing_graphs():
                _HELD_BY_GRAPH.setdefault(graph, []).extend(registrations.values())
    try:
        yield {name: tf.constant(handle, tf.int64) for name, handle in handles.items()}
    except tf.errors.OpError as error:
        raised: list[BaseException] = [
            r.error for r in registrations.values() if r.error is not None
        ]
        if raised:  # the source's own exception, not TensorFlow's wrapper of it
            raise raised[0] from error
        raise


def run_token() -> tf.Tensor:
    """A new number each time the graph runs: the run whose reads a fingerprint belongs to."""
    token = tf.numpy_function(lambda: np.int64(next(_RUNS)), [], tf.int64, stateful=True)
    token.set_shape([])
    return token


def read_window(handle: tf.Tensor, run: tf.Tensor, start, stop, spec: tf.TensorSpec) -> tf.Tensor:
    """The window [start, stop) of the live source `handle`, when the graph runs."""

    def read(handle, run, start, stop):
        registration = _LIVE.get(int(handle))
        if registration is None:
            raise RuntimeError(
                "tbptt: this chunk source is no longer registered: the "
                "function that reads it outlived the call or graph it was "
                "made in."
            )
        try:
            return registration.read(int(run), int(start), int(stop)).astype(
                spec.dtype.as_numpy_dtype
            )
        except Exception as error:
            registration.error = error
            raise

    chunk = tf.numpy_function(read, [handle, run, start, stop], spec.dtype, stateful=False)
    chunk.set_shape(spec.shape)
    return chunk

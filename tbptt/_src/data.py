"""Consecutive ``[B, window]`` batches of long streams, for stateful training.

A stream of N steps is cut into B lanes of L = N // B consecutive steps (lane b holds steps
``b*L .. (b+1)*L - 1``); batch j is steps ``j*W .. (j+1)*W - 1`` of every lane. Batch j+1
therefore continues batch j row by row, which is what `ChunkedModel(stateful=True)` carries the
state (and, with truncation, the gradient) across. This is the language-model "batchify".

Episodes (RL rollouts, recordings) are packed end to end into the B lanes instead, with a
``reset`` flag at each episode's first step and a ``mask`` that is False on the padding after
the last episode of a lane.
"""

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tbptt._src.core import checks

EPISODES_MSG = (
    "episodes must be a non-empty sequence of arrays [T_i, ...] with the same "
    "trailing shape, got {value}."
)


def lanes(stream, batch_size: int) -> np.ndarray:
    """``[N, ...] -> [B, N // B, ...]``: B consecutive pieces of the stream (the tail of fewer
    than B steps is dropped).

    Examples:
        >>> lanes(np.arange(7), 2).tolist()
        [[0, 1, 2], [3, 4, 5]]
    """
    stream = np.asarray(stream)
    if stream.ndim == 0:
        raise ValueError("stream must have a time axis first (shape [N, ...]), got a scalar.")
    length = stream.shape[0] // checks.positive_int("batch_size", batch_size)
    return stream[: batch_size * length].reshape((batch_size, length) + stream.shape[1:])


def stream_windows(
    inputs, targets=None, *, batch_size: int, window: int, drop_remainder: bool = True
) -> tf.data.Dataset:
    """One long stream as consecutive ``[B, window, ...]`` batches (see the module docstring).

    Args:
      inputs: ``[N, ...]`` array, the stream.
      targets: ``[N, ...]`` array aligned with it, or None.
      batch_size: B, the number of lanes.
      window: W, the steps per batch.
      drop_remainder: drop the last, shorter window (keeps every batch a whole number of
        chunks when W is a multiple of the chunk size).

    Returns:
      A `tf.data.Dataset` of ``inputs [B, W, ...]`` (or ``(inputs, targets)``), in stream
      order: do not shuffle it.

    Examples:
        >>> ds = stream_windows(np.arange(12.0)[:, None], batch_size=2, window=3)
        >>> [b[..., 0].numpy().tolist() for b in ds]
        [[[0.0, 1.0, 2.0], [6.0, 7.0, 8.0]], [[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]]
    """
    window = checks.positive_int("window", window)
    batch_size = checks.positive_int("batch_size", batch_size)
    inputs = np.asarray(inputs)
    steps = inputs.shape[0] if inputs.ndim else 0
    if steps < batch_size * window:
        raise ValueError(
            f"inputs has {steps} steps, too few for batch_size={batch_size} lanes "
            f"of at least one window of {window} steps (needs >= "
            f"{batch_size * window})."
        )
    arrays = [lanes(inputs, batch_size)]
    if targets is not None:
        targets = np.asarray(targets)
        if targets.ndim == 0 or targets.shape[0] != steps:
            raise ValueError(
                f"targets must have the {steps} steps of the stream, got {targets.shape[:1]}."
            )
        arrays.append(lanes(targets, batch_size))
    return _windows(arrays, window, drop_remainder)


def batchify(tokens, *, batch_size: int, window: int) -> tf.data.Dataset:
    """Language-model batches of a token stream: inputs token t, targets token t + 1.

    Args:
      tokens: ``[N]`` int ids.
      batch_size, window: as in `stream_windows`.

    Returns:
      A dataset of ``(ids [B, W], next ids [B, W])``, for a chain whose
      ``inputs_layer=keras.layers.Embedding(V, D)`` looks the ids up chunk by chunk (its
      gradient one row per lookup, as Keras's is).

    Examples:
        >>> ds = batchify(np.arange(9), batch_size=2, window=2)
        >>> [(x.numpy().tolist(), y.numpy().tolist()) for x, y in ds]
        [([[0, 1], [4, 5]], [[1, 2], [5, 6]]), ([[2, 3], [6, 7]], [[3, 4], [7, 8]])]
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array of ids, got shape {list(tokens.shape)}.")
    return stream_windows(tokens[:-1], tokens[1:], batch_size=batch_size, window=window)


def episode_windows(
    episodes: Sequence, targets: Sequence | None = None, *, batch_size: int, window: int
) -> tf.data.Dataset:
    """Episodes packed end to end into B lanes, as consecutive windows with reset flags.

    Each episode goes to the lane that is shortest so far; a lane's episodes follow each other
    with ``reset=True`` at each one's first step, so the chain starts it from a zero state and
    no gradient crosses from one episode into the next. Lanes are padded to a whole number of
    windows with zeros and ``mask=False``.

    Args:
      episodes: arrays ``[T_i, F]``.
      targets: one array ``[T_i, ...]`` per episode, or None.
      batch_size, window: B and W.

    Returns:
      A dataset of ``{"inputs": [B, W, F], "reset": [B, W], "mask": [B, W]}`` (with targets:
      ``(that dict, targets [B, W, ...])``), in stream order.

    Examples:
        >>> ds = episode_windows([np.ones([3, 1]), np.ones([2, 1]), np.ones([2, 1])],
        ...                      batch_size=2, window=2)
        >>> [x["reset"].numpy().tolist() for x in ds]
        [[[True, False], [True, False]], [[False, False], [True, False]]]
    """
    batch_size = checks.positive_int("batch_size", batch_size)
    window = checks.positive_int("window", window)
    episodes = _episodes(episodes)
    targets = None if targets is None else _episode_targets(targets, episodes)
    order, longest = _lanes_of(episodes, batch_size)
    padded = -(-longest // window) * window
    arrays = {
        "inputs": _pack_lanes(episodes, order, padded),
        "reset": _lane_flags(episodes, order, padded, first_only=True),
        "mask": _lane_flags(episodes, order, padded, first_only=False),
    }
    if targets is None:
        return _windows([arrays], window, drop_remainder=False)
    return _windows([arrays, _pack_lanes(targets, order, padded)], window, drop_remainder=False)


def last_step_weights(lengths, steps: int) -> np.ndarray:
    """``[B, steps]`` float32: 1 at each sequence's last real step (``lengths - 1``), 0 else.

    The sample weights that train one label per sequence over chunks: with a loss that
    averages over its weights (Keras's ``reduction="mean_with_sample_weight"``) the chunked
    loss is the batch mean of each sequence's last-step loss, as a Keras classifier's is.

    Examples:
        >>> last_step_weights([3, 1], steps=4).tolist()
        [[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    """
    lengths = np.asarray(lengths)
    steps = checks.positive_int("steps", steps)
    if (
        lengths.ndim != 1
        or not np.issubdtype(lengths.dtype, np.integer)
        or (lengths.size and (lengths.min() < 1 or lengths.max() > steps))
    ):
        raise ValueError(
            f"lengths must be one whole number per sequence, each in [1, "
            f"steps={steps}], got {lengths.tolist()!r}."
        )
    weights = np.zeros([lengths.size, steps], "float32")
    weights[np.arange(lengths.size), lengths - 1] = 1.0
    return weights


def _episodes(episodes) -> list:
    try:
        episodes = [np.asarray(e) for e in episodes]
    except TypeError:
        raise ValueError(EPISODES_MSG.format(value=type(episodes).__name__)) from None
    if not episodes or any(
        e.ndim < 1 or e.shape[0] == 0 or e.shape[1:] != episodes[0].shape[1:] for e in episodes
    ):
        raise ValueError(EPISODES_MSG.format(value=[e.shape for e in episodes]))
    return episodes


def _episode_targets(targets: Sequence, episodes: list) -> list:
    """One target array per episode, each with the episode's length, checked."""
    targets = [np.asarray(t) for t in targets]
    wrong = [
        i
        for i, (t, e) in enumerate(zip(targets, episodes))
        if t.ndim == 0 or t.shape[0] != e.shape[0]
    ]
    if len(targets) != len(episodes) or wrong:
        index = wrong[0] if wrong else len(targets)
        steps = episodes[min(index, len(episodes) - 1)].shape[0]
        got = targets[index].shape[:1] if index < len(targets) else "missing"
        raise ValueError(
            "targets must be one array per episode with the episode's length: "
            f"episode {index} has {steps} steps, its targets {got}."
        )
    return targets


def _lanes_of(episodes: list, lanes: int) -> tuple:
    """``(the episodes' indices in each lane, the longest lane's steps)``: each episode goes to
    the lane shortest so far."""
    order: list = [[] for _ in range(lanes)]
    lengths = [0] * lanes
    for index, episode in enumerate(episodes):
        lane = int(np.argmin(lengths))
        order[lane].append(index)
        lengths[lane] += episode.shape[0]
    return order, max(lengths)


def _pack_lanes(arrays: list, order: list, padded: int) -> np.ndarray:
    """One row per lane: its arrays one after the other, zero-padded to `padded` steps."""
    out = np.zeros((len(order), padded) + arrays[0].shape[1:], arrays[0].dtype)
    for lane, indices in enumerate(order):
        start = 0
        for index in indices:
            out[lane, start : start + arrays[index].shape[0]] = arrays[index]
            start += arrays[index].shape[0]
    return out


def _lane_flags(episodes: list, order: list, padded: int, *, first_only: bool) -> np.ndarray:
    """reset (True at each episode's first step) or mask (True on every episode step)."""
    flags = np.zeros((len(order), padded), bool)
    for lane, indices in enumerate(order):
        start = 0
        for index in indices:
            length = episodes[index].shape[0]
            flags[lane, start : start + (1 if first_only else length)] = True
            start += length
    return flags


def _windows(arrays: list, window: int, drop_remainder: bool) -> tf.data.Dataset:
    """Consecutive windows along axis 1 of ``[B, L, ...]`` arrays (nests of them): a dataset of
    ``[B, W, ...]`` elements; a last, shorter window unless `drop_remainder`."""
    length = tf.nest.flatten(arrays[0])[0].shape[1]
    full = length // window

    def whole(a):  # [B, L, ...] -> [full, B, W, ...]
        a = a[:, : full * window].reshape((a.shape[0], full, window) + a.shape[2:])
        return np.swapaxes(a, 0, 1)

    structure = arrays[0] if len(arrays) == 1 else tuple(arrays)
    dataset = tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(whole, structure))
    if not drop_remainder and length % window:
        last = tf.nest.map_structure(lambda a: a[:, full * window :], structure)
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(last))
    return dataset

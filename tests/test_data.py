"""tbptt.data: consecutive windows of streams and packed episodes, against plain slicing."""

import numpy as np
import pytest

import tbptt


def test_stream_windows_continue_each_lane_batch_after_batch():
    stream = np.arange(50.0)[:, None]
    batches = list(tbptt.data.stream_windows(stream, stream * 2, batch_size=3, window=4))
    assert len(batches) == 4  # lanes of 16 steps, windows of 4
    lanes = np.concatenate([x.numpy() for x, _ in batches], axis=1)
    np.testing.assert_array_equal(lanes[..., 0], np.arange(48.0).reshape(3, 16))
    np.testing.assert_array_equal(
        np.concatenate([y.numpy() for _, y in batches], axis=1), 2 * lanes
    )


def test_stream_windows_keeps_a_short_last_window_when_asked():
    windows = list(
        tbptt.data.stream_windows(
            np.arange(14.0)[:, None], batch_size=2, window=3, drop_remainder=False
        )
    )
    assert [w.shape[1] for w in windows] == [3, 3, 1]


def test_batchify_targets_are_the_next_token():
    tokens = np.arange(101)
    for x, y in tbptt.data.batchify(tokens, batch_size=4, window=5):
        np.testing.assert_array_equal(y.numpy(), x.numpy() + 1)


def test_episode_windows_pack_episodes_with_resets_and_padding_mask():
    rng = np.random.default_rng(0)
    episodes = [rng.normal(size=[n, 2]) for n in (5, 3, 4, 2, 6)]
    targets = [e[:, :1] * 10 for e in episodes]
    batches = list(tbptt.data.episode_windows(episodes, targets, batch_size=2, window=4))
    x = {
        k: np.concatenate([b[0][k].numpy() for b in batches], axis=1)
        for k in ("inputs", "reset", "mask")
    }
    y = np.concatenate([b[1].numpy() for b in batches], axis=1)
    found = []
    for lane in range(2):  # cut each lane at its resets: the episodes come back whole
        starts = list(np.flatnonzero(x["reset"][lane])) + [int(x["mask"][lane].sum())]
        for a, b in zip(starts[:-1], starts[1:]):
            found.append(x["inputs"][lane, a:b])
            np.testing.assert_array_equal(y[lane, a:b], x["inputs"][lane, a:b, :1] * 10)
        assert not x["mask"][lane, starts[-1] :].any()
    assert sorted(map(len, found)) == sorted(map(len, episodes))
    assert all(any(f.shape == e.shape and np.allclose(f, e) for f in found) for e in episodes)


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        tbptt.data.stream_windows(np.zeros([10, 1]), batch_size=0, window=2)
    with pytest.raises(ValueError, match="too few"):
        tbptt.data.stream_windows(np.zeros([10, 1]), batch_size=3, window=4)
    with pytest.raises(ValueError, match="targets must have the 10 steps"):
        tbptt.data.stream_windows(np.zeros([10, 1]), np.zeros([9]), batch_size=2, window=2)
    with pytest.raises(ValueError, match="episodes must be"):
        tbptt.data.episode_windows([np.zeros([0, 2])], batch_size=1, window=2)
    with pytest.raises(ValueError, match="episode 1 has 3 steps"):
        tbptt.data.episode_windows(
            [np.zeros([2, 1]), np.zeros([3, 1])],
            [np.zeros([2]), np.zeros([2])],
            batch_size=1,
            window=2,
        )

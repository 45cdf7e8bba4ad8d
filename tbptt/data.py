"""Consecutive ``[B, window]`` batches of long streams and packed episodes, as `tf.data`."""

from tbptt._src.data import batchify, episode_windows, lanes, last_step_weights, stream_windows

__all__ = ["batchify", "episode_windows", "lanes", "last_step_weights", "stream_windows"]

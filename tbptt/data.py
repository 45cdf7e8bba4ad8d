"""Consecutive ``[B, window]`` batches of long streams and packed episodes, as `tf.data`."""

from tbptt._src.data import batchify
from tbptt._src.data import episode_windows
from tbptt._src.data import lanes
from tbptt._src.data import last_step_weights
from tbptt._src.data import stream_windows

__all__ = ["batchify", "episode_windows", "lanes", "last_step_weights", "stream_windows"]

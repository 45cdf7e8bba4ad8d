"""tbptt: exact and truncated back-propagation through time over chunks of long sequences."""

from tbptt import compat
from tbptt import data
from tbptt import diagnostics
from tbptt import keras
from tbptt._src.checks import NonFiniteError
from tbptt._src.recurrent import RecurrentChain
from tbptt._src.recurrent import StatefulGRUChain
from tbptt._src.recurrent import unroll
from tbptt._src.sources import ChunkSource
from tbptt._src.stages import StageChain
from tbptt._src.stages import StageResult
from tbptt._src.stages import split_sequential
from tbptt._src.types import ChainResult

__version__ = "0.1.0"

__all__ = [
    "ChainResult",
    "ChunkSource",
    "NonFiniteError",
    "RecurrentChain",
    "StageChain",
    "StageResult",
    "StatefulGRUChain",
    "compat",
    "data",
    "diagnostics",
    "keras",
    "split_sequential",
    "unroll",
]

"""tbptt: exact and truncated back-propagation through time over chunks of long sequences."""

from tbptt import compat
from tbptt import data
from tbptt import diagnostics
from tbptt import keras
from tbptt._src.checks import NonFiniteError
from tbptt._src.config import ChainConfig
from tbptt._src.layers import unroll
from tbptt._src.recurrent import RecurrentChain
from tbptt._src.recurrent import StatefulGRUChain
from tbptt._src.recurrent import StreamCarry
from tbptt._src.sources import ChunkSource
from tbptt._src.stages import StageChain
from tbptt._src.stages import StageResult
from tbptt._src.stages import split_sequential
from tbptt._src.types import ChainResult

__version__ = "0.1.0"

# The submodules `tbptt.keras` and `tbptt.data` stay out of __all__: `from tbptt import *`
# must not shadow the user's own `keras`.
__all__ = [
    "ChainConfig",
    "ChainResult",
    "ChunkSource",
    "NonFiniteError",
    "RecurrentChain",
    "StageChain",
    "StageResult",
    "StatefulGRUChain",
    "StreamCarry",
    "compat",
    "diagnostics",
    "split_sequential",
    "unroll",
]

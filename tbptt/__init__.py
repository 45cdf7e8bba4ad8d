"""tbptt: exact and truncated back-propagation through time over chunks of long sequences.

The public names are imported on first use, so that `import tbptt`, `tbptt.__version__` and the
`tbptt` command's `--help` answer without loading TensorFlow.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it (a submodule: the module itself).
_PUBLIC = {
    "ChainConfig": "tbptt._src.config",
    "ChainResult": "tbptt._src.types",
    "ChunkSource": "tbptt._src.sources",
    "NonFiniteError": "tbptt._src.checks",
    "RecurrentChain": "tbptt._src.recurrent",
    "StageChain": "tbptt._src.stages",
    "StageResult": "tbptt._src.stages",
    "StatefulGRUChain": "tbptt._src.recurrent",
    "StreamCarry": "tbptt._src.recurrent",
    "compat": "tbptt.compat",
    "data": "tbptt.data",
    "diagnostics": "tbptt.diagnostics",
    "keras": "tbptt.keras",
    "split_sequential": "tbptt._src.stages",
    "unroll": "tbptt._src.layers",
}

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


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tbptt' has no attribute {name!r}")
    module = importlib.import_module(_PUBLIC[name])
    value = module if _PUBLIC[name] == f"tbptt.{name}" else getattr(module, name)
    globals()[name] = value  # later lookups do not come here
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from tbptt import compat, data, diagnostics, keras  # noqa: F401
    from tbptt._src.checks import NonFiniteError  # noqa: F401
    from tbptt._src.config import ChainConfig  # noqa: F401
    from tbptt._src.layers import unroll  # noqa: F401
    from tbptt._src.recurrent import RecurrentChain, StatefulGRUChain, StreamCarry  # noqa: F401
    from tbptt._src.sources import ChunkSource  # noqa: F401
    from tbptt._src.stages import StageChain, StageResult, split_sequential  # noqa: F401
    from tbptt._src.types import ChainResult  # noqa: F401

"""tbptt: exact and truncated back-propagation through time over chunks of long sequences.

The public names are imported on first use, so that `import tbptt`, `tbptt.__version__` and the
`tbptt` command's `--help` answer without loading TensorFlow. The classes a saved Keras model
names are registered with Keras as soon as Keras is imported, before or after tbptt, so that
`import keras, tbptt; keras.models.load_model(path)` finds them.
"""

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it (a submodule: the module itself).
_PUBLIC = {
    "ChainConfig": "tbptt._src.recurrent.config",
    "ChainResult": "tbptt._src.core.types",
    "ChunkSource": "tbptt._src.core.sources",
    "NonFiniteError": "tbptt._src.core.checks",
    "RecurrentChain": "tbptt._src.recurrent.chain",
    "StageChain": "tbptt._src.stages",
    "StageResult": "tbptt._src.stages",
    "StatefulGRUChain": "tbptt._src.recurrent.chain",
    "StreamCarry": "tbptt._src.recurrent.streaming",
    "compat": "tbptt.compat",
    "data": "tbptt.data",
    "diagnostics": "tbptt.diagnostics",
    "keras": "tbptt.keras",
    "split_sequential": "tbptt._src.stages",
    "unroll": "tbptt._src.recurrent.loops.timeloop",
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


# What a saved Keras model names: "tbptt>class" -> the module that defines the class.
_SAVED_CLASSES = {
    "ChunkedModel": "tbptt._src.keras.model",
    "PerStep": "tbptt._src.keras.chunked",
    "RecurrentChain": "tbptt._src.recurrent.chain",
    "StageChain": "tbptt._src.stages",
    "StatefulGRUChain": "tbptt._src.recurrent.chain",
}


def _stand_in(name: str, module: str) -> type:
    """A class Keras can find under tbptt's name before the module defining it is imported
    (TensorFlow may import Keras while it is itself being imported): its `from_config` imports
    that module, which registers the class itself in its place, and builds the object."""

    def from_config(cls, config):
        return getattr(importlib.import_module(module), name).from_config(config)

    return type(
        name,
        (),
        {
            "get_config": lambda self: {},
            "from_config": classmethod(from_config),
            "__module__": module,
        },
    )


def _register_with_keras() -> None:
    keras = sys.modules["keras"]
    register = getattr(getattr(keras, "saving", None), "register_keras_serializable", None)
    if register is None:  # pragma: no cover - Keras 2 before 2.13
        return
    for name, module in _SAVED_CLASSES.items():
        if module not in sys.modules:  # an imported module has registered its classes
            register(package="tbptt")(_stand_in(name, module))


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """Finds `keras` as the other finders do, and has its loader register tbptt's classes once
    Keras has run (a `find_spec` that only asks whether Keras is there imports nothing)."""

    def __init__(self):
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras" or self._searching:
            return None
        self._searching = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching = False
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader, self)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader, finder: _RegisterAfterKeras):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        _register_with_keras()


if "keras" in sys.modules:
    _register_with_keras()
else:
    sys.meta_path.insert(0, _RegisterAfterKeras())


def __dir__() -> list:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from tbptt import compat, data, diagnostics, keras  # noqa: F401
    from tbptt._src.core.checks import NonFiniteError  # noqa: F401
    from tbptt._src.core.sources import ChunkSource  # noqa: F401
    from tbptt._src.core.types import ChainResult  # noqa: F401
    from tbptt._src.recurrent.chain import RecurrentChain, StatefulGRUChain  # noqa: F401
    from tbptt._src.recurrent.config import ChainConfig  # noqa: F401
    from tbptt._src.recurrent.loops.timeloop import unroll  # noqa: F401
    from tbptt._src.recurrent.streaming import StreamCarry  # noqa: F401
    from tbptt._src.stages import StageChain, StageResult, split_sequential  # noqa: F401

"""The shape of the implementation, held to the rules ARCHITECTURE.md states: small classes and
functions, no private attribute reached across objects, Keras through its public API, loops
over segments in one place, messages as constants only where reused."""

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "tbptt" / "_src"
MODULES = sorted(SRC.rglob("*.py"))
# The loops over segments live in core/chain.py; the per-cell time loops in recurrent/loops.
WHILE_LOOP_HOMES = {
    "core/chain.py",
    "recurrent/loops/timeloop.py",
    "recurrent/loops/gru.py",
    "recurrent/loops/lstm.py",
    "recurrent/loops/any_cell.py",
}


# A NamedTuple's public methods start with an underscore so as not to clash with fields.
NAMEDTUPLE_API = {"_replace", "_fields", "_asdict", "_make", "_field_defaults"}


def _tree(path):
    return ast.parse(path.read_text(), filename=str(path))


def _sizes(kind):
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, kind):
                yield f"{path.name}:{node.name}", node.end_lineno - node.lineno + 1


def test_no_class_over_250_lines():
    assert [(name, n) for name, n in _sizes(ast.ClassDef) if n > 250] == []


def test_no_function_over_50_lines():
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    assert [(name, n) for name, n in _sizes(functions) if n > 50] == []


def _private_reaches(tree):
    """`x._name` where x is not self/cls (or a module alias's private helper of its own)."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and node.attr not in NAMEDTUPLE_API
        ):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super":
                continue
            yield ast.unparse(node), node.lineno


def test_no_private_attribute_reached_across_objects():
    """compat.py is the one adapter to private TensorFlow/Keras names (each said why there)."""
    found = [
        (path.name, line, text)
        for path in MODULES
        if path.name != "compat.py"
        for text, line in _private_reaches(_tree(path))
    ]
    assert found == []


def test_keras_only_through_its_public_api():
    for path in MODULES:
        assert "keras.src" not in path.read_text(), path.name


def test_loops_over_segments_in_one_place():
    homes = {str(path.relative_to(SRC)) for path in MODULES if "tf.while_loop(" in path.read_text()}
    assert homes <= WHILE_LOOP_HOMES, homes - WHILE_LOOP_HOMES


def test_a_message_constant_is_used_more_than_once():
    """A message raised in one place is written where it is raised (STYLE.md 15)."""
    text = "\n".join(p.read_text() for p in MODULES)
    once = [
        f"{path.name}: {name}"
        for path in MODULES
        for name in re.findall(r"^([A-Z][A-Z0-9_]*_MSG)\s*=", path.read_text(), re.M)
        if len(re.findall(rf"\b{name}\b", text)) - 1 < 2
    ]
    assert once == []

"""The layout rules ARCHITECTURE.md states, checked on the syntax tree of `tbptt/_src`.

- Folders are layers: a module imports only from its own layer or the layers below it.
- No private name of another object: `x._name` (x not self, cls or super()), `getattr(x,
  "_name")` and `from m import _name` appear only in `core/compat.py`, the one adapter to
  TensorFlow's and Keras's private names.
- Keras through its public API: no `keras.src` import.
- Every loop over segments is in `core/chain.py`; every time loop in `recurrent/loops/`.
- Sizes: no file over 500 lines, no class over 250, no function over 50 (docstrings counted).
- A message constant (`*_MSG`) is used in more than one place.

What the tree cannot show is a convention, not a checked rule (ARCHITECTURE.md says which).
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "tbptt" / "_src"
MODULES = sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py")  # inits are empty

# The layers, bottom first: a module may import from its own layer and those below it.
LAYERS = [
    ("core",),
    ("recurrent/loops",),
    ("recurrent", "stages.py", "tf1.py"),
    ("keras",),
    ("data.py", "diagnostics.py", "demo.py", "cli.py"),
]
PRIVATE_NAMES_HOME = "core/compat.py"
SEGMENT_LOOPS_HOME = "core/chain.py"
TIME_LOOPS_HOME = "recurrent/loops/"
# A NamedTuple's public methods start with an underscore so as not to clash with fields.
NAMEDTUPLE_API = {"_replace", "_fields", "_asdict", "_make", "_field_defaults"}


def _relative(path: Path) -> str:
    return path.relative_to(SRC).as_posix()


def _layer(relative: str) -> int:
    """The layer of a module (its path relative to tbptt/_src)."""
    best = None
    for index, homes in enumerate(LAYERS):
        for home in homes:
            if relative == home or relative.startswith(home.rstrip("/") + "/"):
                if best is None or len(home) > best[1]:
                    best = (index, len(home))
    assert best is not None, f"{relative} is in no layer of LAYERS"
    return best[0]


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_modules(tree: ast.Module) -> list:
    """`tbptt._src` modules a module imports, as paths relative to tbptt/_src."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("tbptt._src")
        ):
            base = node.module[len("tbptt._src") :].strip(".").replace(".", "/")
            for alias in node.names:
                target = f"{base}/{alias.name}" if base else alias.name
                found.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tbptt._src."):
                    found.append((alias.name[len("tbptt._src.") :].replace(".", "/"), node.lineno))
    return found


def _resolve(target: str) -> str | None:
    """`target` (a module, or a name in a module) as a module path, or None if not ours."""
    for candidate in (f"{target}.py", f"{target}/__init__.py"):
        if (SRC / candidate).exists():
            return candidate
    parent = target.rsplit("/", 1)[0] if "/" in target else ""
    for candidate in (f"{parent}.py", f"{parent}/__init__.py"):
        if parent and (SRC / candidate).exists():
            return candidate
    return None


def test_every_module_is_in_a_layer():
    for path in MODULES:
        _layer(_relative(path))


def test_imports_never_go_up_a_layer():
    upward = []
    for path in MODULES:
        own = _layer(_relative(path))
        for target, line in _imported_modules(_tree(path)):
            module = _resolve(target)
            if module is not None and _layer(module) > own:
                upward.append(f"{_relative(path)}:{line} imports {module}")
    assert upward == []


def test_the_imports_make_no_circle():
    graph = {}
    for path in MODULES:
        targets = {_resolve(t) for t, _ in _imported_modules(_tree(path))}
        graph[_relative(path)] = {t for t in targets if t and not t.endswith("__init__.py")}
    visiting, done, circles = set(), set(), []

    def visit(node, trail):
        if node in done:
            return
        if node in visiting:
            circles.append(trail[trail.index(node) :])
            return
        visiting.add(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [nxt])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])
    assert circles == []


def _private_reaches(tree: ast.Module):
    """Private names of other objects: attributes, getattr/hasattr/setattr strings, imports."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super":
                continue
            yield ast.unparse(node), node.lineno
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
            "getattr",
            "hasattr",
            "setattr",
        ):
            name = node.args[1] if len(node.args) > 1 else None
            owner = node.args[0] if node.args else None
            if (
                isinstance(name, ast.Constant)
                and isinstance(name.value, str)
                and _private(name.value)
                and not (isinstance(owner, ast.Name) and owner.id == "self")
            ):
                yield ast.unparse(node), node.lineno
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if _private(alias.name):
                    yield f"from {node.module} import {alias.name}", node.lineno


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in NAMEDTUPLE_API


def test_no_private_name_of_another_object_outside_compat():
    found = [
        (_relative(path), line, text)
        for path in MODULES
        if _relative(path) != PRIVATE_NAMES_HOME
        for text, line in _private_reaches(_tree(path))
    ]
    assert found == []


def test_keras_only_through_its_public_api():
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.startswith("keras.src") for n in names), _relative(path)


def _while_loops(tree: ast.Module) -> list:
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "while_loop"
    ]


def test_loops_over_segments_in_chain_and_time_loops_in_loops():
    homes = {_relative(path) for path in MODULES if _while_loops(_tree(path))}
    strays = {
        home
        for home in homes
        if home != SEGMENT_LOOPS_HOME and not home.startswith(TIME_LOOPS_HOME)
    }
    assert strays == set()


def _sizes(kind):
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, kind):
                yield f"{_relative(path)}:{node.name}", node.end_lineno - node.lineno + 1


def test_no_file_over_500_lines():
    long = [(_relative(p), n) for p in MODULES if (n := len(p.read_text().splitlines())) > 500]
    assert long == []


def test_no_class_over_250_lines():
    assert [(name, n) for name, n in _sizes(ast.ClassDef) if n > 250] == []


def test_no_function_over_50_lines():
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    assert [(name, n) for name, n in _sizes(functions) if n > 50] == []


def test_a_message_constant_is_used_more_than_once():
    """A message raised in one place is written where it is raised (STYLE.md 15)."""
    defined, used = {}, {}
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id.endswith("_MSG"):
                        defined[target.id] = _relative(path)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                used[node.id] = used.get(node.id, 0) + 1
            elif isinstance(node, ast.Attribute) and node.attr.endswith("_MSG"):
                used[node.attr] = used.get(node.attr, 0) + 1
    assert [(name, home) for name, home in defined.items() if used.get(name, 0) < 2] == []


@pytest.mark.parametrize("rule", ["upward", "private"])
@pytest.mark.default_cases("upward")
def test_the_checks_see_what_they_claim(tmp_path, rule):
    """Each check refuses a module that breaks its rule (a check that cannot fail is none)."""
    if rule == "upward":
        tree = ast.parse("from tbptt._src.keras import model\n")
        targets = [_resolve(t) for t, _ in _imported_modules(tree)]
        assert targets == ["keras/model.py"] and _layer("keras/model.py") > _layer("core/chain.py")
    else:
        tree = ast.parse("x = layer._tracker\ny = getattr(layer, '_inbound_nodes')\n")
        assert len(list(_private_reaches(tree))) == 2

"""Every Python block of the README and of the documentation site runs as printed, at the
smaller sizes of `SMALLER`; the site's API reference covers every public name.

The blocks of one page run in order in one namespace, as a reader would paste them.
"""

import importlib
import os
import pathlib
import re
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted(
    str(path.relative_to(ROOT)) for path in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
)
PUBLIC = ("tbptt", "tbptt.keras", "tbptt.data", "tbptt.diagnostics", "tbptt.compat.v1")

# (as printed, as run): every pair must occur in some page, so a stale pair fails here.
SMALLER = [
    ("np.random.randn(34, 5000, 200)", "np.random.randn(4, 300, 20)"),
    ("np.random.randn(34, 5000, 3)", "np.random.randn(4, 300, 3)"),
    ("initial_state(batch_size=34)", "initial_state(batch_size=4)"),
    ("for step in range(10):", "for step in range(2):"),
    ('chunk_size=50, mode="truncated"', 'chunk_size=10, mode="truncated"'),
    ("B, T, classes = 32, 400, 5", "B, T, classes = 4, 120, 5"),
    ("np.random.randn(100_000, 8)", "np.random.randn(3_200, 8)"),
    ("np.random.randn(16, 1000, 8)", "np.random.randn(4, 60, 8)"),
    ("keras.layers.GRU(64, return_sequences=True)", "keras.layers.GRU(8, return_sequences=True)"),
    ("keras.layers.LSTM(32, return_sequences=True)", "keras.layers.LSTM(4, return_sequences=True)"),
    ("chunk_sizes=[50, 100]", "chunk_sizes=[50]"),
    ("backprop_chunks=[1, 2, 4, 8]", "backprop_chunks=[1, 2]"),
]
# What a page's blocks leave behind, checked after they ran.
WRITES = {
    "docs/guides/choosing-k-and-m.md": ["truncation.png"],
    "docs/guides/keras.md": ["stream_model.keras"],
    "docs/guides/after-training.md": ["served"],
}
FENCE = re.compile(r"^( *)```python\n(.*?)^\1```", re.MULTILINE | re.DOTALL)


def _blocks(text: str) -> list:
    """[(line number, code)] of a page's Python blocks, in order."""
    return [
        (text[: m.start()].count("\n") + 2, textwrap.dedent(m.group(2)))
        for m in FENCE.finditer(text)
    ]


def _as_run(text: str) -> str:
    for printed, run in SMALLER:
        text = text.replace(printed, run)
    return text


def test_every_smaller_size_is_still_printed_somewhere():
    everything = "".join((ROOT / page).read_text() for page in PAGES)
    for printed, _ in SMALLER:
        assert printed in everything, f"no page shows {printed!r} any more: update SMALLER"


def _runnable() -> list:
    """The pages with Python blocks; of pages whose blocks are all the same (the README's
    example is Getting started's), the first only."""
    pages, seen = [], set()
    for page in PAGES:
        blocks = tuple(code for _, code in _blocks((ROOT / page).read_text()))
        if blocks and blocks not in seen:
            pages.append(page)
            seen.add(blocks)
    return pages


RUNNABLE = _runnable()
# The guides whose blocks train Keras models (fit, saving, export, a sweep of K and m: 3-10 s
# each) run with -m slow; the default suite runs the README's and the quicker pages' blocks.
SLOW_PAGES = [
    "docs/guides/after-training.md",
    "docs/guides/choosing-k-and-m.md",
    "docs/guides/keras.md",
    "docs/guides/one-label.md",
    "docs/guides/streaming.md",
]


@pytest.mark.parametrize("page", RUNNABLE)
@pytest.mark.default_cases(*(page for page in RUNNABLE if page not in SLOW_PAGES))
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.default_budget  # as a reader runs them
def test_every_python_block_of_a_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks write their files (plots, checkpoints) here
    namespace: dict = {}
    for line, code in _blocks(_as_run((ROOT / page).read_text())):
        exec(compile(code, f"{page}:{line}", "exec"), namespace)  # noqa: S102
    for written in WRITES.get(page, []):
        assert os.path.exists(written), f"{page} should have written {written}"


def test_the_slow_pages_are_pages_with_blocks():
    assert set(SLOW_PAGES) <= set(RUNNABLE), sorted(set(SLOW_PAGES) - set(RUNNABLE))


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert 'pip install -e ".[test]" && tbptt demo\npytest -q\n' in readme  # the Quickstart


def test_the_api_reference_covers_every_public_name():
    reference = "".join(path.read_text() for path in (ROOT / "docs" / "api").glob("*.md"))
    missing = [
        f"{module}.{name}"
        for module in PUBLIC
        for name in importlib.import_module(module).__all__
        if not isinstance(getattr(importlib.import_module(module), name), type(os))
        and f"::: {module}.{name}\n" not in reference
    ]
    assert not missing, f"no API reference section for {missing}"

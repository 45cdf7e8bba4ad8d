"""Every Python block of the README runs as printed, at the smaller sizes of `SMALLER`.

The blocks of one `##` section run in order in one namespace, as a reader would paste them;
a section in `CONTINUES` starts from where another section's blocks left off.
"""

import os
import pathlib
import re
import textwrap

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE = "Example: training on long sequences with exact chunked gradients"

# (as printed, as run): every pair must occur in the README, so a stale pair fails here.
SMALLER = [
    ("np.random.randn(34, 5000, 200)", "np.random.randn(4, 300, 20)"),
    ("np.random.randn(34, 5000, 3)", "np.random.randn(4, 300, 3)"),
    ("initial_state(batch_size=34)", "initial_state(batch_size=4)"),
    ("for step in range(10):", "for step in range(2):"),
    ("B, T, classes = 32, 400, 5", "B, T, classes = 4, 120, 5"),
    ("np.random.randn(100_000, 8)", "np.random.randn(3_200, 8)"),
    ("np.random.randn(16, 1000, 8)", "np.random.randn(4, 60, 8)"),
    ("keras.layers.GRU(64, return_sequences=True)", "keras.layers.GRU(8, return_sequences=True)"),
    ("keras.layers.LSTM(32, return_sequences=True)", "keras.layers.LSTM(4, return_sequences=True)"),
    ("chunk_sizes=[50, 100]", "chunk_sizes=[50]"),
    ("backprop_chunks=[1, 2, 4, 8]", "backprop_chunks=[1, 2]"),
]
CONTINUES = {"Choosing K and m": EXAMPLE}
FENCE = re.compile(r"^( *)```python\n(.*?)^\1```", re.MULTILINE | re.DOTALL)


def _sections(text: str) -> dict:
    """section title -> [(line number, code)] of its Python blocks, in order."""
    sections = {}
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        title = re.findall(r"^## (.+)$", before, re.MULTILINE)[-1]
        line = before.count("\n") + 2
        sections.setdefault(title, []).append((line, textwrap.dedent(match.group(2))))
    return sections


def _readme_as_run() -> str:
    text = README.read_text()
    for printed, run in SMALLER:
        assert printed in text, f"the README no longer shows {printed!r}: update SMALLER"
        text = text.replace(printed, run)
    return text


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the blocks write their files (plots, checkpoints) here
    text = _readme_as_run()
    sections = _sections(text)
    assert sum(len(blocks) for blocks in sections.values()) == text.count("```python") >= 9
    namespaces = {}
    for title in sorted(sections, key=lambda t: t in CONTINUES):  # continued ones last
        namespace = dict(namespaces[CONTINUES[title]]) if title in CONTINUES else {}
        for line, code in sections[title]:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102
        namespaces[title] = namespace
    assert os.path.exists("truncation.png") and os.path.exists("stream_model.keras")

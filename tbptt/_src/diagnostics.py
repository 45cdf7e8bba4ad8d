"""How much gradient truncation loses, measured on the user's own model and data.

For each chunk size K and truncation depth m, the truncated gradient (TBPTT(K, mK)) is compared
with the exact one (full BPTT, which the chunked chain gives at the memory of one chunk):

- cosine similarity and relative norm error ``|g_m - g| / |g|`` over all weights together;
- the reach of the carried dLoss/dstate: at each cut, what the loss of the chunk `a` chunks
  ahead sends back (the truncated chain keeps these apart by age), as an RMS norm over the cuts
  for a = 1, 2, ...; truncation at m drops everything from a = m on. Where it has fallen to
  noise, longer windows buy nothing.

The exact gradient does not depend on K, so it is computed once.
"""

import math
import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tbptt._src.core import checks
from tbptt._src.core.types import LossFn
from tbptt._src.recurrent.chain import RecurrentChain

SIGNIFICANT = 1e-2  # a carried gradient below 1% of its size one chunk back is "noise"
CLOSE = 0.1  # a truncated gradient within 10% (relative error) of the exact one is "close"


class TruncationRow(NamedTuple):
    """One truncation setting against the exact gradient."""

    chunk_size: int
    backprop_chunks: int
    window: int  # chunk_size * backprop_chunks: the steps a loss reaches back, at most
    cosine: float  # cosine similarity of the truncated and the exact gradient
    relative_error: float  # |g_truncated - g_exact| / |g_exact|


class TruncationReport(NamedTuple):
    """What `truncation_report` measured.

    Attributes:
      rows: one `TruncationRow` per (chunk_size, backprop_chunks).
      reach: chunk_size -> array ``[ages]``: RMS over the cuts of the norm of what the loss `a`
        chunks ahead sends back to a cut (entry a-1), a = 1 .. reach_chunks.
      exact_grad_norm: |g_exact| over all weights.
      steps, batch: the sequence length and batch size measured on.
    """

    rows: list
    reach: dict
    exact_grad_norm: float
    steps: int
    batch: int

    def reach_steps(self, chunk_size: int, threshold: float = SIGNIFICANT) -> int | None:
        """Steps back (a multiple of chunk_size) from which what a loss sends back is below
        `threshold` times what it sends one chunk back; None if it never falls that far within
        the measured ages."""
        relative = _relative(self.reach[chunk_size])
        below = np.nonzero(relative < threshold)[0]
        return int((below[0] + 1) * chunk_size) if below.size else None

    def smallest_window(self, max_error: float = CLOSE) -> TruncationRow | None:
        """The row with the fewest steps of back-propagation whose relative error is at most
        `max_error` (ties: the larger chunk, fewer chunks to run); None if none is."""
        good = [row for row in self.rows if row.relative_error <= max_error]
        return min(good, key=lambda r: (r.window, -r.chunk_size)) if good else None

    def table(self) -> str:
        """The report as text: the settings, then the reach of the carried gradient."""
        lines = [
            f"Truncated vs exact gradient (T={self.steps}, batch={self.batch}, "
            f"|exact gradient| = {self.exact_grad_norm:.3g})",
            "",
            f"{'chunk_size':>10} {'backprop_chunks':>15} {'window (steps)':>14} "
            f"{'cosine':>8} {'rel. error':>10}",
            "-" * 61,
        ]
        for row in self.rows:
            lines.append(
                f"{row.chunk_size:>10} {row.backprop_chunks:>15} {row.window:>14} "
                f"{row.cosine:>8.4f} {row.relative_error:>10.3g}"
            )
        for size, norms in self.reach.items():
            lines += [
                "",
                f"Carried dLoss/dstate, chunk_size={size}: what the loss a chunks "
                "ahead sends back to a cut (RMS over cuts)",
                f"{'a':>3} {'steps back':>10} {'norm':>10} {'vs a=1':>8}",
            ]
            for age, (norm, rel) in enumerate(zip(norms, _relative(norms)), start=1):
                lines.append(f"{age:>3} {age * size:>10} {norm:>10.3g} {rel:>8.2g}")
            reach = self.reach_steps(size)
            lines.append(
                f"  below {SIGNIFICANT:.0%} of a=1 from {reach} steps back"
                if reach
                else f"  still above {SIGNIFICANT:.0%} of a=1 at {len(norms) * size} "
                "steps back: measure further (a larger reach_chunks, or a "
                "longer sequence)"
            )
        best = self.smallest_window()
        lines += [
            "",
            f"Shortest window within {CLOSE:.0%} of the exact gradient: chunk_size="
            f"{best.chunk_size}, backprop_chunks={best.backprop_chunks} ({best.window} "
            "steps)"
            if best
            else f"No truncation setting measured comes within {CLOSE:.0%} of the exact "
            "gradient: use mode='exact' (same memory, one more forward pass) or "
            "longer windows.",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str) -> None:
        """Writes a PNG: cosine and relative error against the window, and the reach."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for size in sorted({row.chunk_size for row in self.rows}):
            rows = [row for row in self.rows if row.chunk_size == size]
            windows = [row.window for row in rows]
            (line,) = left.plot(
                windows, [row.cosine for row in rows], "o-", label=f"cosine, chunk_size={size}"
            )
            left.plot(
                windows,
                [row.relative_error for row in rows],
                "s--",
                color=line.get_color(),
                label=f"rel. error, chunk_size={size}",
            )
        left.axhline(1.0, color="gray", linestyle=":")
        left.set(
            xlabel="truncation window (steps back-propagated)",
            ylabel="vs the exact gradient",
            title="truncated gradient",
        )
        left.legend(fontsize=8)
        for size, norms in self.reach.items():
            steps = size * np.arange(1, len(norms) + 1)
            right.semilogy(
                steps, np.maximum(_relative(norms), 1e-12), "o-", label=f"chunk_size={size}"
            )
        right.axhline(SIGNIFICANT, color="gray", linestyle=":", label=f"{SIGNIFICANT:.0%}")
        right.set(
            xlabel="steps back from the loss",
            ylabel="carried |dLoss/dstate|, vs one chunk back",
            title="reach of the carried gradient",
        )
        right.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)


def truncation_report(
    chain: RecurrentChain,
    inputs,
    targets,
    loss_fn: LossFn,
    chunk_sizes=None,
    backprop_chunks: Sequence[int] = (1, 2, 4),
    *,
    initial_state=None,
    sample_weight=None,
    reach_chunks: int | None = None,
    verbose="auto",
) -> TruncationReport:
    """Measures how far truncated gradients are from the exact one, on `chain`'s weights (the
    chain is not changed: variants sharing its weights run each setting).

    Args:
      chain: a `RecurrentChain` (built or not): its layers, backend and reduction, any mode.
      inputs, targets, loss_fn, initial_state, sample_weight: a batch like the training data.
      chunk_sizes, backprop_chunks: the K (an int or ints; None: the chain's) and the
        truncation depths m (TBPTT(K, mK)) to try.
      reach_chunks: chunks back to follow the carried gradient (None: 2 max(m), at least 4).
      verbose: 1 shows the step being computed on standard error; "auto": on a terminal.

    Returns: `TruncationReport`; print it, or `.plot(path)`.

    >>> import keras, numpy as np, tbptt
    >>> chain = tbptt.StatefulGRUChain(8, head=keras.layers.Dense(1), chunk_size=4)
    >>> x, y = np.random.rand(2, 24, 3), np.random.rand(2, 24, 1)
    >>> report = tbptt.diagnostics.truncation_report(
    ...     chain, x, y, keras.losses.MeanSquaredError(), backprop_chunks=[6], reach_chunks=2)
    >>> row = report.rows[0]  # 6 chunks back cover all 24 steps: the exact gradient
    >>> row.window, round(row.cosine, 6), row.relative_error < 1e-5
    (24, 1.0, True)
    """
    chunk_sizes, depths, reach_chunks = _settings(chain, chunk_sizes, backprop_chunks, reach_chunks)
    call = dict(initial_state=initial_state, sample_weight=sample_weight)
    progress = _Progress(1 + len(chunk_sizes) * (len(depths) + 1), verbose)
    progress.step("the exact gradient")
    exact = _variant(chain, chunk_sizes[0], "exact", 1)
    exact_flat = _flat(exact.value_and_gradients(inputs, targets, loss_fn, **call).grads)
    rows, reach = [], {}
    for size in chunk_sizes:
        rows += _rows_for(chain, size, depths, exact_flat, progress, inputs, targets, loss_fn, call)
        progress.step(f"the reach of dLoss/dstate, K={size}")
        variant = _variant(chain, size, "truncated", reach_chunks + 1)
        reach[size] = _reach(variant, inputs, targets, loss_fn, call)
    progress.done()
    batch, steps = tuple(getattr(inputs, "shape", None) or np.shape(inputs))[:2]  # or sources
    return TruncationReport(rows, reach, float(np.linalg.norm(exact_flat)), steps, batch)


def _rows_for(
    chain, size: int, depths, exact_flat, progress, inputs, targets, loss_fn, call: dict
) -> list:
    """One row per truncation depth m at chunk size `size`."""
    rows = []
    for m in depths:
        progress.step(f"TBPTT(K={size}, m={m})")
        grads = (
            _variant(chain, size, "truncated", m)
            .value_and_gradients(inputs, targets, loss_fn, **call)
            .grads
        )
        rows.append(_compare(size, m, _flat(grads), exact_flat))
    return rows


class _Progress:
    """One line on standard error, rewritten per step: ``[i/n] what``."""

    def __init__(self, total: int, verbose):
        self._total, self._done = total, 0
        self._on = sys.stderr.isatty() if verbose == "auto" else bool(verbose)

    def step(self, what: str) -> None:
        self._done += 1
        if self._on:
            print(
                f"\r[{self._done}/{self._total}] truncation report: {what}\033[K",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def done(self) -> None:
        if self._on:
            print(file=sys.stderr, flush=True)


def _settings(chain, chunk_sizes, backprop_chunks, reach_chunks) -> tuple:
    """The report's chunk sizes, truncation depths and reach, checked."""
    if not isinstance(chain, RecurrentChain):
        raise TypeError(checks.CHAIN_MSG.format(value=chain))
    if chunk_sizes is None:
        if chain.chunk_size == "auto":
            raise ValueError(
                "chunk_sizes must be given when the chain's chunk_size is 'auto' "
                "(the report compares fixed chunkings), e.g. chunk_sizes=[50, 100, "
                "200]."
            )
        chunk_sizes = chain.chunk_size
    chunk_sizes = checks.positive_ints("chunk_sizes", chunk_sizes)
    depths = checks.positive_ints("backprop_chunks", backprop_chunks)
    reach_chunks = (
        max(4, 2 * max(depths))
        if reach_chunks is None
        else checks.positive_int("reach_chunks", reach_chunks)
    )
    return chunk_sizes, depths, reach_chunks


def _variant(chain: RecurrentChain, chunk_size: int, mode: str, m: int) -> RecurrentChain:
    """A chain over the same cells and head (so the same weights) with other settings."""
    return chain.with_config(
        chunk_size=chunk_size,
        mode=mode,
        backprop_chunks=m,
        levels=1,
        memory_budget=None,
        check_numerics=False,
    )


def _reach(chain: RecurrentChain, inputs, targets, loss_fn, call: dict) -> np.ndarray:
    """RMS over cuts of the carried cotangent's norm, per age (the loss `a` chunks ahead)."""
    norms = chain.carried_grad_norms(inputs, targets, loss_fn, **call)
    chunks, ages = norms.shape  # row k is the cut before chunk k
    # Cut k (1 .. chunks-1) has a loss `age` chunks ahead while k + age - 1 < chunks: the
    # sequence's chunks bound the ages that can be measured.
    return np.array(
        [
            math.sqrt(np.mean(norms[1 : chunks - age + 1, age - 1] ** 2))
            for age in range(1, min(ages, chunks - 1) + 1)
        ]
    )


def _compare(size: int, m: int, grads: np.ndarray, exact: np.ndarray) -> TruncationRow:
    norm = np.linalg.norm(exact)
    denominator = norm * np.linalg.norm(grads)
    cosine = float(np.dot(grads, exact) / denominator) if denominator > 0 else float("nan")
    error = float(np.linalg.norm(grads - exact) / norm) if norm > 0 else float("nan")
    return TruncationRow(size, m, size * m, cosine, error)


def _flat(grads) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(tf.convert_to_tensor(g), "float64")) for g in grads])


def _relative(norms: np.ndarray) -> np.ndarray:
    first = norms[0] if norms.size and norms[0] > 0 else np.nan
    return norms / first

"""The online step: one step at a time with the state carried, tbptt against a compiled Keras
step of the same layers.

    python benchmarks/online.py [--units 64] [--repeats 7] [--calls 500] [--update-readme]

A GRU of `--units` units over F=16 features and a Dense(4) head, B=1 and B=32, one step
[B, 1, F] per call: tbptt's `chain(x_t, state)` against `tf.function` of Keras's `GRUCell` and
`Dense` on the same weights, alternating in one process (machine noise hits both alike). Each
figure is the median over `--repeats` rounds of the mean time of `--calls` consecutive calls;
the outputs are checked equal first.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from harness import positive_int, replace_in_readme  # noqa: E402 (benchmarks/ is the folder)

import tbptt  # noqa: E402

FEATURES, OUTPUTS = 16, 4


def pair(batch: int, units: int):
    """(tbptt step, Keras step), each `step() -> outputs` carrying its own state."""
    chain = tbptt.StatefulGRUChain(units, head=keras.layers.Dense(OUTPUTS), chunk_size=50)
    chain.build([None, None, FEATURES])
    cell, dense = keras.layers.GRUCell(units), keras.layers.Dense(OUTPUTS)
    cell.build([None, FEATURES]), dense.build([None, units])
    for target, source in zip(
        cell.trainable_variables + dense.trainable_variables, chain.trainable_variables
    ):
        target.assign(source)

    @tf.function
    def keras_step(x, h):
        y, new = cell(x[:, 0], [h])
        return dense(y)[:, None], new[0]

    x = tf.constant(np.random.RandomState(0).randn(batch, 1, FEATURES).astype("float32"))
    carried = {"tbptt": chain.initial_state(batch), "keras": tf.zeros([batch, units])}

    def ours():
        y, carried["tbptt"] = chain(x, carried["tbptt"])
        return y

    def theirs():
        y, carried["keras"] = keras_step(x, carried["keras"])
        return y

    for _ in range(3):
        np.testing.assert_allclose(ours(), theirs(), rtol=1e-4, atol=1e-5)
    return ours, theirs


def timed(step, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    step().numpy()
    return (time.perf_counter() - start) / (calls + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=positive_int, default=64, help="GRU units (default: 64)")
    parser.add_argument(
        "--repeats", type=positive_int, default=7, help="timed rounds of each step (default: 7)"
    )
    parser.add_argument(
        "--calls", type=positive_int, default=500, help="calls per round (default: 500)"
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="also put the table in the documentation (between its online markers)",
    )
    args = parser.parse_args()
    lines = [
        f"GRU {args.units} + Dense {OUTPUTS}, F={FEATURES}, one step per call; median of "
        f"{args.repeats} rounds of {args.calls} calls",
        "| batch | tbptt `chain(x_t, state)` (ms) | compiled Keras step (ms) | ratio |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for batch in (1, 32):
        ours, theirs = pair(batch, args.units)
        times = {"tbptt": [], "keras": []}
        for _ in range(args.repeats):
            times["tbptt"].append(timed(ours, args.calls))
            times["keras"].append(timed(theirs, args.calls))
        median = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
        lines.append(
            f"| {batch} | {median['tbptt']:.3f} | {median['keras']:.3f} | "
            f"{median['tbptt'] / median['keras']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.update_readme:
        replace_in_readme("online", text)


if __name__ == "__main__":
    main()

"""Float32 drift of long chains: the exact chunked gradient against a float64 reference.

A float32 gradient over T steps differs from the float64 one by rounding that accumulates
along the chain. This measures how much, for the chunked gradient and for one float32 tape over
the whole sequence (full BPTT), both against one float64 tape, at T = 1k, 3k and 10k:

    python benchmarks/drift.py            # prints the table, writes benchmarks/drift.md and .png

Model: GRU 32 + Dense 1, F=8, B=4, chunk_size=100, an input stream with slow structure so
that the state carries information far back; loss = mean squared error over all steps.
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from harness import positive_int  # noqa: E402 (benchmarks/ is the script folder)

import tbptt  # noqa: E402

HERE = Path(__file__).resolve().parent
UNITS, FEATURES, BATCH, CHUNK = 32, 8, 4, 100


def data(steps: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    t = np.arange(steps)[None, :, None]
    x = np.sin(t * rng.uniform(0.001, 0.05, size=(1, 1, FEATURES)) + rng.randn(BATCH, 1, FEATURES))
    x = x + 0.3 * rng.randn(BATCH, steps, FEATURES)
    y = np.cumsum(x[..., :1], axis=1) / np.sqrt(np.arange(1, steps + 1))[None, :, None]
    return x, y


def chains(weights=None):
    """The same weights as a float64 and a float32 chain."""
    made = {}
    for dtype in ("float64", "float32"):
        keras.utils.set_random_seed(0)
        chain = tbptt.StatefulGRUChain(
            UNITS,
            head=keras.layers.Dense(1),
            chunk_size=CHUNK,
            reduction="mean",
            dtype=dtype,
            memory_budget=None,  # chunk by chunk: the drift of the chunked sum
        )
        chain.build((None, None, FEATURES))
        made[dtype] = chain
    for v64, v32 in zip(made["float64"].trainable_variables, made["float32"].trainable_variables):
        v32.assign(tf.cast(v64, tf.float32))
    return made


def tape_grads(chain, x, y, loss_fn):
    with tf.GradientTape() as tape:
        outputs, _ = chain(x)
        loss = loss_fn(y, outputs)
    return tape.gradient(loss, chain.trainable_variables)


def relative_error(grads, reference) -> float:
    """|g - ref| / |ref| over all variables taken as one vector."""
    diff = sum(
        float(np.sum((np.float64(g) - np.float64(r)) ** 2)) for g, r in zip(grads, reference)
    )
    norm = sum(float(np.sum(np.float64(r) ** 2)) for r in reference)
    return float(np.sqrt(diff / norm))


def measure(steps: int) -> dict:
    x, y = data(steps)
    made = chains()
    loss64 = keras.losses.MeanSquaredError(dtype="float64")
    loss32 = keras.losses.MeanSquaredError()
    reference = tape_grads(made["float64"], x, y, loss64)
    start = time.perf_counter()
    chunked = (
        made["float32"].value_and_gradients(x.astype("float32"), y.astype("float32"), loss32).grads
    )
    seconds = time.perf_counter() - start
    one_tape = tape_grads(made["float32"], x.astype("float32"), y.astype("float32"), loss32)
    chunked64 = made["float64"].value_and_gradients(x, y, loss64).grads
    return {
        "steps": steps,
        "chunked_f32": relative_error(chunked, reference),
        "one_tape_f32": relative_error(one_tape, reference),
        "chunked_f64": relative_error(chunked64, reference),
        "chunked_vs_one_tape_f32": relative_error(chunked, one_tape),
        "seconds": seconds,
    }


def table(rows) -> str:
    lines = [
        "| T | exact chunked, float32 | one tape (full BPTT), float32 | exact chunked, "
        "float64 | chunked vs one tape, both float32 |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['steps']:,} | {r['chunked_f32']:.2e} | {r['one_tape_f32']:.2e} | "
            f"{r['chunked_f64']:.1e} | {r['chunked_vs_one_tape_f32']:.2e} |"
        )
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    steps = [r["steps"] for r in rows]
    axis.loglog(steps, [r["chunked_f32"] for r in rows], "o-", label="exact chunked, float32")
    axis.loglog(steps, [r["one_tape_f32"] for r in rows], "s--", label="one tape, float32")
    axis.set(
        xlabel="sequence length T",
        ylabel="relative error of the gradient vs float64",
        title=f"float32 drift, GRU {UNITS}, chunks of {CHUNK}",
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=positive_int,
        nargs="+",
        default=[1000, 3000, 10000],
        metavar="T",
        help="sequence lengths, one row each (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        default=str(HERE / "drift"),
        help="path stem for the .md table and .png plot (default: benchmarks/drift)",
    )
    args = parser.parse_args()
    rows = []
    for steps in args.steps:
        rows.append(measure(steps))
        print(f"T={steps}: {rows[-1]}", flush=True)
    text = table(rows)
    print("\nRelative error |g - g64| / |g64| of the gradient against one float64 tape\n")
    print(text)
    Path(args.out + ".md").write_text(
        "Relative error |g - g64| / |g64| of the weight gradient against one float64 tape over "
        "the whole sequence\n(`python benchmarks/drift.py`).\n\n" + text + "\n"
    )
    try:
        plot(rows, Path(args.out + ".png"))
    except ImportError:
        print("matplotlib is not installed: no plot.")


if __name__ == "__main__":
    main()

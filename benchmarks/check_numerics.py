"""What check_numerics=True costs: exact chunked step time with the check off and on.

    python benchmarks/check_numerics.py [--steps 1000] [--repeats 7]

Seed 001's set-up (B=34, F=200, GRU 64+32, Dense 3, chunk_size=100). The two chains share their
weights and run alternately in one process, so machine noise hits both alike; the table gives
the median step time of each and their ratio.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from harness import positive_int  # noqa: E402 (benchmarks/ is the script folder)

import tbptt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=positive_int, default=1000, help="sequence length T (default: 1000)"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=7,
        help="timed steps of each setting after the warm-up (default: 7)",
    )
    args = parser.parse_args()
    rng = np.random.RandomState(0)
    x = rng.randn(34, args.steps, 200).astype("float32")
    y = rng.randn(34, args.steps, 3).astype("float32")
    loss_fn = keras.losses.MeanSquaredError()
    # Chunk by chunk both (check_numerics runs so, to name the chunk): the check's own cost.
    off = tbptt.StatefulGRUChain(
        (64, 32), head=keras.layers.Dense(3), chunk_size=100, memory_budget=None
    )
    off.build(x.shape)
    on = tbptt.RecurrentChain(off.cells, head=off.head, chunk_size=100, check_numerics=True)
    times = {"off": [], "on": []}
    for chain in (off, on):  # warm-up: tracing
        chain.value_and_gradients(x, y, loss_fn).loss.numpy()
    for _ in range(args.repeats):
        for name, chain in (("off", off), ("on", on)):
            start = time.perf_counter()
            chain.value_and_gradients(x, y, loss_fn).loss.numpy()
            times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    print(f"T={args.steps}, {args.repeats} steps each, median step time")
    print("| check_numerics | step (s) | ratio |\n| --- | ---: | ---: |")
    print(f"| False | {median['off']:.3f} | 1.00 |")
    print(f"| True | {median['on']:.3f} | {median['on'] / median['off']:.2f} |")


if __name__ == "__main__":
    main()

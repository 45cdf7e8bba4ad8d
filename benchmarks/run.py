"""Step time and peak memory of exact/truncated chunked BPTT against one-tape full BPTT.

Reference set-up (DESIGN §6, seed 001): B=34, F=200, GRU 64+32, Dense 3, L1 loss.
Each (method, T) runs in its own process, so peak RSS is that method's alone; times are medians
of several steps after a warm-up step (which includes tracing). Compare ratios from one run: the
machines are shared and noisy.

    python benchmarks/run.py --quick          # T = 1000, 2000
    python benchmarks/run.py --lengths 1000 4000 16000

Writes benchmarks/results.md (a markdown table) and benchmarks/results.png.
"""

import argparse
import json

from harness import markdown_table, measure, run_worker, save  # noqa: E402 (benchmarks/ is the script folder)

METHODS = ("full_bptt", "exact_eager", "exact_graph", "truncated")
BATCH, FEATURES, UNITS, LABELS, CHUNK = 34, 200, (64, 32), 3, 100


def l1(y_true, y_pred):
    import tensorflow as tf
    return tf.reduce_sum(tf.abs(y_true - y_pred))


def make_step(method: str):
    """A training-gradient function for `method`: (x, y) -> (loss, grads)."""
    import keras
    import tensorflow as tf

    import tbptt
    if method == "full_bptt":
        model = keras.Sequential([keras.layers.GRU(UNITS[0], return_sequences=True),
                                  keras.layers.GRU(UNITS[1], return_sequences=True),
                                  keras.layers.Dense(LABELS)])

        @tf.function(reduce_retracing=True)
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = l1(y, model(x, training=True))
            return loss, tape.gradient(loss, model.trainable_variables)
        return step
    mode = "truncated" if method == "truncated" else "exact"
    backend = "graph" if method == "exact_graph" else "eager"
    chain = tbptt.StatefulGRUChain(UNITS, head=keras.layers.Dense(LABELS), chunk_size=CHUNK,
                                   mode=mode, backend=backend)
    return lambda x, y: chain.value_and_gradients(x, y, l1)[:2]


def worker(method: str, steps: int, repeats: int) -> dict:
    import numpy as np
    import tensorflow as tf
    rng = np.random.RandomState(0)
    x = tf.constant(rng.randn(BATCH, steps, FEATURES).astype("float32"))
    y = tf.constant(rng.randn(BATCH, steps, LABELS).astype("float32"))
    step = make_step(method)
    return dict(measure(lambda: step(x, y), repeats), method=method, T=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 1000, 2000 only")
    parser.add_argument("--lengths", type=int, nargs="*", default=[1000, 2000, 4000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, steps, repeats = args.worker
        print(json.dumps(worker(method, int(steps), int(repeats))))
        return
    lengths = [1000, 2000] if args.quick else args.lengths
    rows = []
    for steps in lengths:
        for method in METHODS:
            rows.append(dict(run_worker(__file__, method, steps, args.repeats), method=method,
                             T=steps))
            print(json.dumps(rows[-1]), flush=True)
    save(rows, "results", markdown_table(rows, "T", "T", "full_bptt"), "T", METHODS, "T",
         xlog=True)


if __name__ == "__main__":
    main()

"""StageChain against one tape over the joined model, and the Jacobian method, per image size.

The seed's cats-vs-dogs CNN (Conv 32/32/64 with 'same' padding so that 10x10 images fit, Dense
64, Dropout 0.5, Dense 1 sigmoid), batch 32, 3 channels, split at Flatten. Every row runs in its
own process (peak RSS is its own), compiled with tf.function; times are medians. Every method
returns the parameter gradients and dL/dx (StageChain's `input_grad`).

    python benchmarks/stages.py            # sizes 10, 32, 64

Writes benchmarks/results/stages.md and stages.png; with --update-readme also the documentation's
table and the tracked benchmarks/stages.md.
"""

import argparse
import json

from harness import markdown_table, measure, positive_int, run_worker, save  # noqa: E402 (benchmarks/ is the script folder)

METHODS = ("joined_tape", "stage_chain", "stage_chain_recompute", "jacobian")
BATCH = 32
JACOBIAN_SIZES = (10,)  # beyond this the Jacobians do not fit in memory on 24 GB


def model(size: int):
    import keras

    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((size, size, 3)),
            layers.Conv2D(32, 3, padding="same"),
            layers.Activation("relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same"),
            layers.Activation("relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same"),
            layers.Activation("relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(64),
            layers.Activation("relu"),
            layers.Dropout(0.5, seed=1),
            layers.Dense(1),
            layers.Activation("sigmoid"),
        ]
    )


def make_step(method: str, size: int):
    import keras
    import numpy as np
    import tensorflow as tf

    import tbptt

    rng = np.random.RandomState(0)
    x = tf.constant(rng.rand(BATCH, size, size, 3).astype("float32"))
    y = tf.constant(rng.randint(0, 2, (BATCH, 1)).astype("float32"))
    net, loss_fn = model(size), keras.losses.BinaryCrossentropy()
    if method == "joined_tape":

        @tf.function
        def step():  # dL/dx too, as StageChain returns it: the same work on both sides
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = loss_fn(y, net(x, training=True))
            return loss, tape.gradient(loss, [net.trainable_variables, x])

        return step
    stages = tbptt.split_sequential(net, at=[9])
    if method.startswith("stage_chain"):
        chain = tbptt.StageChain(stages, recompute=method.endswith("recompute"))
        return lambda: chain.value_and_gradients(x, y, loss_fn)[:2]

    @tf.function
    def jacobian_step():  # the seed thread's answer: Jacobians contracted with reduce_sum
        with tf.GradientTape(persistent=True) as tape:
            middle = stages[0](x, training=True)
            loss = loss_fn(y, stages[1](middle, training=True))
        upstream = tape.gradient(loss, middle)
        grads = tape.gradient(loss, stages[1].trainable_variables)
        for variable in stages[0].trainable_variables:
            jac = tape.jacobian(middle, variable)
            grads.append(tf.tensordot(upstream, jac, axes=len(middle.shape)))
        return loss, grads

    return jacobian_step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        type=positive_int,
        nargs="*",
        default=[10, 32, 64],
        metavar="PIXELS",
        help="image sizes, one row per method each (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=7,
        help="timed steps per row after the warm-up (default: 7)",
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="also put the table in docs/benchmarks.md and benchmarks/stages.md",
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, size, repeats = args.worker
        result = measure(make_step(method, int(size)), int(repeats))
        print(json.dumps(dict(result, method=method, size=int(size))))
        return
    rows = []
    for size in args.sizes:
        for method in METHODS:
            if method == "jacobian" and size not in JACOBIAN_SIZES:
                rows.append(
                    {
                        "method": method,
                        "size": size,
                        "skipped": "does not fit: Jacobians of (activation x parameters)",
                    }
                )
                continue
            repeats = min(args.repeats, 2) if method == "jacobian" else args.repeats  # ~15 s each
            row = dict(run_worker(__file__, method, size, repeats), method=method, size=size)
            rows.append(row)
            print(json.dumps(row), flush=True)
    save(
        rows,
        "stages",
        markdown_table(rows, "size", "image", "joined_tape", ms=True),
        "size",
        METHODS,
        "image size",
        update_readme=args.update_readme,
    )


if __name__ == "__main__":
    main()

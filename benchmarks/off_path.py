"""tbptt's exact gradient off the stock path: per-step flags and cells without a written-out
backward, beside the same step without flags and one Keras tape, in one process.

Seed 001's set-up (B=34, F=200, two stacked layers of 64 and 32 units, a Dense(3) head, L1 loss
summed over the steps, chunks of 100), T=1000 unless --steps says otherwise. Every row of a
group starts from the same weights and inputs and prints its loss, so the rows can be seen to
compute the same thing; the rows run round-robin (one step of each in turn) and the table gives
the median step time and the ratio to the group's reference:

  flags   GRU: exact without flags (the reference), with a padding mask (each row a random
          length between T/2 and T), with episode resets (1 step in 200), and one Keras tape
          over keras.layers.GRU with the same mask
  relu    GRUCell(activation="relu"): exact beside one Keras tape (the reference)
  simple  SimpleRNNCell: exact beside one Keras tape (the reference)
  large_gru, large_lstm   B=128, F=128, one layer of 512 units (matmul-bound): one Keras tape
          (the reference), exact in chunks of 100, exact with memory_budget=4 GB (the chunk
          plan keeps what fits: here one chunk, so no second forward), truncated m=1

    python benchmarks/off_path.py                      # T = 1000, 7 repeats (large: 3)
    python benchmarks/off_path.py --groups flags --repeats 3

Writes benchmarks/results/off_path.md; with --update-readme also the documentation's table and
benchmarks/off_path.md.
"""

import argparse
import os
import statistics
import time

import numpy as np
from harness import positive_int, replace_in_readme, save  # noqa: E402
from peers import force  # noqa: E402 (a step's loss and gradients, waited for)

SETUP = {"batch": 34, "features": 200, "units": (64, 32), "labels": 3, "chunk": 100}
GROUPS = ("flags", "relu", "simple", "large_gru", "large_lstm")
LARGE = {"batch": 128, "features": 128, "units": (512,)}


def weighted_l1(y_true, y_pred, sample_weight=None):
    import tensorflow as tf

    error = tf.abs(y_true - y_pred)
    if sample_weight is not None:
        error *= tf.cast(sample_weight, error.dtype)[..., None]
    return tf.reduce_sum(error)


def make_cells(kind: str, units=SETUP["units"]):
    import keras

    if kind == "simple":
        return [keras.layers.SimpleRNNCell(u) for u in units]
    if kind == "lstm":
        return [keras.layers.LSTMCell(u) for u in units]
    activation = {"relu": "relu"}.get(kind, "tanh")
    return [keras.layers.GRUCell(u, activation=activation) for u in units]


def keras_tape_step(
    kind: str, weights: list, mask=None, units=SETUP["units"], features=SETUP["features"]
):
    """One tf.GradientTape over Keras RNN layers of the same cells and weights."""
    import keras
    import tensorflow as tf

    layer = {"simple": keras.layers.SimpleRNN, "lstm": keras.layers.LSTM}.get(
        kind, keras.layers.GRU
    )
    activation = "relu" if kind == "relu" else "tanh"
    rnns = [layer(u, return_sequences=True, activation=activation) for u in units]
    head = keras.layers.Dense(SETUP["labels"])
    model = keras.Sequential([keras.Input([None, features])] + rnns + [head])
    model.set_weights(weights)

    @tf.function(reduce_retracing=True)
    def step(x, y, mask):
        with tf.GradientTape() as tape:
            h = x
            for rnn in rnns:
                h = rnn(h, mask=mask, training=True)
            loss = weighted_l1(y, head(h), mask)
        return loss, tape.gradient(loss, model.trainable_variables)

    return lambda x, y: step(x, y, mask)


def group_steps(group: str, x, rng) -> dict:
    """name -> step(x, y) for one group, all from the weights of one tbptt chain; the
    reference's name first."""
    import keras

    import tbptt

    kind = {"flags": "gru", "large_gru": "gru", "large_lstm": "lstm"}.get(group, group)
    units = LARGE["units"] if group.startswith("large") else SETUP["units"]
    keras.utils.set_random_seed(0)
    chain = tbptt.RecurrentChain(
        make_cells(kind, units),
        head=keras.layers.Dense(SETUP["labels"]),
        chunk_size=SETUP["chunk"],
        memory_budget=None,  # "tbptt exact": the least memory; the budget row sets its own
    )
    chain.build(x.shape)
    weights = [v.numpy() for v in chain.trainable_variables]

    def exact(**flags):
        return lambda x, y: chain.value_and_gradients(x, y, weighted_l1, **flags)[:2]

    if group.startswith("large"):
        budget = chain.with_config(chunk_size="auto", memory_budget=4 * 2**30)
        truncated = chain.with_config(mode="truncated")
        return {
            "keras tape": keras_tape_step(kind, weights, units=units, features=x.shape[-1]),
            "tbptt exact": exact(),
            "tbptt exact, memory_budget=4GB": lambda x, y: budget.value_and_gradients(
                x, y, weighted_l1
            )[:2],
            "tbptt truncated m=1": lambda x, y: truncated.value_and_gradients(x, y, weighted_l1)[
                :2
            ],
        }
    if group != "flags":
        return {"keras tape": keras_tape_step(kind, weights), "tbptt exact": exact()}
    batch, steps = x.shape[:2]
    lengths = rng.integers(steps // 2, steps + 1, size=batch)
    mask = np.arange(steps)[None] < lengths[:, None]
    reset = rng.random([batch, steps]) < 1 / 200
    return {
        "tbptt exact": exact(),
        "tbptt exact, mask": exact(mask=mask),
        "tbptt exact, reset": exact(reset=reset),
        "keras tape, mask": keras_tape_step(kind, weights, mask),
    }


def round_robin(steps: dict, x, y, repeats: int) -> dict:
    losses = {name: force(step(x, y)) for name, step in steps.items()}  # warm-up
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            force(step(x, y))
            times[name].append(time.perf_counter() - start)
    return {name: {"time": statistics.median(times[name]), "loss": losses[name]} for name in steps}


def table(rows: list) -> str:
    lines = [
        "| group | T | method | step (s) | x reference | x tbptt exact | loss |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        same = [r for r in rows if (r["group"], r["T"]) == (row["group"], row["T"])]
        exact = next(r["time"] for r in same if r["method"] == "tbptt exact")
        lines.append(
            f"| {row['group']} | {row['T']} | {row['method']} | {row['time']:.3f} | "
            f"{row['time'] / same[0]['time']:.2f} | {row['time'] / exact:.2f} | "
            f"{row['loss']:.6g} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        nargs="+",
        default=[1000],
        metavar="T",
        help="sequence lengths (default: %(default)s)",
    )
    parser.add_argument(
        "--groups",
        nargs="+",
        default=list(GROUPS),
        choices=GROUPS,
        help="the groups to run (default: all)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=7,
        help="timed rounds after the warm-up, at most 3 for the large groups "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="also put the table in docs/benchmarks.md and benchmarks/off_path.md",
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    rows = []
    for group in args.groups:
        for steps in args.steps:
            rng = np.random.default_rng(0)
            shape = LARGE if group.startswith("large") else SETUP
            x = rng.normal(size=[shape["batch"], steps, shape["features"]]).astype("float32")
            y = rng.normal(size=[shape["batch"], steps, SETUP["labels"]]).astype("float32")
            repeats = min(args.repeats, 3) if group.startswith("large") else args.repeats
            measured = round_robin(group_steps(group, x, rng), x, y, repeats)
            for method, result in measured.items():
                rows.append(dict(result, group=group, T=steps, method=method))
                print(rows[-1], flush=True)
    text = table(rows)
    save(rows, "off_path", text, None, None, None, plot_fn=lambda path: None)
    if args.update_readme:
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "off_path.md"), "w") as f:
            f.write(text + "\n")
        replace_in_readme("off_path", text)


if __name__ == "__main__":
    main()

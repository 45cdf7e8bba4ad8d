"""Where the matrix products dominate: tbptt beside Keras on models whose per-step products
are large, in one process, round-robin, with each row's share of the machine's peak.

Groups (`--groups`, default all):

  charlm     a streaming character model: 97 symbols one-hot, GRU 256, Dense(97) logits,
             B=32 streams, windows of 128 steps, 8 windows an epoch, SGD;
             `ChunkedModel(stateful=True).fit` in chunks of 32 beside Keras's
             `GRU(stateful=True)` fit on the same windows (the same gradient: exact within a
             window, the state carried)
  charlm_emb the same with `Embedding(97, 64)` in front (ids in, not one-hot)
  large_gru  B=128, F=128, one GRU of 512 units, Dense(3), T=1000, L1 loss: one gradient
             step, `value_and_gradients` beside one Keras tape
  large_lstm the same with an LSTM
  wordlm     V=50,000, Embedding 256, GRU 512, Dense(V) logits, B=32, windows of 128, SGD:
             `ChunkedModel(stateful=True).fit` beside Keras's stateful model, per window

Each tbptt group runs "before" (the options that were the defaults before memory_budget had
one: `memory_budget=None`, every chunk but the last recomputed; for wordlm
`embedding_grads="dense"`) beside the defaults. GFLOP/s counts the useful matrix work of a
step from the shapes (forward and backward; a recompute is not counted, so it shows as a
lower rate) and "% peak" divides by one 2048x2048 float32 matmul measured in the same process.
Rows run round-robin and the table gives each row's fastest repeat (stalls of a fraction of a
second land on random repeats of every row on shared machines). `--memory` instead runs each
row of a group in a process of its own and reports its peak RSS.

    python benchmarks/large_products.py                       # every group, 5 repeats
    python benchmarks/large_products.py --groups charlm large_gru --repeats 3
    python benchmarks/large_products.py --groups wordlm --memory
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from harness import force, matmul_gflops, positive_int

GROUPS = ("charlm", "charlm_emb", "large_gru", "large_lstm", "wordlm")
CHAR = {"symbols": 97, "units": 256, "batch": 32, "window": 128, "chunk": 32, "windows": 8}
LARGE = {"batch": 128, "features": 128, "units": 512, "labels": 3, "steps": 1000, "chunk": 100}
WORD = {"vocabulary": 50_000, "width": 256, "units": 512, "batch": 32, "window": 128}
GATES = {"gru": 3, "lstm": 4}


def step_flops(batch, steps, inputs, units, outputs, gates, input_matmul=True) -> float:
    """Useful matmul FLOPs of a training step of one recurrent layer and a dense head: the
    forward (input projection, recurrent products, head) and the backward (both operands'
    gradients of each product, but not the data's)."""
    projection = 2 * batch * steps * inputs * gates * units if input_matmul else 0
    recurrent = 2 * batch * steps * units * gates * units
    head = 2 * batch * steps * units * outputs
    return (projection + recurrent + head) + (projection + 2 * recurrent + 2 * head)


# -- the models ----------------------------------------------------------------------------------


def char_data(embedded: bool, windows: int, vocabulary: int, window: int, batch: int):
    """Inputs (one-hot, or ids) and next-symbol targets ``[batch * windows, window, ...]``,
    batch j+1 continuing batch j row by row."""
    rng = np.random.default_rng(0)
    text = rng.integers(0, vocabulary, size=[batch, windows * window + 1])
    text[:, 1::2] = (text[:, :-1:2] * 7 + 3) % vocabulary
    ids = text[:, :-1].reshape(batch, windows, window).transpose(1, 0, 2).reshape(-1, window)
    y = text[:, 1:].reshape(batch, windows, window).transpose(1, 0, 2).reshape(-1, window)
    x = ids if embedded else np.eye(vocabulary, dtype="float32")[ids]
    return x, y


def stateful_pair(vocabulary, width, units, batch, window, embedded: bool, options: dict):
    """``{name: compiled model}``: Keras's stateful model and the tbptt rows, same weights."""
    import keras

    import tbptt

    front = [keras.layers.Embedding(vocabulary, width)] if embedded else []
    shape = (batch, window) if embedded else (batch, window, vocabulary)
    reference = keras.Sequential(
        [keras.Input(batch_shape=shape)]
        + front
        + [
            keras.layers.GRU(units, return_sequences=True, stateful=True),
            keras.layers.Dense(vocabulary),
        ]
    )
    weights = [v.numpy() for v in reference.trainable_variables]
    models = {"keras stateful": reference}
    for name, extra in options.items():
        chain = tbptt.RecurrentChain(
            [keras.layers.GRUCell(units)],
            head=keras.layers.Dense(vocabulary),
            inputs_layer=keras.layers.Embedding(vocabulary, width) if embedded else None,
            chunk_size=extra.pop("chunk_size", window),
            **extra,
        )
        chain.build([None, None] if embedded else [None, None, vocabulary])
        for variable, value in zip(chain.trainable_variables, weights):
            variable.assign(value)
        models[name] = tbptt.keras.ChunkedModel(chain, stateful=True)
    for model in models.values():
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    return models


def fit_epoch(model, x, y, batch):
    def run():
        history = model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        for layer in model.layers:  # each epoch from a zero state, as ChunkedModel's fit does
            if getattr(layer, "stateful", False):
                layer.reset_state()
        return history.history["loss"][-1]

    return run


def char_rows(embedded: bool):
    c = CHAR
    x, y = char_data(embedded, c["windows"], c["symbols"], c["window"], c["batch"])
    options = {
        "tbptt before (memory_budget=None)": {"chunk_size": c["chunk"], "memory_budget": None},
        "tbptt defaults": {"chunk_size": c["chunk"]},
    }
    models = stateful_pair(c["symbols"], 64, c["units"], c["batch"], c["window"], embedded, options)
    inputs = 64 if embedded else c["symbols"]
    flops = c["windows"] * step_flops(
        c["batch"], c["window"], inputs, c["units"], c["symbols"], 3, input_matmul=True
    )
    steps = {name: fit_epoch(m, x, y, c["batch"]) for name, m in models.items()}
    return steps, flops, "s / epoch"


def word_rows():
    w = WORD
    x, y = char_data(True, 2, w["vocabulary"], w["window"], w["batch"])
    options = {
        'tbptt before (embedding_grads="dense", memory_budget=None)': {
            "embedding_grads": "dense",
            "memory_budget": None,
        },
        "tbptt defaults": {},
    }
    models = stateful_pair(
        w["vocabulary"], w["width"], w["units"], w["batch"], w["window"], True, options
    )
    flops = step_flops(w["batch"], w["window"], w["width"], w["units"], w["vocabulary"], 3)
    steps = {name: _per_window(fit_epoch(m, x, y, w["batch"]), 2) for name, m in models.items()}
    return steps, flops, "s / window"


def _per_window(run, windows):
    def step():
        start = time.perf_counter()
        loss = run()
        return loss, (time.perf_counter() - start) / windows

    step.per_window = True
    return step


def large_rows(cell: str):
    import keras
    import tensorflow as tf

    import tbptt

    s = LARGE
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=[s["batch"], s["steps"], s["features"]]), tf.float32)
    y = tf.constant(rng.normal(size=[s["batch"], s["steps"], s["labels"]]), tf.float32)
    make = keras.layers.GRUCell if cell == "gru" else keras.layers.LSTMCell

    def l1(y_true, y_pred):
        return tf.reduce_sum(tf.abs(y_true - y_pred))

    keras.utils.set_random_seed(0)
    chain = tbptt.RecurrentChain(
        [make(s["units"])], head=keras.layers.Dense(s["labels"]), chunk_size=s["chunk"]
    )
    chain.build(x.shape)
    rnn = (keras.layers.GRU if cell == "gru" else keras.layers.LSTM)(
        s["units"], return_sequences=True
    )
    head = keras.layers.Dense(s["labels"])
    model = keras.Sequential([keras.Input([None, s["features"]]), rnn, head])
    model.set_weights([v.numpy() for v in chain.trainable_variables])

    @tf.function
    def keras_tape():
        with tf.GradientTape() as tape:
            loss = l1(y, model(x, training=True))
        return loss, tape.gradient(loss, model.trainable_variables)

    def tbptt_step(**options):
        configured = chain.with_config(**options) if options else chain
        return lambda: configured.value_and_gradients(x, y, l1)[:2]

    steps = {
        "keras tape": keras_tape,
        "tbptt before (memory_budget=None)": tbptt_step(memory_budget=None),
        "tbptt defaults": tbptt_step(),
        "tbptt memory_budget=4e9": tbptt_step(memory_budget=4e9),
        "tbptt truncated m=1": tbptt_step(mode="truncated"),
    }
    flops = step_flops(s["batch"], s["steps"], s["features"], s["units"], s["labels"], GATES[cell])
    return steps, flops, "s / step"


def rows_of(group: str):
    if group in ("charlm", "charlm_emb"):
        return char_rows(group == "charlm_emb")
    if group == "wordlm":
        return word_rows()
    return large_rows(group.split("_")[1])


# -- measuring -----------------------------------------------------------------------------------


def timed(step) -> tuple:
    start = time.perf_counter()
    result = step()
    force(result)
    seconds = time.perf_counter() - start
    if getattr(step, "per_window", False):
        result, seconds = result
    return seconds, result


def round_robin(steps: dict, repeats: int) -> dict:
    for step in steps.values():  # warm-up: tracing and compiling
        timed(step)
    times = {name: [] for name in steps}
    losses = {}
    for _ in range(repeats):
        for name, step in steps.items():
            seconds, result = timed(step)
            times[name].append(seconds)
            losses[name] = result
    return {
        name: {
            "time": min(times[name]),
            "median": statistics.median(times[name]),
            "loss": _loss(losses[name]),
        }
        for name in steps
    }


def _loss(result) -> float:
    """The loss a step returned (a fit epoch's, or `value_and_gradients`' first output): the
    rows of a group start from the same weights, so these agree."""
    first = result[0] if isinstance(result, (list, tuple)) else result
    return float(first.numpy() if hasattr(first, "numpy") else first)


def table(group: str, results: dict, flops: float, unit: str, peak: float) -> str:
    lines = [
        f"| group | method | {unit} (fastest) | median | x first row | GFLOP/s | % peak | loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = next(iter(results.values()))["time"]
    for name, r in results.items():
        rate = flops / r["time"] / 1e9
        lines.append(
            f"| {group} | {name} | {r['time']:.3f} | {r['median']:.3f} | {r['time'] / base:.2f} |"
            f" {rate:.0f} | {100 * rate / peak:.0f}% | {r['loss']:.5g} |"
        )
    return "\n".join(lines)


def memory_row(group: str, name: str) -> dict:
    """In a worker process: one row's step, run three times, and the process's peak RSS."""
    import resource

    steps, _, _ = rows_of(group)
    step = steps[name]
    for _ in range(3):
        timed(step)
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS))
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed rounds (default: %(default)s)"
    )
    parser.add_argument("--memory", action="store_true", help="peak RSS, one process per row")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.worker:
        print(json.dumps(memory_row(*args.worker)))
        return
    if args.memory:
        import subprocess

        for group in args.groups:
            names = list(rows_of(group)[0])
            print("| group | method | peak RSS (MB) |\n| --- | --- | ---: |")
            for name in names:
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", group, name],
                    capture_output=True,
                    text=True,
                    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                )
                peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
                print(f"| {group} | {name} | {peak:.0f} |")
        return
    peak = matmul_gflops()
    print(f"peak: {peak:.0f} GFLOP/s (one 2048x2048 float32 matmul)\n")
    for group in args.groups:
        steps, flops, unit = rows_of(group)
        print(table(group, round_robin(steps, args.repeats), flops, unit, peak) + "\n")


if __name__ == "__main__":
    main()

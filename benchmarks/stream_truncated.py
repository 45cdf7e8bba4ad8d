"""Streaming TBPTT(K, mK) with `ChunkedModel(stateful=True).fit`, beside TBPTT(K, K) and Keras's
`GRU(stateful=True)`, seconds per epoch, in one process.

B=32 streams of 4000 steps, F=32, GRU 64, a Dense(1) head, MSE, SGD, chunks of K=100. Every
row trains one epoch in turn (round-robin) from its own copy of the same weights, the first
epoch not timed; the table gives each row's fastest epoch (on a shared machine, stalls of a
fraction of a second land on random epochs: the minimum is what the row costs), its ratio to
tbptt's TBPTT(K, K), and its last epoch's loss (rows with the same gradient agree).

With m >= 2 each window re-runs the last m-1 chunks of the previous one in front of it (with
this step's weights), so that its losses reach m chunks back: a window of n new chunks runs
n + m - 1 chunks forward and pulls each new chunk's loss back through m of them (the context's
own loss, and the cotangents no loss sent, are skipped). TBPTT(K, mK) therefore costs about m
times TBPTT(K, K) at windows of one chunk, less at longer windows. Keras's stateful layer
carries only the state across windows: TBPTT(W, W) for windows of W steps.

    python benchmarks/stream_truncated.py              # 9 timed epochs of each row
    python benchmarks/stream_truncated.py --update-readme   # also the documentation's table
    python benchmarks/stream_truncated.py --show-times      # and every epoch's time
"""

import argparse
import gc
import os
import time

import numpy as np
from harness import positive_int, replace_in_readme  # noqa: E402

B, F, UNITS, K, STEPS = 32, 32, 64, 100, 4000


def data(window: int):
    """``[B * windows, window, ...]`` laid out so that batch j+1 continues batch j row by row."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=[B, STEPS, F]).astype("float32")
    y = np.cumsum(x[..., :1], axis=1) / 30.0  # a target that needs memory
    windows = STEPS // window

    def laid_out(a):
        return (
            a.reshape(B, windows, window, -1).transpose(1, 0, 2, 3).reshape(-1, window, a.shape[-1])
        )

    return laid_out(x), laid_out(y.astype("float32"))


def keras_model(window: int, weights):
    import keras

    model = keras.Sequential(
        [
            keras.Input(batch_shape=(B, window, F)),
            keras.layers.GRU(UNITS, return_sequences=True, stateful=True),
            keras.layers.Dense(1),
        ]
    )
    model.set_weights(weights)
    return model


def tbptt_model(m: int, weights):
    import keras

    import tbptt

    chain = tbptt.RecurrentChain(
        [keras.layers.GRUCell(UNITS)],
        head=keras.layers.Dense(1),
        chunk_size=K,
        mode="truncated",
        backprop_chunks=m,
    )
    chain.build([None, None, F])
    for variable, value in zip(chain.trainable_variables, weights):
        variable.assign(value)
    return tbptt.keras.ChunkedModel(chain, stateful=True)


def rows(weights) -> list:
    """(name, model, window, what it computes)."""
    return [
        ("tbptt, m=1", tbptt_model(1, weights), K, "TBPTT(K, K)"),
        ("tbptt, m=2", tbptt_model(2, weights), K, "TBPTT(K, 2K)"),
        ("tbptt, m=4", tbptt_model(4, weights), K, "TBPTT(K, 4K)"),
        ("tbptt, m=4, windows of 4 chunks", tbptt_model(4, weights), 4 * K, "TBPTT(K, 4K)"),
        ("Keras GRU(stateful=True)", keras_model(K, weights), K, "TBPTT(K, K)"),
        (
            "Keras GRU(stateful=True), windows of 4K",
            keras_model(4 * K, weights),
            4 * K,
            "TBPTT(4K, 4K)",
        ),
    ]


def one_epoch(model, x, y) -> tuple:
    """``(seconds, the epoch's loss)``, Python's garbage collector run before, not during it
    (as `timeit` does: a full collection over the traced graphs' objects takes a while)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        history = model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
        seconds = time.perf_counter() - start
    finally:
        gc.enable()
    for layer in model.layers:  # each epoch from a zero state, as ChunkedModel's fit does
        if getattr(layer, "stateful", False):
            layer.reset_state()
    return seconds, history.history["loss"][-1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=9,
        help="timed epochs of each row, after one that is not (default: %(default)s)",
    )
    parser.add_argument(
        "--update-readme", action="store_true", help="put the table in docs/benchmarks.md"
    )
    parser.add_argument(
        "--show-times", action="store_true", help="also print every epoch's time, row by row"
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(0)
    table = rows(initial_weights())
    datasets = {window: data(window) for window in {window for _, _, window, _ in table}}
    for _, model, _, _ in table:
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    times, losses = {name: [] for name, _, _, _ in table}, {}
    for round_ in range(args.epochs + 1):
        for name, model, window, _ in table:
            seconds, losses[name] = one_epoch(model, *datasets[window])
            if round_:
                times[name].append(seconds)
    if args.show_times:
        print({name: [round(t, 3) for t in ts] for name, ts in times.items()})
    reference = min(times[table[0][0]])
    lines = [
        "| method | gradient | s / epoch | x TBPTT(K, K) | last epoch's loss |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, _, _, what in table:
        seconds = min(times[name])
        lines.append(
            f"| {name} | {what} | {seconds:.3f} | {seconds / reference:.2f} | {losses[name]:.5f} |"
        )
    print("\n".join(lines))
    if args.update_readme:  # the tracked copy beside the script, as the other benchmarks keep
        with open(
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "stream_truncated.md"), "w"
        ) as f:
            f.write("\n".join(lines) + "\n")
        replace_in_readme("stream_truncated", "\n".join(lines))


def initial_weights() -> list:
    """Keras's initial weights of the model, in the order of both models' variables."""
    import keras

    model = keras.Sequential(
        [keras.Input(batch_shape=(B, K, F)), keras.layers.GRU(UNITS), keras.layers.Dense(1)]
    )
    return model.get_weights()


if __name__ == "__main__":
    main()

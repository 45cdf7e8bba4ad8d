"""A stateful language model over a stream: `ChunkedModel(stateful=True).fit` beside Keras's
`GRU(stateful=True)` on the same windows, seconds per epoch.

A character model's set-up: 97 symbols one-hot, GRU 256, a Dense(97) softmax head, B=32
parallel streams cut into windows of 128 steps (batch j+1 continues batch j row by row), SGD,
the exact gradient within each window (the state, not the gradient, crosses windows: what
Keras's stateful layer trains). tbptt runs each window in chunks of 32 steps, and in one chunk
of 128 (the whole window fits in memory: the cost of one tape). Both start from the same
weights; the table gives each one's median epoch time over the epochs after the first (which
compiles) and its last epoch's loss, which agree.

    python benchmarks/stream_fit.py                    # 20 windows per epoch, 4 epochs
"""

import argparse
import os
import statistics
import time

import numpy as np
from harness import positive_int  # noqa: E402

SYMBOLS, UNITS, BATCH, WINDOW = 97, 256, 32, 128


def data(windows: int):
    """One-hot inputs and next-symbol targets ``[B * windows, WINDOW, ...]`` laid out so that
    batch j+1 continues batch j row by row."""
    rng = np.random.default_rng(0)
    text = rng.integers(0, SYMBOLS, size=[BATCH, windows * WINDOW + 1])
    text[:, 1::2] = (text[:, :-1:2] * 7 + 3) % SYMBOLS  # something to learn
    ids, targets = text[:, :-1], text[:, 1:]
    x = np.eye(SYMBOLS, dtype="float32")[ids]
    # [B, windows * W] -> [windows * B, W]: window j of every row, then window j+1
    x = (
        x.reshape(BATCH, windows, WINDOW, SYMBOLS)
        .transpose(1, 0, 2, 3)
        .reshape(-1, WINDOW, SYMBOLS)
    )
    y = targets.reshape(BATCH, windows, WINDOW).transpose(1, 0, 2).reshape(-1, WINDOW)
    return x, y


def keras_model():
    import keras

    model = keras.Sequential(
        [
            keras.Input(batch_shape=(BATCH, WINDOW, SYMBOLS)),
            keras.layers.GRU(UNITS, return_sequences=True, stateful=True),
            keras.layers.Dense(SYMBOLS),
        ]
    )
    return model


def tbptt_model(chunk: int, weights: list):
    import keras

    import tbptt

    chain = tbptt.RecurrentChain(
        [keras.layers.GRUCell(UNITS)], head=keras.layers.Dense(SYMBOLS), chunk_size=chunk
    )
    chain.build([None, None, SYMBOLS])
    for variable, value in zip(chain.trainable_variables, weights):
        variable.assign(value)
    return tbptt.keras.ChunkedModel(chain, stateful=True)


def epochs(model, x, y, count: int) -> tuple:
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    times, loss = [], None
    for _ in range(count):
        start = time.perf_counter()
        history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        times.append(time.perf_counter() - start)
        loss = history.history["loss"][-1]
        for layer in model.layers:  # each epoch from a zero state, as ChunkedModel's fit does
            if getattr(layer, "stateful", False):
                layer.reset_state()
    return statistics.median(times[1:]), loss


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--windows", type=positive_int, default=20, help="windows per epoch (default: %(default)s)"
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=4,
        help="epochs, the first one not timed (default: %(default)s)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(0)
    x, y = data(args.windows)
    reference = keras_model()
    weights = [v.numpy() for v in reference.trainable_variables]
    rows = [("Keras GRU(stateful=True)", *epochs(reference, x, y, args.epochs))]
    for chunk in (32, WINDOW):
        rows.append(
            (
                f"tbptt ChunkedModel(stateful=True), chunks of {chunk}",
                *epochs(tbptt_model(chunk, weights), x, y, args.epochs),
            )
        )
    print("| method | s / epoch | x Keras | last epoch's loss |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds, loss in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / rows[0][1]:.2f} | {loss:.4f} |")


if __name__ == "__main__":
    main()

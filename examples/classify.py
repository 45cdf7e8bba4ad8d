"""One label per sequence (many-to-one) over chunks, beside a one-tape Keras model.

Each sequence's label is written in its first steps only (a one-hot of the class in the first
features of steps 0-4; those features are silent afterwards and the others are noise), and the
label is predicted at the sequence's last real step, 60 to 120 steps later; shorter sequences
are padded. Three runs start from the same weights (update gates leaning toward keeping the
state) and see the same batches:

  keras      keras.layers.GRU with the padding mask + Dense on the last output, one tape over
             the whole sequence (every step's activations kept)
  exact      tbptt.StatefulGRUChain, chunks of 20, mode="exact": the label at every step, only
             the last real step weighed (`sample_weight`), the mask keeping the state through
             the padding; one chunk's activations kept
  truncated  the same chain with mode="truncated", backprop_chunks=1: the gradient stops at
             the start of the last chunk, 20 steps or fewer back, and never reaches the steps
             that hold the label

exact and keras compute the same gradient (to float32 round-off), so their training losses stay
equal step after step; truncated learns only what the state happens to keep. Prints the
held-out loss and accuracy of each and the largest gap between a run's training loss and
keras's over the last 50 steps; plots the three training curves.

    python examples/classify.py                  # about a minute on 2 cores
    python examples/classify.py --steps 50 --plot ''
"""

import argparse
import os

import numpy as np

FEATURES, CLASSES, SIGNAL_STEPS, MAX_STEPS, NOISE = 8, 4, 5, 120, 0.5


def make_data(count: int, rng):
    """(x [N, T, F], labels [N], lengths [N]): padded sequences, zeros after each length."""
    lengths = rng.integers(MAX_STEPS // 2, MAX_STEPS + 1, size=count)
    labels = rng.integers(0, CLASSES, size=count)
    x = rng.normal(scale=NOISE, size=[count, MAX_STEPS, FEATURES]).astype("float32")
    x[:, :, :CLASSES] = 0.0  # the class features are silent after the first steps
    x[:, :SIGNAL_STEPS, :CLASSES] = np.eye(CLASSES, dtype="float32")[labels][:, None, :]
    x *= (np.arange(MAX_STEPS)[None, :] < lengths[:, None])[..., None]
    return x, labels, lengths


def chunked_batch(x, labels, lengths):
    """What the chain takes: the label at every step, weight 1 at the last real step only, and
    the mask that keeps the state through the padding."""
    steps = x.shape[1]
    targets = np.repeat(labels[:, None], steps, axis=1)
    last = np.zeros([len(labels), steps], "float32")
    last[np.arange(len(labels)), lengths - 1] = 1.0
    mask = np.arange(steps)[None, :] < lengths[:, None]
    return targets, last, mask


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--steps", type=int, default=400, help="training steps of each run (default: %(default)s)"
    )
    parser.add_argument("--batch", type=int, default=32, help="batch size (default: %(default)s)")
    parser.add_argument("--units", type=int, default=32, help="GRU units (default: %(default)s)")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=20,
        help="steps per chunk of the tbptt runs (default: %(default)s)",
    )
    parser.add_argument(
        "--plot",
        default="classify.png",
        help="where to save the training curves; '' for none (default: %(default)s)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    import tbptt

    rng = np.random.default_rng(0)
    train, test = make_data(args.steps * args.batch, rng), make_data(512, rng)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    summed = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

    keras.utils.set_random_seed(1)
    chains = {
        mode: tbptt.StatefulGRUChain(
            args.units, head=keras.layers.Dense(CLASSES), chunk_size=args.chunk_size, mode=mode
        )
        for mode in ("exact", "truncated")
    }
    chains["exact"].build(train[0][:1].shape)
    start = [v.numpy() for v in chains["exact"].trainable_variables]
    # The update gates start open toward keeping the state (z = sigmoid(bias) ~ 0.95), so that
    # a state set at the first steps is still there 100 steps on and a gradient can reach it.
    start[2][0, : args.units] = 3.0
    chains["truncated"].build(train[0][:1].shape)
    gru, dense = keras.layers.GRU(args.units), keras.layers.Dense(CLASSES)
    dense(gru(train[0][:1]))
    keras_variables = gru.trainable_variables + dense.trainable_variables
    for variables in (keras_variables, *(c.trainable_variables for c in chains.values())):
        for variable, value in zip(variables, start):
            variable.assign(value)

    @tf.function
    def keras_step(x, labels, mask):
        with tf.GradientTape() as tape:
            loss = cross_entropy(labels, dense(gru(x, mask=mask)))
        return loss, tape.gradient(loss, keras_variables)

    def chain_step(chain):
        def step(x, labels, lengths):
            targets, last, mask = chunked_batch(x, labels, lengths)
            result = chain.value_and_gradients(x, targets, summed, mask=mask, sample_weight=last)
            return result.loss / len(labels), [g / len(labels) for g in result.grads]

        return step

    runs = {
        "keras": (
            lambda x, labels, lengths: keras_step(x, labels, chunked_batch(x, labels, lengths)[2]),
            keras_variables,
        ),
        "exact": (chain_step(chains["exact"]), chains["exact"].trainable_variables),
        "truncated": (chain_step(chains["truncated"]), chains["truncated"].trainable_variables),
    }
    optimizers = {name: keras.optimizers.Adam(3e-3) for name in runs}
    curves = {name: [] for name in runs}
    for i in range(args.steps):
        batch = slice(i * args.batch, (i + 1) * args.batch)
        x, labels, lengths = (a[batch] for a in train)
        for name, (step, variables) in runs.items():
            loss, grads = step(x, labels, lengths)
            optimizers[name].apply_gradients(zip(grads, variables))
            curves[name].append(float(loss))

    x, labels, lengths = test
    mask = chunked_batch(x, labels, lengths)[2]
    logits = {"keras": dense(gru(x, mask=mask))}
    for name, chain in chains.items():
        outputs, _ = chain(x, mask=mask)
        logits[name] = tf.gather(outputs, lengths - 1, axis=1, batch_dims=1)
    print(
        f"{'run':<10} {'held-out loss':>14} {'accuracy':>9}   (chance: {1 / CLASSES:.2f}; "
        f"training-loss gap to keras over the last 50 steps)"
    )
    for name, values in logits.items():
        accuracy = float(np.mean(np.argmax(values, -1) == labels))
        gap = np.max(np.abs(np.subtract(curves[name], curves["keras"])[-50:]))
        print(
            f"{name:<10} {float(cross_entropy(labels, values)):>14.4f} {accuracy:>9.3f}   {gap:.2g}"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for name, curve in curves.items():
            plt.plot(curve, label=name, linestyle="--" if name == "exact" else "-")
        plt.xlabel("training step")
        plt.ylabel("training loss (cross-entropy at the last step)")
        plt.legend()
        plt.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

"""Seed 000: train a CNN split into two halves with separate tapes, exactly as the joined model.

(a) The thread's toy check: x (3, 10, 10, 1); stage 0 = Conv2D(6, 2, relu), stage 1 =
    Conv2D(6, 2, relu), stage 2 = Flatten -> Dense(1) -> sigmoid; MSE. The six gradients of
    StageChain against one tape over the joined model ("valid" lines as in the thread), and
    the boundary and input gradients besides.
(b) The thread's own answer, full Jacobians contracted with reduce_sum, beside StageChain:
    its time and the size of the Jacobians it forms.
(c) The seed's cats-vs-dogs architecture (Conv 32/32/64, Dense 64, Dropout 0.5, Dense 1
    sigmoid) split at Flatten into model_0 and model_1, each with its own optimizer, trained on
    scikit-learn's bundled digits (upsampled, digit >= 5 vs < 5) beside the joined model:
    the same weights after every epoch.

  python examples/cnn_split.py            # or: tbptt reproduce cnn-split
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tbptt  # noqa: E402

tf.get_logger().setLevel("ERROR")  # tape.jacobian's pfor retraces on every call: say it once

TOLERANCE = 1e-5  # float32 toy model: only the order of additions differs from one tape.
TRAIN_TOLERANCE = 1e-4  # weights after training steps in float32, same reason, compounded.


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, "float64"), np.asarray(expected, "float64")
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def toy_stages():
    return [
        keras.layers.Conv2D(6, 2, activation="relu"),
        keras.layers.Conv2D(6, 2, activation="relu"),
        keras.Sequential(
            [keras.layers.Flatten(), keras.layers.Dense(1), keras.layers.Activation("sigmoid")]
        ),
    ]


def joined_tape(stages, x, y, loss_fn):
    with tf.GradientTape() as tape:
        tape.watch(x)
        values = [x]
        for stage in stages:
            values.append(stage(values[-1]))
        loss = loss_fn(y, values[-1])
    variables = [v for s in stages for v in s.trainable_variables]
    return tape.gradient(loss, [variables, values[1:-1], x])


def jacobian_method(stages, x, y, loss_fn):
    """The thread's answer: full Jacobians of each stage, contracted by hand."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        values = [x]
        for stage in stages:
            values.append(stage(values[-1]))
        loss = loss_fn(y, values[-1])
    upstream = tape.gradient(loss, values[-1])
    grads, formed = [], 0
    for k in reversed(range(len(stages))):
        out_rank = len(values[k + 1].shape)
        stage_grads = []
        for variable in stages[k].trainable_variables:
            jac = tape.jacobian(values[k + 1], variable)
            formed += int(np.prod(jac.shape))
            stage_grads.append(tf.tensordot(upstream, jac, axes=out_rank))
        grads = stage_grads + grads
        jac_in = tape.jacobian(values[k + 1], values[k])
        formed += int(np.prod(jac_in.shape))
        upstream = tf.tensordot(upstream, jac_in, axes=out_rank)
    return grads, upstream, formed * 4 / 2**20


def part_a_and_b() -> float:
    keras.utils.set_random_seed(0)
    rng = np.random.RandomState(0)
    x = tf.constant(rng.rand(3, 10, 10, 1).astype("float32"))
    y = tf.constant(rng.randint(0, 2, (3, 1)).astype("float32"))
    stages, loss_fn = toy_stages(), keras.losses.MeanSquaredError()
    chain = tbptt.StageChain(stages)
    result = chain.value_and_gradients(x, y, loss_fn)
    grads, boundary, input_grad = joined_tape(stages, x, y, loss_fn)
    print("(a) the thread's toy check: StageChain vs one tape over the joined model")
    worst = 0.0
    names = [
        "conv0 kernel",
        "conv0 bias",
        "conv1 kernel",
        "conv1 bias",
        "dense kernel",
        "dense bias",
    ]
    for name, ours, theirs in zip(names, result.grads, grads):
        error = relative_error(ours, theirs)
        worst = max(worst, error)
        print(
            f"    {name:<13} {'valid' if error <= TOLERANCE else 'INVALID'}  "
            f"(rel. diff {error:.1e})"
        )
    for k, (ours, theirs) in enumerate(zip(result.boundary_grads, boundary)):
        error = relative_error(ours, theirs)
        worst = max(worst, error)
        print(f"    dL/d(stage {k} output) {tuple(ours.shape)}: rel. diff {error:.1e}")
    error = relative_error(result.input_grad, input_grad)
    worst = max(worst, error)
    print(f"    dL/dx {tuple(result.input_grad.shape)}: rel. diff {error:.1e}")

    print("\n(b) the thread's Jacobian method beside StageChain (same toy model, eager)")
    chain_eager = tbptt.StageChain(stages, compiled=False)
    timings = {}
    for name, fn in [
        ("StageChain (VJP per stage)", lambda: chain_eager.value_and_gradients(x, y, loss_fn)),
        ("Jacobians + reduce_sum", lambda: jacobian_method(stages, x, y, loss_fn)),
    ]:
        fn()
        start = time.perf_counter()
        for _ in range(3):
            out = fn()
        timings[name] = (time.perf_counter() - start) / 3
        if name.startswith("Jac"):
            jac_grads, jac_input, formed_mb = out
    error = max(relative_error(a, b) for a, b in zip(jac_grads + [jac_input], grads + [input_grad]))
    worst = max(worst, error)
    for name, seconds in timings.items():
        extra = (
            f"forms {formed_mb:.2f} MB of Jacobians"
            if name.startswith("Jac")
            else "forms no Jacobian"
        )
        print(f"    {name:<28} {seconds * 1e3:8.1f} ms/step   {extra}")
    # The seed's first convolution at its 150x150x3 images: output 148x148x32 per image.
    per_image_gb = 148 * 148 * 32 * 150 * 150 * 3 * 4 / 1e9
    print(
        f"    Jacobian method vs joined tape: rel. diff {error:.1e}. Its Jacobians grow as "
        f"(activation size) x (input or parameter size): for the seed's first convolution on "
        f"150x150x3 images, dOut/dIn alone is {per_image_gb:.0f} GB per image."
    )
    return worst


def cats_vs_dogs(input_shape):
    """The seed's architecture; Dropout with a fixed seed so two copies draw the same masks."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv2D(32, (3, 3)),
            layers.Activation("relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(32, (3, 3)),
            layers.Activation("relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3)),
            layers.Activation("relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(64),
            layers.Activation("relu"),
            layers.Dropout(0.5, seed=7),
            layers.Dense(1),
            layers.Activation("sigmoid"),
        ]
    )


def digits_dataset():
    """scikit-learn's bundled 8x8 digits, upsampled to 32x32: digit >= 5 vs < 5."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype("float32")[..., None] / 16.0
    images = tf.image.resize(images, (32, 32)).numpy()
    labels = (digits.target >= 5).astype("float32")[:, None]
    return images, labels


def part_c(epochs: int = 3, batch: int = 64) -> float:
    try:
        images, labels = digits_dataset()
    except ImportError:
        sys.exit("part (c) needs scikit-learn: pip install 'tbptt[examples]'")
    keras.utils.set_random_seed(1)
    joined = cats_vs_dogs(images.shape[1:])
    split = cats_vs_dogs(images.shape[1:])
    split.set_weights(joined.get_weights())
    model_0, model_1 = tbptt.split_sequential(split, at=[9])  # cut at Flatten
    chain = tbptt.StageChain([model_0, model_1])
    optimizers = [keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3)]
    joined_optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.BinaryCrossentropy()

    @tf.function
    def joined_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, joined(x, training=True))
        grads = tape.gradient(loss, joined.trainable_variables)
        joined_optimizer.apply_gradients(zip(grads, joined.trainable_variables))
        return loss

    print(
        f"\n(c) cats-vs-dogs CNN split at Flatten: model_0 ({len(model_0.layers)} layers, "
        f"{len(chain.stage_variables[0])} variables) + model_1 ({len(model_1.layers)} layers), "
        f"two tapes and two Adam optimizers, vs the joined model; {len(images)} digit images "
        "32x32, digit >= 5"
    )
    print(
        f"    {'epoch':>5} {'joined loss':>12} {'split loss':>12} {'accuracy':>9} "
        f"{'max rel weight diff':>20}"
    )
    worst = 0.0
    order = np.random.RandomState(0).permutation(len(images))
    for epoch in range(1, epochs + 1):
        losses = [[], []]
        for start in range(0, len(images), batch):
            index = order[start : start + batch]
            x, y = tf.constant(images[index]), tf.constant(labels[index])
            losses[0].append(float(joined_step(x, y)))
            result = chain.value_and_gradients(x, y, loss_fn)
            for opt, g, v in zip(
                optimizers, chain.split_grads(result.grads), chain.stage_variables
            ):
                opt.apply_gradients(zip(g, v))
            losses[1].append(float(result.loss))
        error = max(relative_error(a, b) for a, b in zip(split.get_weights(), joined.get_weights()))
        worst = max(worst, error)
        accuracy = float(np.mean((split(images, training=False).numpy() > 0.5) == labels))
        print(
            f"    {epoch:>5} {np.mean(losses[0]):>12.4f} {np.mean(losses[1]):>12.4f} "
            f"{accuracy:>9.3f} {error:>20.1e}"
        )
    return worst / TRAIN_TOLERANCE * TOLERANCE


def main() -> int:
    worst = max(part_a_and_b(), part_c())
    if worst > TOLERANCE:
        print(f"DISAGREEMENT beyond tolerance ({worst:.1e})")
        return 1
    print(
        f"\nagreement: gradients within {TOLERANCE:.0e}, trained weights within "
        f"{TRAIN_TOLERANCE:.0e} (relative, float32)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
